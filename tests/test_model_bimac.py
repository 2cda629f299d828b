"""BiMAC model (bimac.models.bimac) and the pretraining task's objective switches."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bimac.config import ConfigError, load_config
from bimac.losses import caption_loss
from bimac.models.bimac import BiMAC, BiMACConfig, load_model_config, patchify, pool_spans
from bimac.tasks.pretrain import ObjectiveConfig, PretrainTask

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `pretrain` entry-point package (not installed as a module)

TOK = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2, vocab_size=50)
SMALL = BiMACConfig(
    embed_dim=16, image_size=16, patch_size=4, vision_width=32, vision_layers=1, vision_head_width=16,
    text_width=32, text_layers=1, text_heads=2, decoder_layers=1, context_length=12, vocab_size=50,
    grounding_dim=16, patch_decoder_width=32, patch_decoder_layers=1, patch_decoder_heads=2,
)  # fmt: skip
ALL_NO_RF = ObjectiveConfig(rf=False)


def make_batch(b: int = 4, cfg: BiMACConfig = SMALL, seed: int = 0) -> dict:
    """A hand-built batch in the loader's format (docs/contracts.md "Batch")."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, cfg.vocab_size, (b, cfg.context_length), generator=g)
    text[:, 0] = TOK.bos_id
    lengths = [8, 6, 9, 5, 7, 8][:b]
    for i, n in enumerate(lengths):
        text[i, n] = TOK.eos_id
        text[i, n + 1 :] = TOK.pad_id
    spans = torch.tensor([[[1, 3], [4, 5], [0, 0]]] * b)
    mask = torch.tensor([[True, True, False]] * b)
    mask[1] = False  # a caption without nouns
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0]]] * b)
    return {
        "image": torch.randint(
            0, 256, (b, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8
        ),
        "text": text,
        "noun_spans": spans,
        "noun_mask": mask,
        "noun_boxes": boxes,
        "noun_has_box": mask.clone(),
        "sample_id": [f"u#{i}" for i in range(b)],
    }


def test_configs_load_and_paper_is_coca_base_at_256():
    tiny = load_model_config(REPO / "configs/model/tiny.yaml")
    paper = load_model_config(REPO / "configs/model/paper.yaml")
    assert (tiny.image_size, tiny.patch_size, tiny.vision_layers) == (64, 8, 2)
    assert (paper.image_size, paper.vision_width, paper.vision_layers, paper.vocab_size) == (
        256,
        768,
        12,
        49408,
    )
    with pytest.raises(ConfigError):
        load_config(BiMACConfig, None, ["freeze=[eyes]"])


def test_forward_shapes_raw_patch_grid_and_uint8_only():
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        SMALL, embed_dim=32, attentional_pool=True, attn_pooler_queries=6, attn_pooler_heads=2
    )
    model = BiMAC(cfg)
    batch = make_batch(cfg=cfg)
    out = model(batch["image"], batch["text"], batch["noun_spans"], batch["noun_mask"])
    p = cfg.grid**2
    assert out["patch_emb"].shape == (
        4,
        p,
        cfg.grounding_dim,
    )  # the raw grid, not the 6 pooled queries
    assert (
        out["decoder_memory"].shape[1] == 5
    )  # the pooler's queries minus the global one feed D_txt
    assert out["logits"].shape == (4, cfg.context_length - 1, cfg.vocab_size)
    assert (
        out["reconstruction"].shape == out["target_pixels"].shape == (4, p, 3 * cfg.patch_size**2)
    )
    assert (out["matches"][~batch["noun_mask"]] == -1).all()
    emb = model.encode_image(batch["image"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(model.encode_text(batch["text"]).norm(dim=-1), torch.ones(4))
    with pytest.raises(TypeError, match="uint8"):
        model.encode_image(batch["image"].float())


def test_patchify_and_pool_spans_by_hand():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = patchify(img, 2)
    assert patches.shape == (2, 4, 12)
    # patch 1 = rows 0-1, cols 2-3; pixel (0, 2) channel 0 first, then channel 1 of that pixel
    assert patches[0, 1, :3].tolist() == [img[0, 0, 0, 2], img[0, 1, 0, 2], img[0, 2, 0, 2]]
    tokens = torch.arange(10, dtype=torch.float32).view(1, 5, 2)
    spans = torch.tensor([[[1, 3], [4, 5], [2, 2]]])
    pooled = pool_spans(tokens, spans, torch.tensor([[True, True, True]]))
    assert pooled.tolist() == [[[3.0, 4.0], [8.0, 9.0], [0.0, 0.0]]]  # mean of tokens 1, 2; token 4


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BiMAC(SMALL).eval()
    tok = SimpleNamespace(save=lambda path: Path(path).write_text("{}"))
    model.save_pretrained(tmp_path / "export", tokenizer=tok)
    assert {p.name for p in (tmp_path / "export").iterdir()} == {
        "model.safetensors",
        "config.yaml",
        "tokenizer.json",
    }
    loaded = BiMAC.from_pretrained(tmp_path / "export").eval()
    batch = make_batch()
    torch.testing.assert_close(
        loaded.encode_image(batch["image"]), model.encode_image(batch["image"])
    )
    a = model(batch["image"], batch["text"], batch["noun_spans"], batch["noun_mask"])
    b = loaded(batch["image"], batch["text"], batch["noun_spans"], batch["noun_mask"])
    for key in ("logits", "reconstruction", "noun_emb"):
        torch.testing.assert_close(a[key], b[key])


def _grads(model: BiMAC) -> dict[str, bool]:
    parts = {
        "visual": model.coca.visual,
        "text": model.coca.text,
        "text_decoder": model.coca.text_decoder,
        "patch_decoder": model.patch_decoder,
        "grounding": torch.nn.ModuleList([model.patch_proj, model.noun_proj]),
    }
    return {
        name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
        for name, part in parts.items()
    }


ONLY = {
    "mcl": dict(mcl=True, cg=False, rf=False, git=False, grounding=False),
    "cg": dict(mcl=False, cg=True, rf=False, git=False, grounding=False),
    "grounding": dict(mcl=False, cg=False, rf=False, git=False, grounding=True),
    "reconstruction": dict(mcl=False, cg=False, rf=False, git=True, grounding=False),
}
REACH = {  # which towers each objective trains
    "mcl": {"visual", "text"},
    "cg": {"visual", "text", "text_decoder"},
    "grounding": {"visual", "text", "grounding"},
    # D_p sees text only; Hungarian matches are discrete, so no gradient reaches the image tower
    "reconstruction": {"text", "patch_decoder"},
}


@pytest.mark.parametrize("objective", list(ONLY))
def test_gradients_reach_exactly_the_parts_each_objective_trains(objective):
    torch.manual_seed(0)
    model = PretrainTask(SMALL, ALL_NO_RF).build_model()  # nothing frozen
    terms, _ = PretrainTask(SMALL, ObjectiveConfig(**ONLY[objective])).losses(model, make_batch())
    assert set(terms) == {objective}
    sum(terms.values()).backward()
    reached = {k for k, v in _grads(model).items() if v}
    assert reached == REACH[objective]


def test_frozen_tower_gets_no_gradient():
    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL, freeze=["visual"])
    model = PretrainTask(cfg, ALL_NO_RF).build_model()
    terms, _ = PretrainTask(cfg, ALL_NO_RF).losses(model, make_batch())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.coca.visual.parameters())
    assert _grads(model)["text"] and _grads(model)["patch_decoder"]


