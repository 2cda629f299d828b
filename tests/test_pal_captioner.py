"""PAL captioner: gradient reach, label format, cross-attention, save/load, and
``python -m finetune.caption_bn`` (tiny config) on the embedded world's triplets: its loss, its
captions and scores, and the real-synthetic gap of PAL Fig. 3 before and after."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bimac.config import load_config
from bimac.data.world import make_sample
from bimac.data.writer import write_shards
from bimac.models.pal_captioner import PALCaptioner, world_bengali_corpus
from bimac.tasks.caption_bn import CaptionBnConfig, CaptionBnTask

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/finetune/caption_bn/tiny.yaml"
# least relative shrink of the real-synthetic centroid gap after the tiny run (measured
# 2026-11-27: 0.209 -> 0.159, -24 %; MMD-RBF 0.064 -> 0.035); a model compared with itself gives 0
GAP_DROP = 0.10
# Bengali block plus the danda sentence marks (U+0964/5) and zero-width (non-)joiners.
BENGALI = re.compile(
    r"^[\u0980-\u09FF\u0964\u0965\u200c\u200d\s]*[\u0980-\u09FF][\u0980-\u09FF\u0964\u0965\u200c\u200d\s]*$"
)


def _image(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def world_batch(model: PALCaptioner, indices) -> dict:
    """A triplet batch (docs/contracts.md) straight from the embedded world's samples."""
    samples = [make_sample(0, "train", i, 64, triplet=True) for i in indices]
    return {
        "image": torch.stack([_image(s["jpg"]) for s in samples]),
        "image_syn": torch.stack([_image(s["syn.jpg"]) for s in samples]),
        "text_bn": model.tokenize([s["bn.txt"] for s in samples]),
    }


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    return CaptionBnTask(load_config(CaptionBnConfig, CONFIG, ["model.unfreeze=[[0, 1], [5, -1]]"]))


def test_labels_are_mbart50_targets_and_shift_starts_with_eos(task):
    model = task.build_model()
    labels = model.tokenize(["একটি লাল বৃত্ত।", "দুটি নীল বর্গ আছে।"])
    assert (labels[:, 0] == model.lang_id).all()  # bn_IN first: the code the decoder must emit
    assert (labels == model.eos_id).sum(1).tolist() == [1, 1]
    inputs = model.shift_right(labels)
    assert (inputs[:, 0] == model.eos_id).all() and torch.equal(inputs[:, 1:], labels[:, :-1])
    assert model.tokenizer.decode(labels[0], skip_special_tokens=True) == "একটি লাল বৃত্ত।"


def test_frozen_tower_gets_no_gradient_and_stays_in_eval_mode():
    """``model.train_vision: false`` (PAL's frozen MaxViT, ``paper.yaml``): no gradient reaches
    the tower and it stays in eval mode whatever the captioner's mode."""
    cfg = load_config(CaptionBnConfig, CONFIG, ["model.train_vision=false"])
    task = CaptionBnTask(cfg)
    model = task.build_model()
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.train()
    assert not model.vision.trunk.training
    sum(task.losses(model, world_batch(model, range(4)))[0].values()).backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None for p in model.bridge.parameters())


def test_gradients_reach_tower_bridge_and_unfrozen_layers(task):
    """The tiny config trains its random tower (``model.train_vision: true``) with the bridge and
    the decoder layers the unfreezing schedule has opened."""
    model = task.build_model()
    batch = world_batch(model, range(4))
    model.train()
    assert model.vision.trunk.training
    terms, _ = task.losses(model, batch)  # step 0: only the top decoder layer trains
    assert set(terms) == {"ce", "pal", "info_nce", "ot"}
    sum(terms.values()).backward()
    layers = model.decoder.layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.bridge.parameters())
    assert all(p.grad is not None for p in layers[-1].parameters())
    assert all(p.grad is None for p in layers[0].parameters())
    assert model.decoder.embed_tokens.weight.grad is None
    tower = [*model.vision.trunk.stem.parameters(), *model.vision.trunk.stages.parameters()]
    assert all(p.grad is not None for p in tower) and sum(p.grad.abs().sum() for p in tower) > 0
    # From step 5 on, the whole decoder trains (the schedule counts optimizer steps).
    model.zero_grad(set_to_none=True)
    model.num_updates.fill_(5)
    sum(task.losses(model, batch)[0].values()).backward()
    assert all(p.grad is not None for p in layers[0].parameters())
    assert model.decoder.embed_tokens.weight.grad is not None


