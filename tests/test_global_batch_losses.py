"""Global-batch losses under gradient accumulation and data parallelism (issue 14, part 1):
the pretraining task's feature cache (``PretrainTask.step_context``, GradCache) makes a step's
loss terms and parameter gradients those of the global batch computed in one piece, whatever the
split into ranks x micro-batches.

Reference: ``PretrainTask.losses(model, global_batch)``, the one-piece loss of the whole global
batch (8 samples, every objective with RF and the learnable logit scale, the tiny BiMAC of
configs/model/tiny.yaml) and its backward. Tolerance: 1e-5 (float32; the pieces only change the
order of the sums).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from global_batch_fixtures import (
    GLOBAL_BATCH,
    engine_step,
    global_batch,
    make_task,
    objectives,
    one_piece,
    rank_worker,
    rows,
)
from test_engine_pretrain import world_overrides

REPO = Path(__file__).resolve().parents[1]

TOL = {"rtol": 1e-5, "atol": 1e-5}
# the step metrics that are global values, not sums (compared as they are)
STEP_METRICS = ("loss_mcl", "loss_grounding", "grounding_pos", "grounding_nouns", "rf_cider")


@pytest.fixture(scope="module")
def reference():
    return one_piece(objectives(), global_batch())


def _assert_matches_reference(got, reference):
    grads, terms, metrics = got
    ref_grads, ref_terms, ref_metrics = reference
    for name in ("mcl", "cg", "grounding", "reconstruction", "loss_cg", "loss_reconstruction"):
        expected = ref_terms[name] if name in ref_terms else ref_metrics[name]
        torch.testing.assert_close(terms[name], expected, **TOL, msg=name)
    for name in (*STEP_METRICS, "pointing_game"):
        torch.testing.assert_close(metrics[name], ref_metrics[name], **TOL, msg=name)
    assert set(grads) == set(ref_grads)
    assert "coca.logit_scale" in grads and "grounding_logit_bias" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_accumulation_gives_the_global_batch_losses_and_gradients(accumulation, reference):
    batch, n = global_batch(), GLOBAL_BATCH // accumulation
    micro = [rows(batch, i * n, (i + 1) * n) for i in range(accumulation)]
    _assert_matches_reference(engine_step(objectives(), micro), reference)


def test_per_micro_batch_losses_differ_from_the_global_ones(reference):
    """What the feature cache replaces: the mean of per-micro-batch losses (4 micro-batches,
    negatives and means within each) is measurably another loss, so the tests above can fail."""
    batch, task = global_batch(), make_task(objectives())
    torch.manual_seed(0)
    model = task.build_model()
    parts = [task.losses(model, rows(batch, 2 * i, 2 * i + 2))[0] for i in range(4)]
    for name in ("mcl", "cg", "grounding"):
        per_micro = sum(p[name].item() for p in parts) / 4
        assert abs(per_micro - reference[1][name]) > 1e-2, name


@pytest.mark.slow
def test_two_ranks_two_micro_batches_give_the_global_batch(tmp_path, reference):
    """2 gloo ranks x 2 micro-batches: the ranks' summed gradients (what DeepSpeed's average,
    undone by the engine's world-size factor, gives) and summed terms are the one-piece ones."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(rank_worker, args=(2, port, 2, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    grads = {k: parts[0][0][k] + parts[1][0][k] for k in parts[0][0]}
    terms = {k: parts[0][1][k] + parts[1][1][k] for k in parts[0][1]}
    assert parts[0][2] == parts[1][2]  # the step metrics: the same on both ranks
    _assert_matches_reference((grads, terms, parts[0][2]), reference)


def _pretrain(out, world: list[str], *extra: str) -> list[dict]:
    """``NPROC=1 bash slurm/pretrain.sh`` on the shipped tiny config (every objective, RF, the
    learnable logit scale): 4 steps of global batch 16; the metrics.jsonl records."""
    overrides = [*world, "train.global_batch_size=16", "train.max_steps=4", "train.warmup_steps=1",
                 "train.save_every_steps=0", "train.export_at_end=false",
                 f"train.output_dir={out}", *extra]  # fmt: skip
    env = {**os.environ, "CONFIG": "configs/pretrain/tiny.yaml", "PYTHON": sys.executable,
           "NPROC": "1", "OVERRIDES": " ".join(overrides), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(["bash", "slurm/pretrain.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pretraining_with_accumulation_4_logs_the_steps_of_accumulation_1(tmp_path):
    """One process, the same global batches (one rank, data.num_workers=0): micro-batches of 16
    (accumulation 1, ZeRO-2) and of 4 (accumulation 4, the feature cache, under ZeRO-3) log the
    same losses, metrics and gradient norm at every step, so the engine's backward scaling is
    right (a wrong factor would change grad_norm, clipped at 1.0, and so the next steps).
    Tolerance 1e-4 relative: fp32 on CPU, ZeRO-3's partitioned reductions round differently
    (tests/test_engine_resume.py's ZeRO-3 vs ZeRO-2 bound); measured 2026-11-27: 1e-6."""
    world = world_overrides(tmp_path / "world")
    one = _pretrain(tmp_path / "acc1", world, "train.micro_batch_size=16", "train.zero_stage=2")
    four = _pretrain(tmp_path / "acc4", world, "train.micro_batch_size=4", "train.zero_stage=3")
    assert [r["step"] for r in one] == [r["step"] for r in four] == [1, 2, 3, 4]
    for a, b in zip(one, four):
        assert a["losses"].keys() == {"mcl", "cg", "grounding", "reconstruction"}
        for k in a["losses"]:
            assert b["losses"][k] == pytest.approx(a["losses"][k], rel=1e-4), (a["step"], k)
        for k in (*STEP_METRICS, "loss_cg", "loss_reconstruction"):
            assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-4, abs=1e-9), k
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert b["samples"] == a["samples"]