def test_build_model_freezes_what_no_active_objective_uses():
    model = PretrainTask(SMALL, ObjectiveConfig(**ONLY["mcl"])).build_model()
    assert not model.coca.logit_scale.requires_grad  # fixed τ = 0.5
    assert not any(p.requires_grad for p in model.coca.text_decoder.parameters())
    assert not any(p.requires_grad for p in model.patch_decoder.parameters())
    learnable = PretrainTask(
        SMALL,
        ObjectiveConfig(mcl=True, cg=False, rf=False, git=False, grounding=False, temperature=None),
    ).build_model()
    assert learnable.coca.logit_scale.requires_grad


@pytest.mark.parametrize("off", ["mcl", "cg", "git", "grounding"])
def test_switching_an_objective_off_removes_exactly_its_term(off):
    torch.manual_seed(0)
    model = PretrainTask(SMALL, ALL_NO_RF).build_model()
    batch = make_batch()
    full, _ = PretrainTask(SMALL, ALL_NO_RF).losses(model, batch)
    part, _ = PretrainTask(SMALL, dataclasses.replace(ALL_NO_RF, **{off: False})).losses(
        model, batch
    )
    name = {"git": "reconstruction"}.get(off, off)
    assert set(full) - set(part) == {name} and set(part) < set(full)
    for k in part:
        if not (off == "grounding" and k == "reconstruction"):  # D_p then sees ungrounded nouns
            torch.testing.assert_close(part[k], full[k], rtol=0, atol=0)


