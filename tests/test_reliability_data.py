"""Reliability of the data path: broken samples and shards are skipped and counted by reason,
the decompression bomb is refused from its header, and shard URLs are used only as written.

Faults already covered elsewhere (not repeated here): truncated JPEG / missing caption /
invalid JSON / truncated tar / failing ``pipe:`` command one by one in
``tests/test_data_loader.py::test_each_bad_input_is_skipped_and_counted``; a missing spaCy
pipeline's message in ``tests/test_data_nouns.py``. The training run over these faulty shards
(counts in ``summary.json``) is in ``tests/test_reliability_training.py``.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from PIL import ImageFile
from reliability_faults import (
    BOMB_SIDE,
    SAMPLE_FAULTS,
    decompression_bomb_png,
    encoded,
    png_bytes,
    truncate_shard,
    write_faulty_shards,
)

from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from bimac.data.tokenizer import save_world_tokenizer
from bimac.data.world import make_sample
from bimac.data.writer import write_shards


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = save_world_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return build_tokenizer(TokenizerConfig(kind="world", path=str(path), context_length=32))


def _cfg(urls: str, **kw) -> DataConfig:
    return DataConfig(train_shards=urls, **({"batch_size": 8, "shuffle_buffer": 0} | kw))


def _ids(loader) -> list[str]:
    return [sid for b in loader for sid in b["sample_id"]]


def test_one_percent_of_each_fault_is_skipped_and_counted(tmp_path, tok):
    urls, expected, good = write_faulty_shards(tmp_path, n=400, shard_size=100, rate=0.01)
    # 4 of each of the 8 faults; 6 of them must be skipped, 2 are valid input
    assert sum(expected.values()) == 24 and good == 376
    assert expected == {
        "bad_image": 8, "image_too_large": 4, "empty_caption": 4,
        "bad_caption_encoding": 4, "bad_json": 4,
    }  # fmt: skip
    loader = make_loader(_cfg(urls, num_workers=2), tok, rank=0, world_size=1)
    ids = _ids(loader)
    assert len(ids) == len(set(ids)) == good
    assert Counter(loader.skipped()) == expected


def test_png_named_jpg_and_10000_word_caption_are_used(tmp_path, tok):
    s = encoded(make_sample(0, "train", 3))
    samples = [SAMPLE_FAULTS[f][0](s) | {"__key__": f} for f in ("png_named_jpg",
                                                                  "caption_10000_words")]  # fmt: skip
    write_shards(iter(samples), tmp_path, shard_size=10)
    loader = make_loader(_cfg(str(tmp_path / "00000.tar")), tok, rank=0, world_size=1)
    (batch,) = list(loader)
    assert loader.skipped() == {}
    assert batch["image"].shape == (2, 3, 64, 64)
    # PIL decodes by content: the PNG under .jpg gives the JPEG's picture (JPEG loss <= 40/255)
    assert (batch["image"][0].int() - batch["image"][1].int()).abs().float().mean() < 10
    assert batch["text"].shape == (2, 32)  # the long caption is cut to the context length


def test_decompression_bomb_is_refused_before_decoding(tmp_path, tok, monkeypatch):
    data = decompression_bomb_png()
    assert len(data) < 32_000  # claims 10000 x 10000 x 3 = 300 MB
    decoded_sizes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        decoded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    good = encoded(make_sample(0, "train", 0))
    good["jpg"] = png_bytes(good["jpg"])  # a PNG goes through PIL, where the spy sees it
    samples = [good | {"__key__": "bomb", "jpg": data}, good | {"__key__": "good"}]
    write_shards(iter(samples), tmp_path, shard_size=10)
    loader = make_loader(_cfg(str(tmp_path / "00000.tar")), tok, rank=0, world_size=1)
    ids = _ids(loader)  # num_workers=0: the spy sees every PIL decode
    assert [i.split("#")[1] for i in ids] == ["good"]
    assert loader.skipped() == {"image_too_large": 1}
    assert decoded_sizes and (BOMB_SIDE, BOMB_SIDE) not in decoded_sizes  # the good one only


def test_truncated_unreadable_and_vanished_shards_are_counted(tmp_path, tok, monkeypatch):
    write_shards((make_sample(0, "train", i) for i in range(40)), tmp_path, shard_size=10)
    truncate_shard(tmp_path / "00001.tar")
    unreadable = tmp_path / "00002.tar"
    if os.geteuid() != 0:
        unreadable.chmod(0)
    else:  # root reads a mode-000 file anyway: fail its open as permissions would
        import bimac.data.loader as loader_mod

        real_open = loader_mod.open_shard

        def open_shard(url, *a, **k):
            if url == str(unreadable):
                raise PermissionError(13, "Permission denied", url)
            return real_open(url, *a, **k)

        monkeypatch.setattr(loader_mod, "open_shard", open_shard)
    cfg = _cfg(str(tmp_path / "{00000..00003}.tar"))
    loader = make_loader(cfg, tok, rank=0, world_size=1)  # all four shards exist at start-up
    (tmp_path / "00003.tar").unlink()  # and one disappears while the job runs
    ids = _ids(loader)
    shard_of = Counter(i.split("#")[0].rsplit("/", 1)[1] for i in ids)
    assert shard_of["00000.tar"] == 10 and 1 <= shard_of["00001.tar"] < 10
    assert set(shard_of) == {"00000.tar", "00001.tar"}
    assert loader.skipped() == {"truncated_tar": 1, "shard_open": 2}


def test_a_shard_cut_shorter_while_mapped_kills_its_reader_with_sigbus(tmp_path):
    """The stated limit of mapped shards (RELIABILITY.md): a local shard truncated on disk while
    the loader holds views of it. The reader, in a subprocess, reads a member's view after the
    cut and dies by SIGBUS, not with a wrong result. Deleted while mapped, it is read whole."""
    import signal
    import subprocess
    import sys

    from bimac.data.loader import MappedShard, tar_members

    write_shards((make_sample(0, "train", i) for i in range(20)), tmp_path, shard_size=20)
    shard = tmp_path / "00000.tar"
    with open(shard, "rb") as f:
        want = [(m["fname"], m["data"]) for m in tar_members(f)]
    doomed = tmp_path / "doomed.tar"
    doomed.write_bytes(shard.read_bytes())
    reader = MappedShard(str(doomed))
    doomed.unlink()
    assert [(m["fname"], bytes(m["data"])) for m in tar_members(reader)] == want
    code = (
        "import os, sys\n"
        "from bimac.data.loader import MappedShard, tar_members\n"
        "last = list(tar_members(MappedShard(sys.argv[1])))[-1]['data']\n"
        "os.truncate(sys.argv[1], 0)\n"
        "print(bytes(last)[:1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(shard)], capture_output=True)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr[-300:])


def test_a_shard_missing_at_start_up_is_a_clear_error(tmp_path, tok):
    write_shards((make_sample(0, "train", i) for i in range(20)), tmp_path, shard_size=10)
    with pytest.raises(FileNotFoundError, match=r"shard '.*00002\.tar' \(from pattern"):
        make_loader(_cfg(str(tmp_path / "{00000..00002}.tar")), tok, rank=0, world_size=1)


def test_pipe_text_inside_samples_is_never_run(tmp_path, tok):
    """Only URLs the user wrote are opened: a ``pipe:`` string inside a sample is just text."""
    marker = tmp_path / "pwned"
    s = make_sample(0, "train", 0)
    hostile = f"pipe:touch {marker}"
    sample = s | {"__key__": "000", "txt": hostile, "json": b'{"url": "%s"}' % hostile.encode()}
    write_shards(iter([sample]), tmp_path, shard_size=10)
    loader = make_loader(_cfg(str(tmp_path / "00000.tar")), tok, rank=0, world_size=1)
    (batch,) = list(loader)
    assert loader.dataset.urls == [str(tmp_path / "00000.tar")]
    assert len(batch["sample_id"]) == 1 and loader.skipped() == {} and not marker.exists()
