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

import socket

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
        per_micro = sum(float(p[name]) for p in parts) / 4
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
