"""Tests of bimac.generation: decoding loops, the CoCa and mBART adapters, the score processors.

References: transformers' own ``MBartForConditionalGeneration.generate`` (ids identical, beam
scores to 1e-5), transformers' top-k/top-p warpers (exact), each model's own full forward
(cached log-probabilities to 1e-5), and hand-computed toy decoders (scores to 1e-6).
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from transformers import (
    MBartConfig,
    MBartForConditionalGeneration,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutput

from bimac.generation import (
    CocaAdapter,
    DecoderAdapter,
    GenerationConfig,
    MBartAdapter,
    _warp,
    generate,
    sequence_logprobs,
)

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2
BN_IN = 60  # stands in for mBART-50's bn_IN language code


def tiny_coca(seed: int = 0) -> open_clip.CoCa:
    torch.manual_seed(seed)
    width = dict(width=32, layers=2, heads=4, context_length=24, vocab_size=VOCAB)
    coca = open_clip.CoCa(
        embed_dim=32,
        multimodal_cfg=width,
        text_cfg=dict(width, embed_cls=True, output_tokens=True),
        vision_cfg=dict(
            image_size=32,
            patch_size=8,
            width=32,
            layers=1,
            head_width=16,
            attentional_pool=True,
            attn_pooler_queries=8,
            attn_pooler_heads=4,
            output_tokens=True,
        ),
    ).eval()
    # open_clip leaves the decoder's output projection uninitialised (torch.empty)
    torch.nn.init.normal_(coca.text_decoder.text_projection, std=0.3)
    with torch.no_grad():  # EOS at varied steps: a shared offset in the final norm feeds EOS
        coca.text_decoder.ln_final.bias.fill_(0.3)
        coca.text_decoder.text_projection[:, EOS] += 0.35
    return coca


def tiny_mbart(seed: int = 0) -> MBartForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = MBartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        init_std=0.3,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        forced_eos_token_id=None,
    )
    model = MBartForConditionalGeneration(cfg).eval()
    model.generation_config.forced_bos_token_id = BN_IN
    with torch.no_grad():
        model.final_logits_bias[0, EOS] = 1.5  # EOS at varied steps
    return model


@pytest.fixture(scope="module")
def coca():
    return tiny_coca()


@pytest.fixture(scope="module")
def mbart():
    return tiny_mbart()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def enc_states():
    return torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(2))


def coca_adapter(coca):
    return CocaAdapter(coca, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def assert_ended_properly(out, eos=EOS, pad=PAD):
    for row, n in zip(out.ids, out.lengths.tolist()):
        assert (row[n:] == pad).all()
        assert (row[: n - 1] != eos).all()
    mask = torch.arange(out.ids.shape[1])[None] >= out.lengths[:, None]
    assert (out.logprobs[mask] == 0).all()


# ----------------------------------------------------------------------------- cache, greedy, beam


CASES = [
    dict(strategy="greedy"),
    dict(strategy="sample", num_return_sequences=3, seed=3, top_k=20, top_p=0.9, temperature=1.3),
    dict(strategy="beam", num_beams=4, num_return_sequences=2, no_repeat_ngram_size=2),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: kw["strategy"])
@pytest.mark.parametrize("which", ["coca", "mbart"])
def test_cache_equals_full_forward(which, kw, coca, mbart, images, enc_states):
    """Cached decoding == re-running the model's own forward on the whole prefix."""
    adapter, inputs = (
        (coca_adapter(coca), images)
        if which == "coca"
        else (MBartAdapter.from_model(mbart), enc_states)
    )
    cached = generate(adapter, inputs, GenerationConfig(max_new_tokens=14, **kw))
    full = generate(adapter, inputs, GenerationConfig(max_new_tokens=14, use_cache=False, **kw))
    assert torch.equal(cached.ids, full.ids)
    assert torch.equal(cached.lengths, full.lengths)
    torch.testing.assert_close(cached.logprobs, full.logprobs, atol=1e-5, rtol=0)
    assert_ended_properly(cached)
    if which == "mbart":
        assert (cached.ids[:, 0] == BN_IN).all()