def test_weights_scale_their_terms():
    torch.manual_seed(0)
    model = PretrainTask(SMALL, ALL_NO_RF).build_model()
    batch = make_batch()
    base, _ = PretrainTask(SMALL, ALL_NO_RF).losses(model, batch)
    scaled_cfg = dataclasses.replace(ALL_NO_RF, lambda_cg=2.0, lambda_git=1.4)
    scaled, metrics = PretrainTask(SMALL, scaled_cfg).losses(model, batch)
    torch.testing.assert_close(scaled["cg"], 2 * base["cg"])
    torch.testing.assert_close(scaled["grounding"], 2 * base["grounding"])
    torch.testing.assert_close(scaled["reconstruction"], 2 * base["reconstruction"])
    torch.testing.assert_close(scaled["mcl"], base["mcl"])
    assert 0.0 <= metrics["pointing_game"] <= 1.0


class _FixedScorer:
    def __init__(self, rewards):
        self.rewards = np.asarray(rewards, dtype=np.float64)
        self.calls = []

    def score(self, candidates, references):
        self.calls.append((candidates, references))
        return self.rewards


def test_reward_weighting_uses_greedy_captions_and_refreshes_every_k():
    torch.manual_seed(0)
    model = PretrainTask(SMALL, ALL_NO_RF).build_model()
    batch = make_batch()
    rf_cfg = dataclasses.replace(ALL_NO_RF, rf=True, rf_every=2, rf_max_new_tokens=5)
    task = PretrainTask(SMALL, rf_cfg, tokenizer=TOK)
    task._scorer = _FixedScorer([0.0, 1.0, 2.0, 1.0])
    terms, metrics = task.losses(model, batch)
    out = model(batch["image"], batch["text"], batch["noun_spans"], batch["noun_mask"])
    hand = caption_loss(out["logits"], out["labels"], 0, torch.tensor([0.0, 1.0, 2.0, 1.0]))
    torch.testing.assert_close(terms["cg"], hand)
    assert metrics["rf_cider"] == 1.0
    candidates, references = task._scorer.calls[0]
    assert len(candidates) == 4 and all(len(c) <= 5 for c in candidates)
    assert all(t not in (TOK.bos_id, TOK.eos_id, TOK.pad_id) for c in candidates for t in c)
    assert references[0] == [batch["text"][0, 1:8].tolist()]
    terms2, metrics2 = task.losses(model, batch)  # second call: no refresh, plain CE
    assert "rf_cider" not in metrics2 and len(task._scorer.calls) == 1
    torch.testing.assert_close(terms2["cg"], caption_loss(out["logits"], out["labels"], 0))