def test_cross_attentions_need_eager_attention(task):
    model = task.build_model()
    batch = world_batch(model, range(2))
    memory = model.encode(batch["image"])
    _, cross = model.decode(memory, batch["text_bn"], output_attentions=True)
    assert len(cross) == 2 and cross[0].shape[-1] == memory.shape[1]
    torch.testing.assert_close(cross[-1].sum(-1), torch.ones_like(cross[-1].sum(-1)))
    model.mbart.set_attn_implementation("sdpa")  # SDPA returns no maps: a clear error, not None
    with pytest.raises(RuntimeError, match="eager"):
        model.decode(memory, batch["text_bn"], output_attentions=True)


def test_save_and_load_round_trip(task, tmp_path):
    model = task.build_model().eval()
    batch = world_batch(model, range(2))
    model.save_pretrained(tmp_path / "export")
    loaded = PALCaptioner.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        a = model(batch["image"], batch["text_bn"])["logits"]
        b = loaded(batch["image"], batch["text_bn"])["logits"]
    torch.testing.assert_close(a, b)


def test_world_vocabulary_keeps_every_word_whole(task):
    """The world's Bengali words are one piece each (they were 5-7 characters before the word
    lines were added to SentencePiece's training text), and decoding restores the caption."""
    captions = world_bengali_corpus(200)
    words = {w.strip("।") for c in captions for w in c.split()}
    split = {w: task.tokenizer.tokenize(w) for w in words if len(task.tokenizer.tokenize(w)) != 1}
    assert not split, split
    ids = task.tokenizer(text_target=captions[:50])["input_ids"]
    assert task.tokenizer.batch_decode(ids, skip_special_tokens=True) == captions[:50]
    assert max(len(i) for i in ids) <= 16  # bn_IN + ~11 words + danda + </s>, far below max_length


def test_skip_counts_run_across_epochs(task, tmp_path, monkeypatch):
    """One triplet without its synthetic image, read in two epochs: counted twice."""
    samples = [make_sample(0, "train", i, 64, triplet=True) for i in range(6)]
    del samples[2]["syn.jpg"]
    write_shards(samples, tmp_path, shard_size=6)
    monkeypatch.setattr(task.cfg.data, "train_shards", str(tmp_path / "00000.tar"))
    for epoch in (0, 1):
        # 5 good samples do not fill one global step of 16: the epoch is their tail
        assert list(task.build_train_loader(0, 1, epoch, None)) == []
    assert task.skipped_counts() == {"missing_syn_image": 2, "epoch_tail": 10}


