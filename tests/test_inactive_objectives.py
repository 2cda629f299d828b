"""An objective with no signal (grounding without nouns, RF without references) is reported once
with its cause and fix, and listed by ``task.summary()`` (the engine merges it into summary.json)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bimac.models.bimac import BiMACConfig
from bimac.tasks.pretrain import NO_SIGNAL_BATCHES, ObjectiveConfig, PretrainTask

REPO = Path(__file__).resolve().parents[1]


def _batch(nouns: int) -> dict:
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, :nouns] = True
    return {"noun_mask": mask}


def test_grounding_without_nouns_is_reported_once_and_summarised(caplog):
    task = PretrainTask(BiMACConfig(), ObjectiveConfig(rf=False))
    with caplog.at_level(logging.WARNING, logger="bimac.tasks.pretrain"):
        for _ in range(3 * NO_SIGNAL_BATCHES):
            task._count_signal(_batch(0))
    warnings = [r.getMessage() for r in caplog.records if "inactive" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("objectives.grounding is inactive: no noun in the captions of")
    assert "data.noun_source" in warnings[0]
    inactive = task.summary()["inactive_objectives"]
    assert (
        list(inactive) == ["grounding"]
        and f"{3 * NO_SIGNAL_BATCHES} batches" in inactive["grounding"]
    )
    task._count_signal(_batch(2))  # one noun later in the run: it did learn something
    assert task.summary() == {"inactive_objectives": {}}


def test_objectives_that_are_off_or_fed_are_not_reported():
    off = PretrainTask(BiMACConfig(), ObjectiveConfig(grounding=False, rf=False))
    for _ in range(NO_SIGNAL_BATCHES):
        off._count_signal(_batch(0))
    assert off.summary() == {"inactive_objectives": {}}
    rf = PretrainTask(BiMACConfig(), ObjectiveConfig(grounding=False))
    rf._cg_calls = 5  # five RF refreshes scored against no reference caption
    assert list(rf.inactive_objectives()) == ["rf"]
    rf._reference_count = 3
    assert rf.inactive_objectives() == {}


def real_caption_shard(out: Path, n: int = 64) -> Path:
    """A shard of images with real English captions and no world noun annotations."""
    from bimac.data.world import make_sample
    from bimac.data.writer import write_shards

    captions = ["a photograph of a dog running on the grass", "two people sitting at a table"]
    samples = (
        {"__key__": f"{i:09d}", "jpg": make_sample(0, "train", i, 64)["jpg"],
         "txt": captions[i % 2], "json": {"caption": captions[i % 2]}}
        for i in range(n)
    )  # fmt: skip
    return write_shards(samples, out, shard_size=n)[0]


@pytest.mark.slow
def test_pretraining_with_a_noun_pipeline_that_finds_nothing_says_so(tmp_path):
    """The paper's case: real English captions, a noun pipeline (the world's lexicon) that finds
    no noun in them: grounding would train at 0 without a word."""
    from test_engine_pretrain import world_overrides

    world = world_overrides(tmp_path / "world")  # for its tokenizer
    shard = real_caption_shard(tmp_path / "real")
    argv = [sys.executable, "-m", "pretrain", "--config", str(REPO / "configs/pretrain/tiny.yaml"),
            *world, f"data.train_shards={shard}", "data.streams=1", "data.noun_source=spacy",
            "data.spacy_pipeline=world", "objectives.rf=false",
            f"train.max_steps={NO_SIGNAL_BATCHES}", f"train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [line for line in proc.stderr.splitlines() if "is inactive" in line]
    assert len(reports) == 1 and "objectives.grounding is inactive" in reports[0], proc.stderr[
        -3000:
    ]