def test_reward_with_real_cider_and_training_corpus():
    torch.manual_seed(0)
    model = PretrainTask(SMALL, ALL_NO_RF).build_model()
    batch = make_batch()
    corpus = [[[5, 6, 7]], [[8, 9]], [[5, 9, 10, 11]]]
    task = PretrainTask(
        SMALL, dataclasses.replace(ALL_NO_RF, rf=True), tokenizer=TOK, reward_corpus=corpus
    )
    import bimac.generation
    from bimac.data.tokenizer import strip_special
    from bimac.metrics.cider import CiderD

    greedy = []
    real_generate = bimac.generation.generate

    def recording_generate(*args, **kwargs):
        greedy.append(real_generate(*args, **kwargs))
        return greedy[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bimac.generation, "generate", recording_generate)
        terms, metrics = task.losses(model, batch)
    # rf_cider is CIDEr-D (df from the training corpus) of the greedy captions against each
    # image's reference (its own caption here), recomputed from the recorded greedy ids
    (gen,) = greedy
    candidates = strip_special(gen.ids, TOK.bos_id, TOK.eos_id, SMALL.pad_id)
    references = [[r] for r in strip_special(batch["text"], TOK.bos_id, TOK.eos_id, SMALL.pad_id)]
    expected = np.mean(CiderD(corpus).score(candidates, references))
    assert expected > 0  # a random model still shares words with its references here
    assert metrics["rf_cider"] == pytest.approx(expected, abs=1e-9)
    assert torch.isfinite(terms["cg"])
    with pytest.raises(RuntimeError, match="tokenizer"):
        PretrainTask(SMALL, dataclasses.replace(ALL_NO_RF, rf=True)).losses(model, batch)


def test_objective_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="needs objectives.cg"):
        ObjectiveConfig(cg=False, rf=True)
    with pytest.raises(ValueError):
        ObjectiveConfig(mcl=False, cg=False, rf=False, git=False, grounding=False)


TABLE5 = {  # preset -> the loss terms it trains (RF weights "cg", it adds no term)
    "mcl": ({"mcl"}, False),
    "mcl_cg": ({"mcl", "cg"}, False),
    "mcl_cg_rf": ({"mcl", "cg"}, True),
    "mcl_cg_rf_git": ({"mcl", "cg", "reconstruction"}, True),
    "mcl_cg_git_grounding": ({"mcl", "cg", "reconstruction", "grounding"}, False),
    "full": ({"mcl", "cg", "reconstruction", "grounding"}, True),
}


@pytest.mark.parametrize("preset", list(TABLE5))
def test_table5_presets_are_config_changes(preset):
    from bimac.tasks.pretrain import load_pretrain_config

    objectives = load_pretrain_config(REPO / f"configs/pretrain/ablations/{preset}.yaml").objectives
    terms, rf = TABLE5[preset]
    assert objectives.rf == rf and objectives.lambda_git == 0.7 and objectives.lambda_cg == 1.0
    torch.manual_seed(0)
    task = PretrainTask(SMALL, objectives, tokenizer=TOK)
    task._scorer = _FixedScorer([1.0, 1.0, 1.0, 1.0])
    got, metrics = task.losses(task.build_model(), make_batch())
    assert set(got) == terms and ("rf_cider" in metrics) == rf


def test_table6_presets_only_change_lambda_git():
    from bimac.tasks.pretrain import load_pretrain_config

    full = load_pretrain_config(REPO / "configs/pretrain/ablations/full.yaml").objectives
    for lam in (0.1, 0.4, 0.7, 1.0, 1.5):
        sweep = load_pretrain_config(
            REPO / f"configs/pretrain/ablations/lambda_git_{lam}.yaml"
        ).objectives
        assert sweep == dataclasses.replace(full, lambda_git=lam)


def test_open_clip_checkpoint_file_loads_into_the_towers(tmp_path):
    torch.manual_seed(0)
    source = BiMAC(SMALL)
    path = tmp_path / "coca.pt"
    torch.save(source.coca.state_dict(), path)  # an open_clip checkpoint file of these shapes
    torch.manual_seed(1)
    loaded = BiMAC(dataclasses.replace(SMALL, pretrained=str(path)))
    for (name, a), b in zip(source.coca.state_dict().items(), loaded.coca.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ConfigError, match="neither a file nor an open_clip tag"):
        BiMAC(dataclasses.replace(SMALL, pretrained="no_such_tag"))