def test_sequences_end_at_varied_steps(coca, images, mbart, enc_states):
    """The fixtures exercise per-sequence EOS handling (finished rows dropped mid-loop)."""
    cfg = GenerationConfig(strategy="sample", num_return_sequences=4, max_new_tokens=14, seed=0)
    for adapter, inputs in [
        (coca_adapter(coca), images),
        (MBartAdapter.from_model(mbart), enc_states),
    ]:
        lengths = generate(adapter, inputs, cfg).lengths
        assert lengths.min() < 14 and len(set(lengths.tolist())) >= 2


@pytest.mark.parametrize("which", ["coca", "mbart"])
def test_beam_size_one_equals_greedy(which, coca, mbart, images, enc_states):
    adapter, inputs = (
        (coca_adapter(coca), images)
        if which == "coca"
        else (MBartAdapter.from_model(mbart), enc_states)
    )
    greedy = generate(adapter, inputs, GenerationConfig(max_new_tokens=14))
    beam = generate(
        adapter, inputs, GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=14)
    )
    assert torch.equal(greedy.ids, beam.ids)
    torch.testing.assert_close(greedy.logprobs, beam.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["coca", "mbart"])
def test_logprobs_equal_teacher_forced_forward(which, coca, mbart, images, enc_states):
    cfg = GenerationConfig(strategy="sample", num_return_sequences=2, max_new_tokens=12, seed=7)
    if which == "coca":
        out = generate(coca_adapter(coca), images, cfg)
        memory = coca._encode_image(images)[1].repeat_interleave(2, 0)
        prefix = torch.cat([torch.full((len(out.ids), 1), BOS), out.ids], 1)
        with torch.no_grad():
            logits = coca.text_decoder(memory, coca.text(prefix)[1])[:, :-1]
    else:
        out = generate(MBartAdapter.from_model(mbart), enc_states, cfg)
        prefix = torch.cat([torch.full((len(out.ids), 1), EOS), out.ids], 1)
        enc = BaseModelOutput(last_hidden_state=enc_states.repeat_interleave(2, 0))
        with torch.no_grad():
            logits = mbart(encoder_outputs=enc, decoder_input_ids=prefix).logits[:, :-1]
    expected = logits.log_softmax(-1).gather(2, out.ids[..., None]).squeeze(2)
    valid = torch.arange(out.ids.shape[1])[None] < out.lengths[:, None]
    torch.testing.assert_close(out.logprobs[valid], expected[valid], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- mBART vs transformers


HF_CASES = [
    dict(strategy="greedy"),
    dict(strategy="greedy", no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=4),
    dict(strategy="beam", num_beams=4),
    dict(
        strategy="beam",
        num_beams=3,
        length_penalty=2.0,
        no_repeat_ngram_size=2,
        repetition_penalty=1.3,
        min_new_tokens=3,
    ),
    dict(strategy="beam", num_beams=3, early_stopping=True, num_return_sequences=2),
]


@pytest.mark.parametrize("kw", HF_CASES)
def test_mbart_matches_transformers_generate(kw, mbart, enc_states):
    cfg = GenerationConfig(max_new_tokens=12, **kw)
    ours = generate(MBartAdapter.from_model(mbart), enc_states, cfg)
    ref = mbart.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc_states),
        max_new_tokens=12,
        do_sample=False,
        forced_bos_token_id=BN_IN,
        num_beams=cfg.num_beams,
        num_return_sequences=cfg.num_return_sequences,
        length_penalty=cfg.length_penalty,
        early_stopping=cfg.early_stopping,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        repetition_penalty=cfg.repetition_penalty,
        min_new_tokens=cfg.min_new_tokens,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert (ref.sequences[:, 1] == BN_IN).all()
    assert torch.equal(ours.ids, ref.sequences[:, 1:])  # transformers keeps the start token
    if cfg.strategy == "beam":
        torch.testing.assert_close(ours.sequence_scores, ref.sequences_scores, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- toy decoder


class ToyAdapter(DecoderAdapter):
    """Next-token probabilities from a Python function of the prefix (no cache, no memory)."""

    start_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    def __init__(self, table, vocab: int = 6):
        self.table, self.vocab = table, vocab

    def prepare(self, inputs):
        return {"memory": inputs}

    def reorder(self, state, index):
        return {"memory": state["memory"].index_select(0, index)}

    def logits(self, state, prefix, use_cache):
        out = torch.full((len(prefix), self.vocab), float("-inf"))
        for i, row in enumerate(prefix.tolist()):
            for tok, p in self.table(tuple(row[1:])).items():
                out[i, tok] = math.log(p)
        return out


A, B, C = 3, 4, 5


def test_beam_finds_the_best_sequence_greedy_misses():
    probs = {
        (): {A: 0.5, B: 0.4, EOS: 0.1},
        (A,): {A: 0.3, B: 0.24, C: 0.23, EOS: 0.23},
        (B,): {C: 0.9, EOS: 0.1},
    }
    toy = ToyAdapter(lambda prefix: probs.get(prefix, {EOS: 1.0}))
    inputs = torch.zeros(1, 1, 1)
    greedy = generate(toy, inputs, GenerationConfig(max_new_tokens=5))
    assert greedy.ids.tolist() == [[A, A, EOS]]  # p = 0.15
    beam = generate(
        toy,
        inputs,
        GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=5, length_penalty=0.0),
    )
    assert beam.ids.tolist() == [[B, C, EOS]]  # p = 0.36, the best of all sequences
    assert beam.sequence_scores.item() == pytest.approx(math.log(0.36), abs=1e-6)
    torch.testing.assert_close(beam.logprobs, torch.log(torch.tensor([[0.4, 0.9, 1.0]])))


