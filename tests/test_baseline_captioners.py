"""PAL Table 1 baselines (``model.architecture=vit_gpt2 | cnn_lstm``): shapes, gradient reach,
decoding through the shared generation loop (cached = uncached = teacher-forced), export round
trip, and ``python -m finetune.caption_bn`` training each one on world triplets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pal_captioner import world_batch

from bimac.config import load_config
from bimac.generation import GenerationConfig, generate, sequence_logprobs
from bimac.models.baseline_captioners import CNNLSTMCaptioner, ViTGPT2Captioner, load_captioner
from bimac.tasks.caption_bn import CaptionBnConfig, CaptionBnTask

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/finetune/caption_bn/tiny.yaml"
CLASSES = {"vit_gpt2": ViTGPT2Captioner, "cnn_lstm": CNNLSTMCaptioner}


@pytest.fixture(scope="module", params=list(CLASSES))
def task(request):
    torch.manual_seed(0)
    cfg = load_config(CaptionBnConfig, CONFIG, [f"model.architecture={request.param}"])
    return CaptionBnTask(cfg)


def test_ce_only_and_gradients_reach_encoder_and_decoder(task):
    """The tiny config builds the named class; the task's only loss is CE on the real images
    (PAL's losses do not apply); it equals cross-entropy of the logits ``[B, T, V]`` over the
    non-pad labels (torch.nn.functional.cross_entropy, 1e-6); every parameter gets a gradient."""
    model = task.build_model()
    assert type(model) is CLASSES[task.cfg.model.architecture]
    batch = world_batch(model, range(4))
    terms, _ = task.losses(model, batch)
    assert set(terms) == {"ce"}
    labels = batch["text_bn"]
    logits = model(batch["image"], labels)["logits"]
    assert logits.shape == (*labels.shape, len(model.tokenizer))
    ref = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=model.pad_id
    )
    assert terms["ce"].detach().item() == pytest.approx(ref.detach().item(), abs=1e-6)
    terms["ce"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # (timm's ResNet zero-initialises each block's last BN scale, so inside the CNN's residual
    # branches the first gradients are exactly zero; the stem's are not)
    first_encoder_weight = next(model.encoder.parameters())
    assert first_encoder_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_decoding_cached_equals_uncached_and_teacher_forced(task, strategy):
    """Through ``bimac.generation.generate``: ``bn_IN`` forced first, the same ids with and
    without the adapter's cache, and the returned log-probabilities equal one teacher-forced
    forward of the generated rows (``sequence_logprobs``, 1e-5)."""
    torch.manual_seed(1)
    model = task.build_model().eval()
    images = world_batch(model, range(3))["image"]
    cfg = GenerationConfig(strategy=strategy, num_beams=3 if strategy == "beam" else 1,
                           max_new_tokens=10)  # fmt: skip
    cached = model.caption(images, cfg)
    uncached = model.caption(images, GenerationConfig(**{**cfg.__dict__, "use_cache": False}))
    assert torch.equal(cached.ids, uncached.ids)
    assert (cached.ids[:, 0] == model.lang_id).all()
    assert len(cached.texts) == 3
    with torch.no_grad():
        adapter = model.adapter()
        out = generate(adapter, model.encode(images), cfg)
        forced = sequence_logprobs(adapter, model.encode(images), out.ids, out.lengths)
    assert torch.allclose(forced, out.logprobs, atol=1e-5)


def test_export_round_trip(task, tmp_path):
    """``save_pretrained`` + ``load_captioner`` (what eval and ``bimac caption`` use): the same
    class and the same logits (exact)."""
    model = task.build_model().eval()
    batch = world_batch(model, range(2))
    model.save_pretrained(tmp_path)
    loaded = load_captioner(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        a = model(batch["image"], batch["text_bn"])["logits"]
        b = loaded(batch["image"], batch["text_bn"])["logits"]
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from shards.world import build

    root = tmp_path_factory.mktemp("baselines")
    for split, n in (("train", 64), ("val", 16)):
        build(root / split, split, n, 64, triplets=True, shard_size=64)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(CLASSES))
def test_entry_point_trains_evaluates_and_exports(world, architecture):
    """``python -m finetune.caption_bn`` (tiny config, 40 steps, greedy evaluation): exit 0, the metric table on
    stdout, CE only in metrics.jsonl and its last 5 steps below 0.8 of its first 5 (measured
    2026-11-27: 0.44 ViT + GPT-2, 0.42 CNN + LSTM), eval_bn.json with BLEU-1..4 for the 16 held-out triplets, and an
    export that ``load_captioner`` reads back as the named architecture."""
    out = world / f"run_{architecture}"
    cmd = [sys.executable, "-m", "finetune.caption_bn", "--config", CONFIG,
           f"model.architecture={architecture}", f"data.train_shards={world}/train/00000.tar",
           f"data.val_shards={world}/val/00000.tar", f"train.output_dir={out}",
           "train.max_steps=40", "train.epochs=100", "train.progress_bar=false",
           "train.log_every=40", "eval.max_samples=16", "eval.meteor=false",
           "eval.num_beams=1", "eval.max_new_tokens=24"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| n | references | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |" in proc.stdout
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {k for r in log for k in r["losses"]} == {"ce"}
    ce = [r["losses"]["ce"] for r in log]
    assert len(ce) == 40 and np.mean(ce[-5:]) < 0.8 * np.mean(ce[:5]), ce
    result = json.loads((out / "eval_bn.json").read_text())
    assert result["scores"]["images"] == len(result["captions"]) == 16
    assert {f"BLEU-{n}" for n in range(1, 5)} <= set(result["scores"])
    assert type(load_captioner(out / "export")) is CLASSES[architecture]
