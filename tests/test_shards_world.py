"""shards.world and shards.check command lines, and the demo's preview grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from bimac.config import ConfigError
from cli.demo import preview_grid
from shards import check, world

REPO = Path(__file__).resolve().parents[1]


def test_world_cli_writes_img2dataset_layout_and_check_reads_it(tmp_path, capsys):
    world.main(
        ["--out", str(tmp_path), "--split", "val", "--n", "25", "--shard-size", "10", "--triplets"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json",
        "00002.tar", "00002_stats.json", "tokenizer.json",
    ]  # fmt: skip
    with tarfile.open(tmp_path / "00000.tar") as tf:
        names = tf.getnames()
    want = {f"000000000.{e}" for e in ("jpg", "txt", "json", "syn.jpg", "en.txt", "bn.txt")}
    assert set(names[:6]) == want
    assert [
        json.loads((tmp_path / f"0000{i}_stats.json").read_text())["successes"] for i in range(3)
    ] == [10, 10, 5]
    capsys.readouterr()
    check.main([str(tmp_path / "{00000..00002}.tar"), "--triplets"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 25 and summary["shards"] == 3 and summary["skipped_total"] == 0
    assert summary["duplicate_ids"] == 0 and summary["caption_words"]["min"] >= 2


def test_check_counts_bad_samples_by_reason(tmp_path):
    """`python -m shards.check` on shards with 1 % of each fault (tests/reliability_faults.py):
    its JSON counts every skip by reason and every good sample, read from a directory too."""
    from reliability_faults import write_faulty_shards

    pattern, expected, good = write_faulty_shards(tmp_path / "faulty", n=200, shard_size=100)
    for spec in (pattern, str(tmp_path / "faulty")):
        proc = subprocess.run(
            [sys.executable, "-m", "shards.check", spec], cwd=REPO, capture_output=True,
            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout[proc.stdout.index("{") :])
        assert summary["skipped"] == dict(expected) and summary["samples"] == good
        assert summary["skipped_total"] == sum(expected.values()) and summary["shards"] == 2


def test_check_fails_on_nothing_read(tmp_path, capsys):
    (tmp_path / "00000.tar").write_bytes(b"\0" * 1024)  # an empty tar: nothing to read
    with pytest.raises(ConfigError, match="no sample of"):
        check.main([str(tmp_path / "00000.tar")])
    with pytest.raises(ConfigError, match="matches no shard"):
        check.check(str(tmp_path / "nothing*.tar"))


def test_probe_split_needs_pairs(tmp_path):
    with pytest.raises(ValueError, match="pairs"):
        world.build(tmp_path, "probe", 3)


def test_world_cli_binding_variant(tmp_path):
    """--variant binding writes the variant's scenes (what configs/pretrain/tables.yaml trains on);
    the benchmark layouts only exist for the default world."""
    from bimac.data.world import make_sample

    world.main(["--out", str(tmp_path), "--split", "train", "--n", "4", "--variant", "binding"])
    with tarfile.open(tmp_path / "00000.tar") as tf:
        metas = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
    want = [make_sample(0, "train", i, variant="binding")["json"] for i in range(4)]
    assert metas == want and {m["variant"] for m in metas} == {"binding"}
    with pytest.raises(ConfigError, match="variant: only with format=shards"):
        world.WorldShardsConfig(
            out=str(tmp_path), split="retrieval", format="clip_benchmark", variant="binding"
        )


def test_preview_grid(tmp_path):
    world.build(tmp_path, "train", 8, 64, shard_size=8)
    png = preview_grid(tmp_path / "00000.tar", tmp_path / "preview.png", n=6, cols=3)
    assert Image.open(png).size[0] > 300
    lines = png.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and all(len(line.split("\t")) == 3 for line in lines)
    assert any("টি " in line for line in lines)  # the Bengali caption is there