@pytest.mark.parametrize(
    "penalty, best, score",
    [
        (0.0, [EOS], math.log(0.4)),  # sum of log-probs: the short caption wins
        (1.0, [A, B, EOS], math.log(0.36) / 3),  # per-token average: the long one wins
        (2.0, [A, B, EOS], math.log(0.36) / 9),
    ],
)
def test_length_penalty(penalty, best, score):
    probs = {(): {EOS: 0.4, A: 0.6}, (A,): {B: 0.6, EOS: 0.4}}
    toy = ToyAdapter(lambda prefix: probs.get(prefix, {EOS: 1.0}))
    cfg = GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=6, length_penalty=penalty)
    out = generate(toy, torch.zeros(1, 1, 1), cfg)
    assert out.ids[0, : out.lengths[0]].tolist() == best
    assert out.sequence_scores.item() == pytest.approx(score, abs=1e-6)


def alternating(prefix):
    last = prefix[-1] if prefix else None
    return {
        None: {A: 0.9, EOS: 0.1},
        A: {B: 0.6, C: 0.3, EOS: 0.1},
        B: {A: 0.6, C: 0.3, EOS: 0.1},
        C: {EOS: 0.5, A: 0.3, B: 0.2},
    }[last]


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, [A, B, A, B, A, B]),
        (2, [A, B, A, C, EOS]),  # "A B" may not occur twice
        (3, [A, B, A, B, C, EOS]),  # "A B A" may not occur twice
    ],
)
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_no_repeat_ngram(n, expected, strategy):
    cfg = GenerationConfig(strategy=strategy, num_beams=1, max_new_tokens=6, no_repeat_ngram_size=n)
    out = generate(ToyAdapter(alternating), torch.zeros(1, 1, 1), cfg)
    assert out.ids[0, : out.lengths[0]].tolist() == expected


def test_min_new_tokens_blocks_early_eos():
    probs = {(): {EOS: 0.9, A: 0.1}}
    toy = ToyAdapter(lambda prefix: probs.get(prefix, {EOS: 0.7, B: 0.3}))
    out = generate(toy, torch.zeros(1, 1, 1), GenerationConfig(max_new_tokens=6, min_new_tokens=3))
    assert out.ids.tolist() == [[A, B, B, EOS]]
    assert out.lengths.tolist() == [4]


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(coca, images):
    adapter = coca_adapter(coca)
    cfg = dict(strategy="sample", num_return_sequences=4, max_new_tokens=12, temperature=1.5)
    a = generate(adapter, images, GenerationConfig(seed=11, **cfg))
    b = generate(adapter, images, GenerationConfig(seed=11, **cfg))
    c = generate(adapter, images, GenerationConfig(seed=12, **cfg))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.ids, c.ids)
    top1 = generate(
        adapter, images, GenerationConfig(strategy="sample", top_k=1, seed=0, max_new_tokens=12)
    )
    assert torch.equal(top1.ids, generate(adapter, images, GenerationConfig(max_new_tokens=12)).ids)


