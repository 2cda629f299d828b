"""Every shard builder killed midway and rerun leaves exactly what an uninterrupted run leaves.

Each stage runs as the user runs it (``python -m shards.X`` / ``python -m shards.bengali.X``, tiny
settings, the Bengali stages with the tiny random models of ``bengali_fixtures``). As soon as its
first output file exists, the stage and every process under it (the photo builder's pool workers
too) get SIGKILL; the same command then runs again, and the output folder must hold the same
files, byte for byte (sha256), as the folder of an uninterrupted run of that command.

Not here: ``shards.check`` writes nothing (it prints a summary); ``shards.cc15m`` hands the
writing to img2dataset, whose stats files record wall-clock times
(``tests/test_shards_cc15m.py`` runs it).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from bengali_fixtures import coco_json, corpus, tiny_kandinsky, tiny_labse, tiny_marian
from cc_fixtures import cc_captions, cc_shards
from PIL import Image
from process_tree import kill_tree

REPO = Path(__file__).resolve().parents[1]
# one thread: the same float results in every run (and no oversubscription of a small machine)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
N_CAPTIONS = 20  # 18 translatable + 1 empty + 1 too long; two shards of 10 at one per batch


class Inputs:
    """The stages' inputs, built once: tiny models, a COCO caption file, real images, and each
    stage's uninterrupted run (made on first use; the Bengali stages read their upstream's)."""

    def __init__(self, root: Path):
        self.root = root
        prior, decoder = tiny_kandinsky(root / "kandinsky")
        self.models = {
            "marian": tiny_marian(root / "marian"),
            "labse": tiny_labse(root / "labse"),
            "prior": prior,
            "decoder": decoder,
        }
        en, _ = corpus()
        texts = en[: N_CAPTIONS - 2] + ["   ", " ".join(["very long caption"] * 60)]
        self.captions = coco_json(root / "captions.json", texts)
        self.images = root / "coco_images"
        self.images.mkdir()
        for image_id in range(1, N_CAPTIONS // 2 + 1):  # coco_json: two captions per image
            Image.new("RGB", (40, 30), (image_id * 20, 90, 160)).save(
                self.images / f"COCO_train2014_{image_id:012d}.jpg"
            )
        (self.images / "COCO_train2014_000000000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        self._references: dict[str, Path] = {}

    def reference(self, stage: str) -> Path:
        """The output folder of an uninterrupted run of ``stage``."""
        if stage not in self._references:
            out = self.root / "reference" / stage
            proc = _run(STAGES[stage].command(self, out))
            assert proc.returncode == 0, proc.stderr[-3000:]
            self._references[stage] = out
        return self._references[stage]

    def cc_shards(self) -> Path:
        """CC-style pair shards to tag: 200 samples, one a shard."""
        out = self.root / "cc"
        if not out.exists():
            cc_shards(out, cc_captions(200), shard_size=1)
        return out

    def accepted(self) -> Path:
        """``accepted.csv`` of the verified pairs (merged in a copy of the verify reference)."""
        merged = self.root / "merged"
        if not merged.exists():
            shutil.copytree(self.reference("verify"), merged)
            proc = _run(
                ["-m", "shards.bengali.verify", "--translated", str(self.reference("translate")),
                 "--out", str(merged), "tau=-1", "--merge"]
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            with open(merged / "accepted.csv", newline="", encoding="utf-8") as f:
                assert len(list(csv.DictReader(f))) == N_CAPTIONS - 2
        return merged / "accepted.csv"


@dataclass(frozen=True)
class Stage:
    command: Callable[[Inputs, Path], list[str]]  # python arguments writing into the folder
    first_output: str  # glob under the folder: once it matches, the stage is killed
    resumes: str | None = None  # what the rerun logs when it picks up finished work


STAGES = {
    "world": Stage(
        lambda i, out: [
            "-m",
            "shards.world",
            "--out",
            str(out),
            "--split",
            "train",
            "--n",
            "40",
            "--triplets",
            "--shard_size",
            "2",
        ],
        "00000_stats.json",
    ),  # fmt: skip
    "world-clip_benchmark": Stage(
        lambda i, out: [
            "-m",
            "shards.world",
            "--out",
            str(out),
            "--split",
            "retrieval",
            "--n",
            "40",
            "--format",
            "clip_benchmark",
            "--shard_size",
            "2",
        ],
        "test/1.tar",
    ),  # fmt: skip
    "photos": Stage(
        lambda i, out: [
            "-m",
            "shards.photos",
            "--out",
            str(out),
            "--n",
            "16",
            "--size",
            "320x240",
            "--shard_size",
            "2",
            "--processes",
            "2",
        ],
        "00000_stats.json",
    ),  # fmt: skip
    "nouns": Stage(
        lambda i, out: [
            "-m",
            "shards.nouns",
            str(i.cc_shards()),
            "--out",
            str(out),
            "--pipeline",
            "world",
        ],
        "00000_stats.json",
        "shards_with_nothing_to_tag",
    ),  # fmt: skip
    "translate": Stage(
        lambda i, out: [
            "-m",
            "shards.bengali.translate",
            "--captions",
            str(i.captions),
            "--out",
            str(out),
            f"model={i.models['marian']}",
            "batch_size=1",
            "num_shards=2",
            "max_new_tokens=12",
        ],
        "shard_00000.parts/*.json",
        "resuming",
    ),  # fmt: skip
    "verify": Stage(
        lambda i, out: [
            "-m",
            "shards.bengali.verify",
            "--translated",
            str(i.reference("translate")),
            "--out",
            str(out),
            f"model={i.models['labse']}",
            "tau=-1",
            "batch_size=1",
        ],
        "shard_00000.parts/*.json",
        "resuming",
    ),  # fmt: skip
    "synthesise": Stage(
        lambda i, out: [
            "-m",
            "shards.bengali.synthesise",
            "--accepted",
            str(i.accepted()),
            "--out",
            str(out),
            f"prior_model={i.models['prior']}",
            f"decoder_model={i.models['decoder']}",
            "height=32",
            "width=32",
            "prior_steps=2",
            "decoder_steps=2",
            "num_shards=2",
            "batch_size=1",
        ],
        "images/*.json",
        "resuming",
    ),  # fmt: skip
    "pack": Stage(
        lambda i, out: [
            "-m",
            "shards.bengali.pack",
            "--synthetic",
            str(i.reference("synthesise")),
            "--images",
            str(i.images),
            "--out",
            str(out),
            "shard_size=1",
        ],
        "00000_stats.json",
        "already finished",
    ),  # fmt: skip
    "pack-world": Stage(
        lambda i, out: [
            "-m",
            "shards.bengali.pack",
            "--from-world",
            "--n",
            "40",
            "--out",
            str(out),
            "shard_size=2",
        ],
        "00000_stats.json",
        "already finished",
    ),  # fmt: skip
}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )


def _run_and_kill(args: list[str], out: Path, first_output: str) -> None:
    """Start the command; SIGKILL it and its descendants once ``out/first_output`` exists."""
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=ENV, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not list(out.glob(first_output)):
        time.sleep(0.005)
    assert proc.poll() is None, f"the stage ended before {first_output} appeared: no kill midway"
    kill_tree(proc.pid)
    proc.wait(timeout=60)


def _tree(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (hidden ones too)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("inputs"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_killed_midway_then_rerun_writes_the_same_bytes(stage, inputs, tmp_path):
    spec = STAGES[stage]
    reference = _tree(inputs.reference(stage))
    out = tmp_path / "out"
    command = spec.command(inputs, out)
    _run_and_kill(command, out, spec.first_output)
    killed = _tree(out)
    assert set(reference) - set(killed), "every output was already written when it was killed"

    rerun = _run(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if spec.resumes:
        assert spec.resumes in rerun.stderr
    assert _tree(out) == reference
