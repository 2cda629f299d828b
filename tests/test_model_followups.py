"""BiMAC follow-ups: activation checkpointing, bf16 weights, RF against all reference captions."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip.transformer
import pytest
import torch

import bimac.generation
import bimac.models.bimac
from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from bimac.data.tokenizer import save_world_tokenizer, strip_special
from bimac.data.world import make_sample
from bimac.data.writer import write_shards
from bimac.tasks.pretrain import ObjectiveConfig, PretrainTask

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `pretrain` entry-point package
sys.path.insert(0, str(Path(__file__).parent))
from test_model_bimac import SMALL, TOK, make_batch  # noqa: E402

FULL = ObjectiveConfig(rf=True, rf_max_new_tokens=5)  # every objective, RF included
CORPUS = [[[5, 6, 7]], [[8, 9]], [[5, 9, 10, 11]]]


def _task(objectives: ObjectiveConfig = FULL) -> PretrainTask:
    return PretrainTask(SMALL, objectives, tokenizer=TOK, reward_corpus=CORPUS)


# -- 1. activation checkpointing -----------------------------------------------------------------


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    terms, _ = _task().losses(model, batch)
    sum(terms.values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_gradients_and_is_non_reentrant(monkeypatch):
    calls: list[tuple[str, object]] = []

    def recording(where, original):
        def wrapped(fn, *args, **kwargs):
            calls.append((where, kwargs.get("use_reentrant")))
            return original(fn, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(
        open_clip.transformer,
        "checkpoint",
        recording("open_clip", open_clip.transformer.checkpoint),
    )
    monkeypatch.setattr(
        bimac.models.bimac, "checkpoint", recording("patch_decoder", bimac.models.bimac.checkpoint)
    )
    torch.manual_seed(0)
    model = _task().build_model().double()  # float64: recomputation must reproduce exactly
    batch = make_batch()
    plain = _grads(model, batch)
    assert not calls
    model.set_grad_checkpointing(True)
    ckpt = _grads(model, batch)
    # one block each in the image, text and patch decoder; self + cross attention in D_txt;
    # all non-reentrant (reentrant checkpointing breaks on modules used twice)
    assert sorted(calls) == sorted(
        [("open_clip", False)] * 4 + [("patch_decoder", False)] * SMALL.patch_decoder_layers
    )
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for name in plain:  # tolerance: float64 recomputation of the same kernels
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)
    calls.clear()
    model.set_grad_checkpointing(False)
    _grads(model, batch)
    assert not calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: DeepSpeed casts the weights
def test_engine_runs_two_steps_with_activation_checkpointing(tmp_path, precision):
    from test_engine_pretrain import world_overrides

    overrides = [
        *world_overrides(tmp_path / "world"), "train.activation_checkpointing=true",
        f"train.precision={precision}",
        "train.max_steps=2", "train.warmup_steps=1", "train.global_batch_size=4",
        "train.micro_batch_size=4", "objectives.rf_corpus_batches=2",
        f"train.output_dir={tmp_path / 'run'}", "train.export_at_end=false",
    ]  # fmt: skip
    marker = tmp_path / "checkpointing.json"
    script = f"""
import json, sys
from bimac.models.bimac import BiMAC
original = BiMAC.set_grad_checkpointing
def recording(self, enable=True):
    open({str(marker)!r}, "a").write(json.dumps(enable) + "\\n")
    original(self, enable)
