"""Caption generation: batched greedy, sampling and beam search with a key/value cache.

One loop serves every captioning decoder through a small adapter:

- :class:`CocaAdapter` for the open_clip CoCa text tower + multimodal decoder (BiMAC's ``model.coca``).
  open_clip's own ``CoCa.generate`` is unusable here (it imports ``BeamSearchScorer``, gone in
  transformers 5, and re-runs the whole prefix every step), so the adapter re-implements one
  decoding step of its residual blocks with their own weights and caches self-attention keys and
  values; the image memory's cross-attention keys/values are computed once per image.
- :class:`MBartAdapter` for the mBART-50 decoder of the PAL captioner, fed an external encoder's
  states through transformers' ``EncoderDecoderCache`` (cross-attention K/V computed at the first
  step, then reused).

The first decoding step runs once per input and its cache is then copied to the ``num_beams`` /
``num_return_sequences`` rows, so every image's memory K/V are computed once. Scores that pick
tokens are float32 (``logits.float()``) also under bf16/fp16 autocast. The beam search follows
transformers' ``_beam_search`` (2K candidates per step, length-normalised finished pool, the same
early-stop heuristic), so it returns what ``model.generate`` returns on the same model.

Returned ``logprobs[i, t]`` is always the *model's* log-probability of ``ids[i, t]`` given the
prefix (log-softmax of the raw logits, before temperature, top-k/top-p and penalties), i.e. what a
teacher-forced forward gives; zero after the sequence's end. A forced first token gets its model
log-probability too (with a leave-one-out SCST baseline its gradient term cancels exactly).

Decoding runs without gradients. :func:`sequence_logprobs` gives the same log-probabilities with
gradients (SCST) from one teacher-forced forward of the generated rows through the decoder's own
modules: the decoding loop reads weights outside their modules' forward (cached K/V), which
ZeRO-3's fetch hooks do not see, and a rank's number of decoding steps depends on its samples,
while the teacher-forced forward makes the same module calls on every rank (see
:func:`gathered_for_generation` for the decoding side under ZeRO-3).

Usage::

    adapter = CocaAdapter(model.coca, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id, tokenizer=tok)
    out = generate(adapter, images_or_memory, GenerationConfig(strategy="beam", num_beams=5))
    # SCST: 5 samples per image, then their log-probabilities with gradients
    out = generate(adapter, memory, GenerationConfig(strategy="sample", num_return_sequences=5,
                                                     seed=step))
    logprobs = sequence_logprobs(adapter, memory, out.ids, out.lengths)
    # PAL: mBART-50 decoder over the bridge's patch tokens, bn_IN forced first
    adapter = MBartAdapter.from_model(mbart, forced_first_token_id=bn_in_id, tokenizer=tok)
    out = generate(adapter, bridge_tokens, GenerationConfig(strategy="beam", num_beams=4,
                                                            no_repeat_ngram_size=3))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

NEG_INF = float("-inf")
_UNREACHABLE = -1.0e9  # transformers' sentinel for beams that must never be picked


@dataclass
class GenerationConfig:
    """Decoding settings (the same meaning as transformers' ``GenerationConfig`` fields).

    ``max_new_tokens`` / ``min_new_tokens`` count generated tokens after the start token, the
    forced first token and EOS included. ``num_return_sequences``: samples per input (``sample``)
    or best beams per input (``beam``). Generation runs under ``torch.no_grad``; gradients of the
    generated rows' log-probabilities come from :func:`sequence_logprobs`.
    """

    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("min_new_tokens must lie in [0, max_new_tokens]")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("num_beams and num_return_sequences must be >= 1")
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            raise ValueError("beam search returns at most num_beams sequences per input")
        if self.strategy == "greedy" and self.num_return_sequences != 1:
            raise ValueError("greedy decoding returns one sequence per input; use strategy=sample")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k, no_repeat_ngram_size must be >= 0; repetition_penalty > 0")


@dataclass
class GenerationOutput:
    """``ids [N, T]`` generated tokens (no start token; ``pad`` after EOS), ``logprobs [N, T]``
    float32 model log-probabilities of those tokens (0 after the end), ``lengths [N]`` tokens up to
    and including EOS, ``texts`` decoded captions when the adapter has a tokenizer,
    ``sequence_scores [N]`` length-normalised beam scores (beam search only).
    Rows are input-major: rows ``i*R .. i*R+R-1`` belong to input ``i``."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    texts: list[str] | None = None
    sequence_scores: torch.Tensor | None = None


class DecoderAdapter:
    """What the decoding loop needs from a decoder. Subclasses set the token ids and implement
    ``prepare`` (inputs -> state dict with one row per input, holding the ``"memory"`` tensor
    ``[B, ...]``), ``logits`` (state, prefix ``[N, L]`` starting with the start token -> float
    next-token logits ``[N, V]``; with ``use_cache`` only the tokens not yet cached are run, without
    it the whole prefix through ``sequence_logits``), ``reorder`` (state rows picked by an index:
    beam reordering, copying one input's state to its beams/samples, dropping finished rows) and
    ``sequence_logits`` (memory rows ``[N, ...]``, prefix ``[N, L]`` -> logits ``[N, L, V]`` at
    every position: the decoder's own teacher-forced forward, its modules called as modules)."""

    start_token_id: int
    eos_token_id: int
    pad_token_id: int
    forced_first_token_id: int | None = None
    suppressed_token_ids: tuple[int, ...] = ()
    max_positions: int | None = None  # longest prefix (start token included) the decoder takes
    tokenizer: Any = None

    def prepare(self, inputs: Any) -> dict:
        raise NotImplementedError

    def logits(self, state: dict, prefix: torch.Tensor, use_cache: bool) -> torch.Tensor:
        raise NotImplementedError

    def reorder(self, state: dict, index: torch.Tensor) -> dict:
        raise NotImplementedError

    def sequence_logits(self, memory: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor, lengths: torch.Tensor) -> list[str] | None:
        """Texts of the generated rows if a tokenizer was given: a transformers tokenizer
        (``batch_decode``, special tokens skipped) or one with ``decode(LongTensor [N, T]) ->
        list[str]`` (the ``bimac.data.tokenizer`` contract; it gets the rows padded after EOS)."""
        if self.tokenizer is None:
            return None
        if hasattr(self.tokenizer, "batch_decode"):
            rows = [row[:n].tolist() for row, n in zip(ids, lengths.tolist())]
            return self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return list(self.tokenizer.decode(ids))


# ----------------------------------------------------------------------------- open_clip CoCa


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[N, L, D] -> [N, H, L, D/H]."""
    n, length, d = x.shape
    return x.view(n, length, n_heads, d // n_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, h, length, dh = x.shape
    return x.transpose(1, 2).reshape(n, length, h * dh)


class CocaAdapter(DecoderAdapter):
    """open_clip ``CoCa``: unimodal causal text tower, then the multimodal decoder attending to the
    image memory. ``prepare`` takes images ``[B, 3, H, W]`` (normalised floats; the memory is
    ``coca._encode_image(images)[1]``) or precomputed memory tokens ``[B, M, width]`` (e.g. the
    raw patch tokens BiMAC feeds the decoder).

    The token ``pad_token_id`` is never generated: CoCa's text tower masks pad keys, so a generated
    pad would change the meaning of the prefix.
    """

    def __init__(
        self,
        coca: nn.Module,
        *,
        bos_token_id: int = 49406,
        eos_token_id: int = 49407,
        pad_token_id: int | None = None,
        tokenizer: Any = None,
    ) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        self.coca = coca
        self.text = coca.text
        self.decoder = coca.text_decoder
        blocks = [
            *self.text.transformer.resblocks,
            *self.decoder.resblocks,
            *self.decoder.cross_attn,
        ]
        if any(type(b) is not ResidualAttentionBlock for b in blocks):
            raise ValueError("CocaAdapter supports open_clip's default ResidualAttentionBlock only")
        if getattr(self.text, "attn_mask", None) is None or not self.decoder.batch_first:
            raise ValueError("CocaAdapter needs a causal, batch-first CoCa text tower and decoder")
        if not self.text.output_tokens:
            raise ValueError("CocaAdapter needs the CoCa text tower built with output_tokens=True")
        self.start_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = coca.pad_id if pad_token_id is None else pad_token_id
        self.suppressed_token_ids = (self.pad_token_id,)
        self.tokenizer = tokenizer
        # positions the decoder can see: the text tower's table and the decoder's causal mask
        self.max_positions = min(
            self.decoder.context_length, self.text.positional_embedding.shape[0]
        )

    def prepare(self, inputs: torch.Tensor) -> dict:
        if inputs.ndim == 4:
            if not getattr(self.coca.visual, "output_tokens", False):
                raise ValueError("images need a CoCa vision tower with output_tokens=True")
            _, memory = self.coca._encode_image(inputs)
        elif inputs.ndim == 3:
            memory = inputs
        else:
            raise ValueError(
                f"expected images [B,3,H,W] or memory [B,M,D], got {tuple(inputs.shape)}"
            )
        cross_kv = []
        for blk in self.decoder.cross_attn:
            kv = blk.ln_1_kv(memory)
            d = kv.shape[-1]
            w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
            k = F.linear(kv, w[d : 2 * d], None if b is None else b[d : 2 * d])
            v = F.linear(kv, w[2 * d :], None if b is None else b[2 * d :])
            cross_kv.append((_heads(k, blk.attn.num_heads), _heads(v, blk.attn.num_heads)))
        n_self = len(self.text.transformer.resblocks) + len(self.decoder.resblocks)
        rows = torch.arange(memory.shape[0], device=memory.device)
        return {
            "memory": memory,  # per image; row r reads image row_image[r]
            "row_image": rows,
            "cross_kv": cross_kv,  # per image while rows stay grouped, else per row
            "cross_per_row": False,
            "self_kv": [None] * n_self,
            "cached": 0,
        }

    def reorder(self, state: dict, index: torch.Tensor) -> dict:
        """Self-attention K/V follow the rows. The image K/V stay one per image while every image
        has the same number of consecutive rows (beams, samples): then the rows' queries attend
        together and nothing is copied. Dropping finished rows breaks that; the image K/V are
        then copied to the rows once."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        row_image, cross_kv = state["row_image"][index], state["cross_kv"]
        per_row = state["cross_per_row"]
        if per_row:
            cross_kv = [(pick(k), pick(v)) for k, v in cross_kv]
        else:
            n_img = cross_kv[0][0].shape[0] if cross_kv else 1
            copies = len(row_image) // n_img
            grouped = len(row_image) == n_img * copies and torch.equal(
                row_image, torch.arange(n_img, device=row_image.device).repeat_interleave(copies)
            )
            if not grouped:
                cross_kv = [(k[row_image], v[row_image]) for k, v in cross_kv]
                per_row = True
        return {
            "memory": state["memory"],
            "row_image": row_image,
            "cross_kv": cross_kv,
            "cross_per_row": per_row,
            "self_kv": [
                None if kv is None else (pick(kv[0]), pick(kv[1])) for kv in state["self_kv"]
            ],
            "cached": state["cached"],
        }

    def logits(self, state: dict, prefix: torch.Tensor, use_cache: bool) -> torch.Tensor:
        if not use_cache:  # the model's own full forward over the whole prefix
            memory = state["memory"].index_select(0, state["row_image"])
            return self.sequence_logits(memory, prefix)[:, -1]
        start = state["cached"]
        new = prefix[:, start:]
        cast = self.text.transformer.get_cast_dtype()
        x = self.text.token_embedding(new).to(cast)
        x = x + self.text.positional_embedding[start : prefix.shape[1]].to(cast)
        layer = 0
        for blk in self.text.transformer.resblocks:
            x = self._self_block(blk, x, state, layer)
            layer += 1
        for blk, cross in zip(self.decoder.resblocks, self.decoder.cross_attn):
            x = self._self_block(blk, x, state, layer)
            layer += 1
            k, v = state["cross_kv"][layer - 1 - len(self.text.transformer.resblocks)]
            x = self._cross_block(cross, x, k, v, state["cross_per_row"])
        state["cached"] = prefix.shape[1]
        out = self.decoder.ln_final(x[:, -1])
        return out @ self.decoder.text_projection

    def sequence_logits(self, memory: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        _, tokens = self.text(prefix)
        return self.decoder(memory, tokens)

    @staticmethod
    def _finish_block(blk: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + blk.ls_1(blk.attn.out_proj(_merge_heads(attn_out)))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def _self_block(self, blk: nn.Module, x: torch.Tensor, state: dict, layer: int) -> torch.Tensor:
        h = blk.attn.num_heads
        q, k, v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)
        q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
        past = state["self_kv"][layer]
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        state["self_kv"][layer] = (k, v)
        n_new, n_all = q.shape[2], k.shape[2]
        mask = None
        if n_new > 1:  # causal within the new chunk; all cached positions are visible
            mask = torch.ones(n_new, n_all, dtype=torch.bool, device=x.device).tril(n_all - n_new)
        return self._finish_block(blk, x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def _cross_block(
        self, blk: nn.Module, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, per_row: bool
    ) -> torch.Tensor:
        d = x.shape[-1]
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        q = _heads(F.linear(blk.ln_1(x), w[:d], None if b is None else b[:d]), blk.attn.num_heads)
        if per_row:
            attn = F.scaled_dot_product_attention(q, k, v)
        else:  # the rows of one image are extra queries against that image's K/V
            n, h, length, dh = q.shape
            n_img = k.shape[0]
            q = q.view(n_img, n // n_img, h, length, dh).transpose(1, 2)
            attn = F.scaled_dot_product_attention(q.reshape(n_img, h, -1, dh), k, v)
            attn = (
                attn.view(n_img, h, n // n_img, length, dh)
                .transpose(1, 2)
                .reshape(n, h, length, dh)
            )
        return self._finish_block(blk, x, attn)


# ----------------------------------------------------------------------------- mBART decoder


class MBartAdapter(DecoderAdapter):
    """A transformers (5.x) mBART decoder reading an external encoder's states.

    Give it the decoder module (``MBartDecoder``: ``model.model.decoder`` of an
    ``MBartForConditionalGeneration`` or ``MBartForCausalLM``), its ``lm_head`` and, for the seq2seq
    model, ``final_logits_bias``; or use :meth:`from_model`. ``prepare`` takes the encoder states
    ``[B, M, d_model]`` (the PAL bridge output). The cache is an ``EncoderDecoderCache`` (the
    cross-attention K/V are computed at the first step and reused), which sidesteps
    ``MBartForCausalLM.generate``'s cache mix-up.
    """

    def __init__(
        self,
        decoder: nn.Module,
        lm_head: nn.Module,
        *,
        decoder_start_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        forced_first_token_id: int | None = None,
        logits_bias: torch.Tensor | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.decoder = decoder
        self.lm_head = lm_head
        self.logits_bias = logits_bias
        self.start_token_id = decoder_start_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.forced_first_token_id = forced_first_token_id
        self.max_positions = getattr(decoder.config, "max_position_embeddings", None)
        self.tokenizer = tokenizer

    @classmethod
    def from_model(
        cls, model: nn.Module, *, forced_first_token_id: int | None = None, tokenizer: Any = None
    ) -> MBartAdapter:
        """From an ``MBartForConditionalGeneration`` / ``MBartForCausalLM``; token ids from its
        config (mBART-50: start = ``</s>``, forced first token = the language code, e.g.
        ``tokenizer.convert_tokens_to_ids("bn_IN")``)."""
        # transformers 5 keeps decoding ids in generation_config, older checkpoints in config
        sources = [getattr(model, "generation_config", None), model.config]

        def token(name: str) -> int | None:
            return next((v for s in sources if (v := getattr(s, name, None)) is not None), None)

        forced = (
            token("forced_bos_token_id") if forced_first_token_id is None else forced_first_token_id
        )
        start, eos = token("decoder_start_token_id"), token("eos_token_id")
        return cls(
            model.model.decoder,
            model.lm_head,
            decoder_start_token_id=eos if start is None else start,
            eos_token_id=eos,
            pad_token_id=token("pad_token_id"),
            forced_first_token_id=forced,
            logits_bias=getattr(model, "final_logits_bias", None),
            tokenizer=tokenizer,
        )

    def prepare(self, inputs: torch.Tensor) -> dict:
        from transformers import DynamicCache, EncoderDecoderCache

        if inputs.ndim != 3:
            raise ValueError(f"expected encoder states [B, M, D], got {tuple(inputs.shape)}")
        cfg = self.decoder.config
        cache = EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))
        return {"memory": inputs, "cache": cache}

    def reorder(self, state: dict, index: torch.Tensor) -> dict:
        state["cache"].reorder_cache(index)  # index_select: also expands and drops rows
        return {"memory": state["memory"].index_select(0, index), "cache": state["cache"]}

    def logits(self, state: dict, prefix: torch.Tensor, use_cache: bool) -> torch.Tensor:
        if use_cache:
            cache = state["cache"]
            new = prefix[:, cache.get_seq_length() :]
            out = self.decoder(
                input_ids=new, encoder_hidden_states=state["memory"], cache=cache, use_cache=True
            )
            return self._head(out.last_hidden_state[:, -1])
        return self.sequence_logits(state["memory"], prefix)[:, -1]

    def sequence_logits(self, memory: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        out = self.decoder(input_ids=prefix, encoder_hidden_states=memory, use_cache=False)
        return self._head(out.last_hidden_state)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits if self.logits_bias is None else logits + self.logits_bias


# ----------------------------------------------------------------------------- score processing


def _banned_ngrams(prefix: torch.Tensor, n: int, vocab: int) -> torch.Tensor | None:
    """Mask ``[N, V]`` of tokens that would repeat an ``n``-gram already in ``prefix``."""
    length = prefix.shape[1]
    if length < n:
        return None
    windows = prefix.unfold(1, n, 1)  # [N, W, n]
    last = prefix[:, length - n + 1 :]  # the n-1 tokens the next token would extend
    match = (windows[:, :, :-1] == last[:, None, :]).all(-1)
    hits = torch.zeros(prefix.shape[0], vocab, device=prefix.device)
    hits.scatter_add_(1, windows[:, :, -1], match.to(hits.dtype))
    return hits > 0


def _process(
    scores: torch.Tensor,
    prefix: torch.Tensor,
    step: int,
    cfg: GenerationConfig,
    adapter: DecoderAdapter,
) -> torch.Tensor:
    """transformers' logits processors: repetition penalty, no-repeat n-grams, minimum length,
    suppressed tokens, forced first token. ``scores``: float32 ``[N, V]`` (logits for greedy and
    sampling, log-probabilities for beam search, as transformers does)."""
    if cfg.repetition_penalty != 1.0:
        seen = scores.gather(1, prefix)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        scores = scores.scatter(1, prefix, seen)
    if cfg.no_repeat_ngram_size:
        banned = _banned_ngrams(prefix, cfg.no_repeat_ngram_size, scores.shape[1])
        if banned is not None:
            scores = scores.masked_fill(banned, NEG_INF)
    blocked = list(adapter.suppressed_token_ids)
    if step < cfg.min_new_tokens:
        blocked.append(adapter.eos_token_id)
    if blocked:
        scores = scores.index_fill(1, torch.tensor(blocked, device=scores.device), NEG_INF)
    if step == 0 and adapter.forced_first_token_id is not None:
        forced = torch.full_like(scores, NEG_INF)
        scores = forced.index_fill(
            1, torch.tensor([adapter.forced_first_token_id], device=scores.device), 0.0
        )
    return scores


def _warp(scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as transformers' warpers."""
    scores = scores / cfg.temperature
    if cfg.top_k:
        kth = scores.topk(min(cfg.top_k, scores.shape[1]), dim=1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=1)
        drop = sorted_scores.softmax(1).cumsum(1) <= 1 - cfg.top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)
    return scores


# ----------------------------------------------------------------------------- decoding loops


def _first_step(
    adapter: DecoderAdapter,
    state: dict,
    batch: int,
    copies: int,
    cfg: GenerationConfig,
    device: torch.device,
):
    """Run the start token once per input, then copy the state to ``copies`` rows per input."""
    prefix = torch.full((batch, 1), adapter.start_token_id, dtype=torch.long, device=device)
    logits = adapter.logits(state, prefix, cfg.use_cache)
    expand = torch.arange(batch, device=device).repeat_interleave(copies)
    return adapter.reorder(state, expand), logits[expand], prefix[expand]


def _greedy_or_sample(adapter, state, batch, cfg, device):
    copies = cfg.num_return_sequences
    n, steps = batch * copies, cfg.max_new_tokens
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    state, logits, prefix = _first_step(adapter, state, batch, copies, cfg, device)
    ids = torch.full((n, steps), adapter.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, steps, device=device)
    lengths = torch.full((n,), steps, dtype=torch.long, device=device)
    alive = torch.arange(n, device=device)  # output row of each state row
    for step in range(steps):
        if step:
            logits = adapter.logits(state, prefix, cfg.use_cache)
        logits = logits.float()
        scores = _process(logits, prefix, step, cfg, adapter)
        if cfg.strategy == "sample":
            probs = _warp(scores, cfg).softmax(1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(1)
        ids[alive, step] = token
        logprobs = logprobs.index_put(
            (alive, torch.full_like(alive, step)),
            logits.log_softmax(1).gather(1, token[:, None]).squeeze(1),
        )
        prefix = torch.cat([prefix, token[:, None]], 1)
        done = token == adapter.eos_token_id
        if done.any():  # finished rows leave the batch: they cost no further compute
            lengths[alive[done]] = step + 1
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            state, prefix, alive = adapter.reorder(state, keep), prefix[keep], alive[keep]
    return ids, logprobs, lengths, None


def _beam_search(adapter, state, batch, cfg, device):
    k, steps, lp = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    state, logits, seqs = _first_step(adapter, state, batch, k, cfg, device)
    rows = torch.arange(batch, device=device)[:, None]
    run_scores = torch.zeros(batch, k, device=device)
    run_scores[:, 1:] = _UNREACHABLE  # only the first beam's continuations at step one
    run_lp = torch.zeros(batch * k, 0, device=device)
    pad = adapter.pad_token_id
    fin_ids = torch.full((batch, k, steps), pad, dtype=torch.long, device=device)
    fin_lp = torch.zeros(batch, k, steps, device=device)
    fin_len = torch.zeros(batch, k, dtype=torch.long, device=device)
    fin_scores = torch.full((batch, k), _UNREACHABLE, device=device)
    fin_flag = torch.zeros(batch, k, dtype=torch.bool, device=device)
    undecided = torch.ones(batch, dtype=torch.bool, device=device)  # better hypotheses possible
    in_top_k = torch.arange(2 * k, device=device) < k
    for step in range(steps):
        if step:
            logits = adapter.logits(state, seqs, cfg.use_cache)
        logp = logits.float().log_softmax(1)
        vocab = logp.shape[1]
        scores = _process(logp, seqs, step, cfg, adapter) + run_scores.view(-1, 1)
        top_scores, top_idx = scores.view(batch, k * vocab).topk(2 * k, dim=1)
        src = rows * k + top_idx // vocab  # [B, 2K] flat source row
        token = top_idx % vocab
        hits = (token == adapter.eos_token_id) | (step == steps - 1)
        cand_lp = torch.cat([run_lp[src], logp[src, token][..., None]], 2)  # [B, 2K, step+1]

        # finished hypotheses: only the top K candidates may enter the pool
        new_fin = hits & in_top_k
        cand_fin = top_scores / ((step + 1) ** lp)
        if cfg.early_stopping:
            cand_fin = cand_fin + fin_flag.all(1, keepdim=True) * _UNREACHABLE
        cand_fin = cand_fin + (~undecided[:, None]) * _UNREACHABLE + (~new_fin) * _UNREACHABLE
        cand_ids = torch.cat([seqs[src][..., 1:], token[..., None]], 2)
        grow = steps - step - 1
        merged_scores = torch.cat([fin_scores, cand_fin], 1)
        best = merged_scores.topk(k, dim=1).indices
        fin_scores = merged_scores.gather(1, best)
        fin_flag = torch.cat([fin_flag, new_fin], 1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(token, step + 1)], 1).gather(1, best)
        fin_ids = _gather3(torch.cat([fin_ids, F.pad(cand_ids, (0, grow), value=pad)], 1), best)
        fin_lp = _gather3(torch.cat([fin_lp, F.pad(cand_lp, (0, grow))], 1), best)

        # running beams: the best K candidates that did not finish
        run_cand = top_scores + hits * _UNREACHABLE
        run_scores, pick = run_cand.topk(k, dim=1)
        src_pick = src.gather(1, pick).view(-1)
        seqs = torch.cat([seqs[src_pick], token.gather(1, pick).view(-1, 1)], 1)
        run_lp = _gather3(cand_lp, pick).view(batch * k, -1)
        if step == steps - 1:
            break
        state = adapter.reorder(state, src_pick)

        # transformers' early-stop heuristic (early_stopping=False): can a running beam still win?
        best_possible = run_scores[:, 0] / ((step + 1) ** lp)
        worst_fin = torch.where(
            fin_flag.all(1), fin_scores.min(1).values, torch.full_like(best_possible, _UNREACHABLE)
        )
        undecided = undecided & (best_possible > worst_fin)
        if not undecided.any() or (cfg.early_stopping and bool(fin_flag.all())):
            break
    r = cfg.num_return_sequences
    return (
        fin_ids[:, :r].reshape(batch * r, steps),
        fin_lp[:, :r].reshape(batch * r, steps),
        fin_len[:, :r].reshape(-1),
        fin_scores[:, :r].reshape(-1),
    )


def _gather3(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j], :]`` for ``x [B, S, T]``, ``index [B, J]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


def generate(adapter: DecoderAdapter, inputs: Any, cfg: GenerationConfig) -> GenerationOutput:
    """Generate captions for a batch of inputs (images / memory tokens / encoder states, whatever
    the adapter's ``prepare`` takes). See :class:`GenerationConfig` and :class:`GenerationOutput`."""
    if adapter.max_positions is not None and 1 + cfg.max_new_tokens > adapter.max_positions:
        raise ValueError(
            f"max_new_tokens={cfg.max_new_tokens} plus the start token exceeds the decoder's "
            f"context of {adapter.max_positions} positions"
        )
    with torch.no_grad():
        state = adapter.prepare(inputs)
        memory = state["memory"]
        batch, device = memory.shape[0], memory.device
        if cfg.strategy == "beam":
            ids, logprobs, lengths, seq_scores = _beam_search(adapter, state, batch, cfg, device)
        else:
            ids, logprobs, lengths, seq_scores = _greedy_or_sample(
                adapter, state, batch, cfg, device
            )
    width = int(lengths.max())
    ids, logprobs = ids[:, :width], logprobs[:, :width]
    return GenerationOutput(ids, logprobs, lengths, adapter.decode(ids, lengths), seq_scores)


def sequence_logprobs(
    adapter: DecoderAdapter, memory: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """float32 log-probabilities ``[N, T]`` of generated rows ``ids [N, T]`` (``lengths [N]``
    tokens each, EOS included; 0 after) given the inputs' ``memory [B, ...]`` (what the adapter's
    ``prepare`` makes of the inputs; rows input-major, ``N / B`` per input): what
    :func:`generate` returned as ``logprobs``, with gradients, from one teacher-forced forward.

    One call of the decoder's modules whatever the rows' lengths: under ZeRO-3 every rank makes
    the same sequence of module calls (no rank waits in a gather another rank never starts) and
    DeepSpeed's hooks gather each module's weights once in forward and once in backward, where
    sampling with gradients would run them once per generated token."""
    rows = torch.arange(memory.shape[0], device=memory.device)
    memory = memory.index_select(0, rows.repeat_interleave(ids.shape[0] // memory.shape[0]))
    start = torch.full_like(ids[:, :1], adapter.start_token_id)
    # the last token is never a prefix (EOS or the length limit): T positions predict T tokens
    logits = adapter.sequence_logits(memory, torch.cat([start, ids[:, :-1]], 1))
    logprobs = logits.float().log_softmax(-1).gather(2, ids[..., None]).squeeze(2)
    after_end = torch.arange(ids.shape[1], device=ids.device)[None] >= lengths[:, None]
    return logprobs.masked_fill(after_end, 0.0)


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """Under ZeRO-3 each rank holds a slice of every parameter (0 elements outside a gather), and
    the adapters read weights and sizes directly: gather the model once and lift DeepSpeed's
    fetch/release hooks for the generation (DeepSpeed's own helper for generation inside
    training). Other stages: nothing to do.

    Every parameter leaves the context as it entered: DeepSpeed's helper partitions all of them on
    exit, and the ones that were whole on entry are gathered again. The step's backward needs
    them whole: a weight read outside its own module's forward (``MultiheadAttention`` reads its
    ``out_proj`` weights, BiMAC its ``logit_scale``) is fetched in backward only if it was
    partitioned when first read, which registers it with the reading module. In a fresh run
    ZeRO-3 starts partitioned, so that happens; after a checkpoint load the small persistent
    parameters start whole (DeepSpeed gathers them at the end of ``load_checkpoint``), are never
    registered, and a partitioned one would reach the backward with 0 elements."""
    if getattr(model, "zero_optimization_stage", lambda: 0)() != 3:
        yield model
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    # the same list, in the same order, on every rank (the gather is a collective)
    whole = sorted(
        (p for p in model.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE),
        key=lambda p: p.ds_id,
    )
    with unwrap_model_for_generation(model) as unwrapped:
        yield unwrapped
    if whole:
        whole[0].all_gather(param_list=whole)
