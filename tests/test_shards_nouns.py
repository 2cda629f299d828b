"""shards.nouns: captions' nouns tagged into CC-style shards once, run as the user runs it
(``python -m shards.nouns``), and read back by the loader without spaCy.

Reference for the nouns: ``NounExtractor("world")`` on each caption alone (the offline pipeline;
the trained ones are not installed here and take the same code path)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from cc_fixtures import cc_captions, cc_shards

import bimac.data.nouns
from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from bimac.data.nouns import NounExtractor
from bimac.data.tokenizer import save_world_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def tag(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "shards.nouns", *args, "--pipeline", "world"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as t:
        return [(m.name, t.extractfile(m).read()) for m in t]


def tree(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = save_world_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return build_tokenizer(TokenizerConfig(kind="world", path=str(path), context_length=32))


def batches(shards: Path, tok) -> list[dict]:
    cfg = DataConfig(
        train_shards=str(shards / "*.tar"), noun_source="spacy", spacy_pipeline="world",
        batch_size=6, max_nouns=4, num_workers=0, shuffle_buffer=8,
    )  # fmt: skip
    return list(make_loader(cfg, tok, rank=0, world_size=1))


def test_nouns_are_tagged_in_place_and_the_loader_reads_them_without_spacy(
    tmp_path, tok, monkeypatch
):
    captions = cc_captions(18)
    src, shards = tmp_path / "src", tmp_path / "shards"
    cc_shards(src, captions)
    shutil.copytree(src, shards)
    summary = tag(str(shards))
    extractor = NounExtractor("world")
    want = [extractor(c.strip()) for c in captions]
    assert summary == {
        "shards": 5, "shards_tagged": 5, "samples": 18, "captions_tagged": 17, "no_caption": 1,
        "nouns": sum(map(len, want)),
    }  # fmt: skip
    assert summary["nouns"] >= 17  # the world captions carry nouns: the check is not vacuous
    for tar in sorted(shards.glob("*.tar")):
        before, after = members(src / tar.name), members(tar)
        assert [n for n, _ in after] == [n for n, _ in before]  # same members, same order
        for (name, old), (_, new) in zip(before, after, strict=True):
            if not name.endswith(".json") or not captions[int(name[:9])].strip():
                assert new == old, name  # images, captions, the blank caption's JSON: untouched
                continue
            i = int(name[:9])
            meta = json.loads(new)
            assert meta == json.loads(old) | {
                "captions_en": [captions[i].strip()],
                "nouns": [
                    [
                        {"text": n.text, "lemma": n.lemma, "start": n.start, "end": n.end}
                        for n in want[i]
                    ]
                ],  # fmt: skip
                "nouns_pipeline": "world",
            }
    # the loader: the same batches as its own spaCy pass over the untagged shards; spaCy unused
    reference = batches(src, tok)
    assert sum(b["noun_mask"].sum().item() for b in reference) == summary["nouns"]

    def no_spacy(*args, **kwargs):
        raise AssertionError("the loader ran spaCy on tagged shards")

    monkeypatch.setattr(bimac.data.nouns, "NounExtractor", no_spacy)
    tagged = batches(shards, tok)
    assert len(tagged) == len(reference) == 3  # 17 readable samples: 6 + 6 + 5
    for got, ref in zip(tagged, reference, strict=True):
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key
            else:  # sample ids name the shard's folder
                assert [v.replace(str(shards), str(src)) for v in got[key]] == value, key
    # a rerun finds every shard tagged and rewrites nothing
    hashes = tree(shards)
    assert tag(str(shards)) == {"shards": 5, "shards_with_nothing_to_tag": 5}
    assert tree(shards) == hashes


def test_out_folder_with_processes_gives_the_in_place_bytes(tmp_path):
    captions = cc_captions(10)
    cc_shards(tmp_path / "src", captions, shard_size=3)
    shutil.copytree(tmp_path / "src", tmp_path / "in_place")
    untouched = tree(tmp_path / "src")
    tag(str(tmp_path / "in_place"))
    summary = tag(f"{tmp_path}/src/*.tar", "--out", str(tmp_path / "out"), "--processes", "2")
    # the last shard holds only the blank caption: copied as it is, as in place it stays
    assert summary["shards_tagged"] == 3 and summary["shards_with_nothing_to_tag"] == 1
    assert summary["captions_tagged"] == 9
    assert tree(tmp_path / "src") == untouched  # the source is read, not written
    assert tree(tmp_path / "out") == tree(tmp_path / "in_place")  # tars and _stats.json files
    # killed between a tar's rename and its stats file's: the rerun writes the stats
    (tmp_path / "out" / "00001_stats.json").unlink()
    tag(f"{tmp_path}/src/*.tar", "--out", str(tmp_path / "out"))
    assert tree(tmp_path / "out") == tree(tmp_path / "in_place")


def test_bengali_pairs_of_tagged_shards_are_skipped_as_missing_bn_caption(tmp_path, tok):
    """Tagged CC JSON holds ``captions_en`` but no ``captions_bn``: with ``caption_lang: bn`` the
    loader counts each sample as missing its Bengali caption (it once raised a KeyError)."""
    cc_shards(tmp_path, cc_captions(6))
    tag(str(tmp_path))
    cfg = DataConfig(
        train_shards=str(tmp_path / "*.tar"), caption_lang="bn", noun_source="none",
        batch_size=2, num_workers=0,
    )  # fmt: skip
    loader = make_loader(cfg, tok, rank=0, world_size=1)
    assert list(loader) == []
    assert loader.skipped()["missing_bn_caption"] == 5


def test_two_shards_of_one_name_into_one_out_folder_is_one_line(tmp_path):
    for name in ("cc3m", "cc12m"):  # img2dataset numbers each source's shards from 00000
        cc_shards(tmp_path / name, cc_captions(4))
    proc = subprocess.run(
        [sys.executable, "-m", "shards.nouns", f"{tmp_path}/cc3m/*.tar::{tmp_path}/cc12m/*.tar",
         "--out", str(tmp_path / "out"), "--pipeline", "world"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"python -m shards.nouns: error: out: {tmp_path}/cc3m/00000.tar and "
        f"{tmp_path}/cc12m/00000.tar would both be written to {tmp_path}/out/00000.tar; "
        "tag each folder into its own --out"
    ]
    assert not (tmp_path / "out" / "00000.tar").exists()


def test_a_truncated_shard_is_left_as_it_is_logged_and_counted(tmp_path):
    cc_shards(tmp_path, cc_captions(8))
    broken = tmp_path / "00001.tar"
    broken.write_bytes(broken.read_bytes()[:1500])  # ends inside its first sample's members
    before = broken.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "shards.nouns", str(tmp_path), "--pipeline", "world"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["shards_unreadable"] == 1 and summary["shards_tagged"] == 1
    assert broken.read_bytes() == before and not list(tmp_path.glob(".*.partial"))
    assert f"skipped sample (truncated_tar): {broken}" in proc.stderr