def _glued(word: str, vocabulary: set[str]) -> bool:
    return any(word[:i] in vocabulary and word[i:] in vocabulary for i in range(1, len(word)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """``python -m finetune.caption_bn`` (tiny config, 150 steps) on 64 train / 32 held-out world
    triplets: its folders, exit status and output."""
    from shards.world import build

    root = tmp_path_factory.mktemp("caption_bn")
    for split, n in (("train", 64), ("val", 32)):
        build(root / split, split, n, 64, triplets=True, shard_size=64)
    out = root / "run"
    cmd = [sys.executable, "-m", "finetune.caption_bn", "--config", CONFIG,
           f"data.train_shards={root}/train/00000.tar",
           f"data.val_shards={root}/val/00000.tar", f"train.output_dir={out}",
           "train.max_steps=150", "train.epochs=1000", "train.progress_bar=false",
           "train.wandb=disabled", "eval.max_samples=32", "eval.meteor=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    return {"root": root, "out": out, "proc": proc}


@pytest.mark.slow
def test_finetune_caption_bn_entry_point_lowers_ce_and_writes_scores_of_its_captions(trained):
    """The run exits 0 with the metric table on stdout; its CE (metrics.jsonl, every step) ends
    below 0.75 of where it started; the captions are Bengali made of the world's words (no two
    glued together, no doubled vowel sign), and eval_bn.json's BLEU-1..4 equal pycocoevalcap's
    BLEU (the COCO reference implementation) on the captions it lists (1e-6), against all five
    of each image's world captions, and "(1 ref)" against the trained caption alone."""
    from pycocoevalcap.bleu.bleu import Bleu

    from bimac.metrics.text import normalize_bn

    proc, out = trained["proc"], trained["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| n | references | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |" in proc.stdout
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(log[0]["losses"]) == {"ce", "pal", "info_nce", "ot"}
    ce = [r["losses"]["ce"] for r in log]
    assert len(ce) == 150 and np.mean(ce[-10:]) < 0.75 * np.mean(ce[:10]), ce
    result = json.loads((out / "eval_bn.json").read_text())
    scores, rows = result["scores"], result["captions"]
    assert scores["images"] == len(rows) == 32 and scores["references"] == 5
    vocabulary = {w.strip("।") for c in world_bengali_corpus(200) for w in c.split()}
    words = [c.replace("।", " ").split() for _, c, _ in rows]
    assert sum(len(w) >= 3 for w in words) >= len(rows) // 2, rows  # sentences, not just "।"
    for (_, caption, _), caption_words in zip(rows, words):
        assert not caption_words or BENGALI.match(caption), caption
        assert not re.search("([\u09be-\u09cc])\\1", caption), caption  # doubled vowel sign
        assert not [w for w in caption_words if w not in vocabulary and _glued(w, vocabulary)]
    every = [make_sample(0, "val", int(sid.rsplit("#", 1)[1]))["json"]["captions_bn"] for sid, _, _ in rows]  # fmt: skip
    assert [refs[0] for refs in every] == [r for _, _, r in rows]  # bn.txt is caption 0
    candidates = {i: [normalize_bn(c)] for i, (_, c, _) in enumerate(rows)}
    for suffix, references in (("", every), (" (1 ref)", [refs[:1] for refs in every])):
        bleu, _ = Bleu(4).compute_score(
            {i: [normalize_bn(r) for r in refs] for i, refs in enumerate(references)},
            candidates,
            verbose=0,
        )
        for k in range(4):
            assert scores[f"BLEU-{k + 1}{suffix}"] == pytest.approx(100 * bleu[k], abs=1e-6)
    assert "METEOR" not in scores


@pytest.mark.slow
def test_eval_only_into_a_new_folder_gives_the_runs_scores(trained, tmp_path):
    """``--eval-only EXPORT`` with a ``train.output_dir`` no training made (it used to end in a
    FileNotFoundError traceback) writes the run's own scores and captions: beam search on the
    exported captioner is deterministic."""
    assert trained["proc"].returncode == 0, trained["proc"].stderr[-3000:]
    export = json.loads((trained["out"] / "summary.json").read_text())["export"]
    out = tmp_path / "new" / "eval"
    cmd = [sys.executable, "-m", "finetune.caption_bn", "--config", CONFIG, "--eval-only", export,
           f"data.train_shards={trained['root']}/train/00000.tar",
           f"data.val_shards={trained['root']}/val/00000.tar", f"train.output_dir={out}",
           "eval.max_samples=32", "eval.meteor=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "eval_bn.json").read_text()) == json.loads((trained["out"] / "eval_bn.json").read_text())  # fmt: skip


@pytest.mark.slow
def test_pal_training_narrows_the_real_synthetic_gap(trained, tmp_path):
    """PAL Fig. 3 (bottom) on the run above: ``python -m bimac.analysis.pal_projection`` compares
    the exported captioner with the model it started from (``--before init``) on the 32 held-out
    triplets. Training with PAL (+ InfoNCE + OT) pulls the attended real and synthetic
    descriptors together: the centroid gap shrinks by more than GAP_DROP (the paper: -41 %)."""
    assert trained["proc"].returncode == 0, trained["proc"].stderr[-3000:]
    export = json.loads((trained["out"] / "summary.json").read_text())["export"]
    cmd = [sys.executable, "-m", "bimac.analysis.pal_projection", "--after", export,
           "--config", CONFIG, "--shards", f"{trained['root']}/val/00000.tar", "--n", "32",
           "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "pal_projection.json").read_text())
    assert stats["n"] == 32 and (tmp_path / "pal_projection.png").stat().st_size > 0
    before, after = stats["before"], stats["after"]
    assert after["centroid_distance"] < (1 - GAP_DROP) * before["centroid_distance"], stats
    assert after["mmd_rbf"] < before["mmd_rbf"], stats


@pytest.mark.slow
def test_loader_workers_of_the_entry_point_do_not_import_its_libraries_again(tmp_path):
    """``python -m finetune.caption_bn`` with a loader worker over 3 short epochs: transformers is
    imported by the trainer and once by the loader's fork server, never by a worker (each used to
    import the entry module's libraries again, ~5 CPU-s and seconds of wall time per worker at
    every epoch boundary). Reference: Python's own import log (``-X importtime``, every process
    under the trainer writes it to the shared stderr)."""
    from shards.world import build

    for split, n in (("train", 64), ("val", 16)):
        build(tmp_path / split, split, n, 64, triplets=True, shard_size=64)
    cmd = [sys.executable, "-X", "importtime", "-m", "finetune.caption_bn", "--config", CONFIG,
           f"data.train_shards={tmp_path}/train/00000.tar", f"data.val_shards={tmp_path}/val/00000.tar",
           f"train.output_dir={tmp_path}/run", "data.num_workers=1", "train.max_steps=12",
           "train.epochs=1000", "train.progress_bar=false", "eval.max_samples=16",
           "eval.meteor=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    epochs = {r["epoch"] for r in records if "epoch" in r}
    assert len(epochs) >= 3, epochs  # 64 samples, batch 16: 4 steps an epoch
    imports = [line for line in proc.stderr.splitlines() if line.rsplit("|", 1)[-1].strip() == "transformers"]  # fmt: skip
    assert len(imports) == 2, imports