BiMAC.set_grad_checkpointing = recording
from pretrain import run_pretraining
r = run_pretraining({str(REPO / "configs/pretrain/tiny.yaml")!r}, sys.argv[1:])
open({str(tmp_path / "history.json")!r}, "w").write(json.dumps([h["losses"] for h in r.history]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script, *overrides],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert marker.read_text().split() == ["true"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 2
    assert set(history[0]) == {"mcl", "cg", "grounding", "reconstruction"}
    assert all(np.isfinite(v) for step in history for v in step.values())


# -- 2. bf16 weights -------------------------------------------------------------------------------


def _params_to(model, dtype):
    """DeepSpeed bf16 / fp16: parameters cast, buffers kept (no autocast)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


@pytest.mark.parametrize(
    ("dtype", "cast", "rel"),
    # tolerance: float32 losses on low-precision activations; bf16 keeps 8 mantissa bits, fp16 11
    [(torch.bfloat16, "module", 3e-2), (torch.bfloat16, "params_only", 3e-2),
     (torch.float16, "params_only", 5e-3)],
)  # fmt: skip
def test_low_precision_weights_run_every_objective_close_to_fp32(dtype, cast, rel):
    torch.manual_seed(0)
    no_rf = dataclasses.replace(FULL, rf=False)
    model = _task(no_rf).build_model()
    batch = make_batch()
    ref, _ = _task(no_rf).losses(model, batch)
    model = model.to(dtype) if cast == "module" else _params_to(model, dtype)
    assert model.normalize(batch["image"]).dtype == dtype
    got, _ = _task(no_rf).losses(model, batch)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(ref[k].item(), rel=rel), k
    terms, metrics = _task().losses(model, batch)  # RF: greedy generation in low precision
    assert np.isfinite(metrics["rf_cider"])
    sum(terms.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 20
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


# -- 3. RF against every reference caption ------------------------------------------------------------


def _refs(b: int, seed: int = 0) -> list[list[list[int]]]:
    """Five distinct reference captions per image (token ids, no specials)."""
    g = np.random.default_rng(seed)
    return [[g.integers(3, SMALL.vocab_size, size=6).tolist() for _ in range(5)] for _ in range(b)]


def test_reward_of_a_non_first_reference_is_higher_with_all_references(monkeypatch):
    b = 4
    refs = _refs(b)
    batch = make_batch(b)
    text = torch.full_like(batch["text"], TOK.pad_id)  # the batch's caption is reference 0
    for i, r in enumerate(refs):
        text[i, : len(r[0]) + 2] = torch.tensor([TOK.bos_id, *r[0], TOK.eos_id])
    batch["text"] = text
    greedy = torch.full((b, 8), TOK.pad_id)  # the model "generates" reference 3
    for i, r in enumerate(refs):
        greedy[i, : len(r[3]) + 1] = torch.tensor([*r[3], TOK.eos_id])
    monkeypatch.setattr(
        bimac.generation,
        "generate",
        lambda *a, **k: dataclasses.make_dataclass("G", ["ids"])(greedy),
    )
    torch.manual_seed(0)
    model = _task().build_model()
    corpus = refs + _refs(8, seed=1)
    rewards = {}
    for with_refs in (False, True):
        task = PretrainTask(SMALL, FULL, tokenizer=TOK, reward_corpus=corpus)
        _, metrics = task.losses(model, batch | ({"references": refs} if with_refs else {}))
        rewards[with_refs] = metrics["rf_cider"]
    # an exact match of one of 5 references scores well above a random caption vs reference 0
    assert rewards[True] > rewards[False] + 1.0, rewards
    assert rewards[False] < 0.5


def test_reward_corpus_from_the_loader_uses_all_references():
    refs = _refs(3)
    batches = [{"text": torch.zeros(3, 4, dtype=torch.long), "references": refs}] * 2
    task = PretrainTask(
        SMALL, FULL, tokenizer=TOK, loader_factory=lambda *a: iter(batches)
    )  # fmt: skip
    assert task._corpus_from_loader() == refs + refs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = save_world_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return build_tokenizer(TokenizerConfig(kind="world", path=str(path), context_length=32))


def test_loader_adds_every_caption_as_references(tmp_path, tok):
    n = 6
    write_shards((make_sample(0, "train", i, 64) for i in range(n)), tmp_path, shard_size=n)
    cfg = DataConfig(train_shards=str(tmp_path / "00000.tar"), batch_size=n, shuffle_buffer=0)
    (plain,) = make_loader(cfg, tok, rank=0, world_size=1)
    assert "references" not in plain
    for lang in ("en", "bn"):
        c = dataclasses.replace(cfg, references=True, caption_lang=lang)
        (batch,) = make_loader(c, tok, rank=0, world_size=1)
        texts = strip_special(batch["text"], tok.bos_id, tok.eos_id, tok.pad_id)
        for i, sid in enumerate(batch["sample_id"]):
            meta = make_sample(0, "train", int(sid.split("#")[1]), 64)["json"]
            caps = meta[f"captions_{lang}"]
            want = strip_special(tok.encode(caps), tok.bos_id, tok.eos_id, tok.pad_id)
            assert batch["references"][i] == want and len(want) == 5
            assert all(tok.bos_id not in r and tok.eos_id not in r and r for r in want)
            assert texts[i] in want  # the drawn caption is one of its image's references


def test_loader_references_fall_back_to_the_own_caption(tmp_path, tok):
    samples = [{"__key__": f"{i:03d}", "jpg": make_sample(0, "train", i, 64)["jpg"],
                "txt": f"a red circle number {i}".encode()} for i in range(3)]  # fmt: skip
    write_shards(samples, tmp_path, shard_size=3)
    cfg = DataConfig(
        train_shards=str(tmp_path / "00000.tar"), batch_size=3, shuffle_buffer=0, references=True
    )
    (batch,) = make_loader(cfg, tok, rank=0, world_size=1)
    own = strip_special(batch["text"], tok.bos_id, tok.eos_id, tok.pad_id)
    assert batch["references"] == [[r] for r in own]


def test_rf_turns_on_loader_references():
    from bimac.tasks.pretrain import load_pretrain_config

    tiny = REPO / "configs/pretrain/tiny.yaml"
    assert load_pretrain_config(tiny, ["objectives.rf=true"]).data.references
    assert not load_pretrain_config(tiny, ["objectives.rf=false"]).data.references