@pytest.mark.parametrize(
    "top_k, top_p, temperature", [(5, 1.0, 1.0), (0, 0.7, 1.0), (10, 0.5, 0.7)]
)
def test_warpers_match_transformers(top_k, top_p, temperature):
    scores = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    ours = _warp(
        scores,
        GenerationConfig(strategy="sample", top_k=top_k, top_p=top_p, temperature=temperature),
    )
    ref = scores / temperature
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("which", ["coca", "mbart"])
def test_sequence_logprobs_are_the_decoding_logprobs_with_gradients(
    which, coca, mbart, images, enc_states
):
    """SCST's gradient path: one teacher-forced forward of the generated rows gives what the
    cached decoding returned (reference: generate's own logprobs, to 1e-5; 0 after each row's
    end), with gradients into the decoder's weights and the memory; generate keeps no graph."""
    if which == "coca":
        adapter, memory = coca_adapter(coca), coca._encode_image(images)[1].detach()
        weight = coca.text_decoder.resblocks[0].attn.in_proj_weight
    else:
        adapter, memory = MBartAdapter.from_model(mbart), enc_states.clone()
        weight = mbart.model.decoder.layers[0].self_attn.q_proj.weight
    memory.requires_grad_()
    cfg = GenerationConfig(strategy="sample", num_return_sequences=3, max_new_tokens=12, seed=5)
    out = generate(adapter, memory, cfg)
    assert not out.logprobs.requires_grad
    assert out.lengths.min() < out.lengths.max()  # rows that end at different steps
    got = sequence_logprobs(adapter, memory, out.ids, out.lengths)
    torch.testing.assert_close(got, out.logprobs, atol=1e-5, rtol=0)
    got.sum().backward()
    try:
        assert memory.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
    finally:
        (coca if which == "coca" else mbart).zero_grad(set_to_none=True)


@pytest.mark.parametrize("which", ["coca", "mbart"])
def test_scores_are_float32_under_autocast(which, coca, mbart, images, enc_states):
    adapter, inputs = (
        (coca_adapter(coca), images)
        if which == "coca"
        else (MBartAdapter.from_model(mbart), enc_states)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(
            adapter, inputs, GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=6)
        )
    assert out.logprobs.dtype == torch.float32 and out.sequence_scores.dtype == torch.float32
    assert torch.isfinite(out.sequence_scores).all()


def test_bad_settings_raise(coca):
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(strategy="beam", num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="context"):
        generate(coca_adapter(coca), torch.zeros(1, 4, 32), GenerationConfig(max_new_tokens=30))


class ListTokenizer:
    """The bimac.data.tokenizer contract: decode(LongTensor [N, T]) -> list[str]."""

    def decode(self, ids):
        return [" ".join(str(t) for t in row if t not in (PAD, EOS)) for row in ids.tolist()]


class HFStyleTokenizer:
    def batch_decode(self, rows, skip_special_tokens):
        assert skip_special_tokens
        return ["|".join(map(str, row)) for row in rows]


def test_texts_from_either_tokenizer_kind():
    probs = {(): {A: 0.9, EOS: 0.1}, (A,): {B: 0.9, EOS: 0.1}}
    table = lambda prefix: probs.get(prefix, {EOS: 1.0})  # noqa: E731
    toy = ToyAdapter(table)
    toy.tokenizer = ListTokenizer()
    assert generate(toy, torch.zeros(2, 1, 1), GenerationConfig()).texts == ["3 4", "3 4"]
    toy.tokenizer = HFStyleTokenizer()
    assert generate(toy, torch.zeros(1, 1, 1), GenerationConfig()).texts == ["3|4|2"]
