"""WebDataset loader: round trip, img2dataset shards, exact/resampled splitting, resume, bad input."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from bimac.data import DataConfig, SkipCounter, TokenizerConfig, build_tokenizer, make_loader
from bimac.data.loader import MappedShard, group_members, tar_members
from bimac.data.tokenizer import save_world_tokenizer
from bimac.data.world import make_sample
from bimac.data.writer import write_shards


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = save_world_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return build_tokenizer(TokenizerConfig(kind="world", path=str(path), context_length=32))


def _world(tmp_path, n=40, shard_size=10, triplet=False, split="train"):
    samples = (make_sample(0, split, i, 64, triplet) for i in range(n))
    write_shards(samples, tmp_path, shard_size=shard_size)
    last = (n - 1) // shard_size
    return str(tmp_path / f"{{00000..{last:05d}}}.tar")


def _ids(loader) -> list[str]:
    return [sid for b in loader for sid in b["sample_id"]]


def _cfg(urls, **kw):
    return DataConfig(train_shards=urls, **({"batch_size": 4, "shuffle_buffer": 0} | kw))


def test_round_trip_images_captions_nouns_boxes(tmp_path, tok):
    urls = _world(tmp_path, n=12, shard_size=5)
    assert sorted(p.name for p in tmp_path.glob("*_stats.json")) == [
        f"0000{i}_stats.json" for i in range(3)
    ]
    assert json.loads((tmp_path / "00002_stats.json").read_text())["successes"] == 2
    cfg = _cfg(urls, random_caption=False)
    batches = list(make_loader(cfg, tok, rank=0, world_size=1))
    assert [len(b["sample_id"]) for b in batches] == [4, 4, 4]
    n_boxes = 0
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 64, 64)
        assert b["text"].dtype == torch.int64 and b["text"].shape[1] == 32
        for i, sid in enumerate(b["sample_id"]):
            url, key = sid.split("#")
            s = make_sample(0, "train", int(key), 64)
            ref = np.array(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
            assert torch.equal(b["image"][i], torch.from_numpy(ref).permute(2, 0, 1))
            assert tok.decode(b["text"][i : i + 1]) == [s["json"]["captions_en"][0]]
            nouns = s["json"]["nouns"][0]
            assert int(b["noun_mask"][i].sum()) == len(nouns)
            for j, n in enumerate(nouns):
                st, en = b["noun_spans"][i, j].tolist()
                assert tok.decode([b["text"][i, st:en].tolist()]) == [n["text"]]
                objs = [s["json"]["objects"][k]["box"] for k in n["objects"]]
                union = [
                    min(o[0] for o in objs),
                    min(o[1] for o in objs),
                    max(o[2] for o in objs),
                    max(o[3] for o in objs),
                ]
                torch.testing.assert_close(
                    b["noun_boxes"][i, j], torch.tensor(union) / 64, atol=1e-5, rtol=0
                )
                assert b["noun_has_box"][i, j]
                n_boxes += 1
    assert n_boxes >= 12


def test_reads_img2dataset_layout_written_by_shardwriter(tmp_path, tok):
    # what img2dataset writes: non-square JPEGs, caption txt, its own json fields, 9-digit keys
    with wds.ShardWriter(str(tmp_path / "%05d.tar"), maxcount=3, verbose=0) as w:
        for i in range(5):
            buf = io.BytesIO()
            Image.new("RGB", (96, 48), (i * 40, 10, 200)).save(buf, format="JPEG")
            meta = {"url": f"http://x/{i}.jpg", "key": f"{i:09d}", "status": "success",
                    "caption": "a dog on a beach", "width": 96, "height": 48, "original_width": 500}  # fmt: skip
            w.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": buf.getvalue(),
                    "txt": "a dog on a beach",
                    "json": meta,
                }
            )
    loader = make_loader(_cfg(str(tmp_path / "*.tar"), image_size=32), tok, rank=0, world_size=1)
    batches = list(loader)
    assert sum(len(b["sample_id"]) for b in batches) == 5 and loader.skipped() == {}
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32)  # shortest side resized, centre crop
    assert not b["noun_mask"].any() and not b["noun_has_box"].any()
    # colour survives: the first image is (0, 10, 200)
    assert abs(int(b["image"][0, 2].float().mean()) - 200) < 8


def test_pipe_urls_and_brace_patterns(tmp_path, tok):
    _world(tmp_path, n=8, shard_size=4)
    urls = f"pipe:cat {tmp_path}/00000.tar::{tmp_path}/{{00001..00001}}.tar"
    assert len(_ids(make_loader(_cfg(urls), tok, rank=0, world_size=1))) == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_mapped_local_shards_give_the_batches_of_streamed_ones(tmp_path, tok, workers):
    """Local shards are read as views of the mapped file (``MappedShard``); reference: the same
    shards streamed through ``pipe:cat`` (``webdataset.gopen``, bytes). 5 % of the samples carry
    each fault of ``reliability_faults`` (30 % skipped), over 2 streams and a shuffle buffer."""
    from reliability_faults import write_faulty_shards

    urls, expected, _ = write_faulty_shards(tmp_path, n=200, shard_size=50, rate=0.05)
    paths = [f"{tmp_path}/{i:05d}.tar" for i in range(4)]

    def run(shards: str) -> tuple[list[dict], dict]:
        cfg = _cfg(shards, batch_size=8, shuffle_buffer=20, streams=2, references=True,
                   image_size=32)  # fmt: skip
        loader = make_loader(cfg, tok, rank=0, world_size=1, global_batch_size=16,
                             num_workers=workers)  # fmt: skip
        batches = [b | {"sample_id": [i.split("#")[1] for i in b["sample_id"]]} for b in loader]
        return batches, loader.skipped()

    mapped, mapped_skips = run(urls)
    streamed, streamed_skips = run("::".join(f"pipe:cat {p}" for p in paths))
    ds = make_loader(_cfg(urls), tok, rank=0, world_size=1).dataset
    assert isinstance(next(ds.raw_samples(0))["jpg"], memoryview)  # local shards are mapped
    assert len(mapped) == len(streamed) >= 6
    for a, b in zip(mapped, streamed, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    assert mapped_skips == streamed_skips
    assert {k: v for k, v in mapped_skips.items() if k != "epoch_tail"} == expected


def test_empty_url_match_is_a_clear_error(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        make_loader(_cfg(str(tmp_path / "*.tar")), tok, rank=0, world_size=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loader(_cfg(str(tmp_path / "{00000..00003}.tar")), tok, rank=0, world_size=1)


def _steps(cfg, tok, ranks: int, global_batch: int, epoch=0, cursor=None, stop_after=None):
    """Global steps as the training loop sees them (the ranks' micro-batches in rank order, up to
    the last step every rank has) and the ranks' merged cursor."""
    acc = global_batch // ranks // cfg.batch_size
    per_rank, cursor_out = [], {}
    for rank in range(ranks):
        loader = make_loader(cfg, tok, rank=rank, world_size=ranks, epoch=epoch,
                             global_batch_size=global_batch, cursor=cursor)  # fmt: skip
        batches = []
        for b in loader:
            batches.append(b["sample_id"])
            if stop_after is not None and len(batches) == stop_after * acc:
                break
        per_rank.append(batches)
        cursor_out |= loader.state_dict()
    n = min(len(b) for b in per_rank) // acc
    steps = [[i for r in per_rank for mb in r[k * acc : (k + 1) * acc] for i in mb] for k in range(n)]  # fmt: skip
    return steps, cursor_out


def test_streams_cross_shard_boundaries_and_see_each_sample_at_most_once(tmp_path, tok):
    # 7 shards of 10 over 4 streams (0, 4 | 1, 5 | 2, 6 | 3): stream 3 has 10 samples, so with
    # chunk 2 (global batch 8) the epoch is 5 steps; 2 ranks with 2 workers each
    urls = _world(tmp_path, n=70, shard_size=10)
    expected = {f"{tmp_path}/{i // 10:05d}.tar#{i:09d}" for i in range(70)}
    cfg = _cfg(urls, shuffle_buffer=20, num_workers=2, streams=4, batch_size=2)
    orders = []
    for epoch in (0, 1):
        steps, _ = _steps(cfg, tok, 2, 8, epoch=epoch)
        ids = [i for s in steps for i in s]
        assert len(steps) == 5 and len(set(ids)) == len(ids) == 40 and set(ids) <= expected
        # the chunk of stream s (positions 2s, 2s + 1 of each step) comes from its own shards
        for step in steps:
            for k, i in enumerate(step):
                assert int(i.split("#")[0][-9:-4]) % 4 == k // 2
        orders.append(steps)
    assert orders[0] != orders[1]  # seeded shuffling differs per epoch
    assert _steps(cfg, tok, 2, 8, epoch=1)[0] == orders[1]  # ... and is reproducible


def test_resampled_mode_reads_epoch_samples_over_all_streams(tmp_path, tok):
    urls = _world(tmp_path, n=20, shard_size=5)
    cfg = _cfg(urls, resampled=True, epoch_samples=40, num_workers=2, batch_size=4, streams=2)
    per_rank = [_ids(make_loader(cfg, tok, rank=r, world_size=2, global_batch_size=8)) for r in (0, 1)]  # fmt: skip
    assert [len(x) for x in per_rank] == [20, 20]  # 40 raw samples, 20 per stream, no bad ones
    assert per_rank[0] != per_rank[1]


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_at_every_step_continues_the_same_order(tmp_path, tok, resampled):
    # 5 shards of 12 over 2 streams (36 | 24 samples), chunk 5: 4 steps (resampled: 18 raw
    # samples per stream, 3 steps); 2 workers, a shuffle buffer smaller than a shard
    urls = _world(tmp_path, n=60, shard_size=12)
    cfg = _cfg(urls, shuffle_buffer=10, num_workers=2, batch_size=5, streams=2,
               resampled=resampled, epoch_samples=37)  # fmt: skip
    full, _ = _steps(cfg, tok, 1, 10, epoch=3)
    assert len(full) == (3 if resampled else 4)
    for k in range(1, len(full)):
        head, cursor = _steps(cfg, tok, 1, 10, epoch=3, stop_after=k)
        assert head == full[:k]
        assert _steps(cfg, tok, 1, 10, epoch=3, cursor=cursor)[0] == full[k:], k


def _tar(path, members: list[tuple[str, bytes]]):
    with wds.TarWriter(str(path)) as w:
        by_key: dict[str, dict] = {}
        for name, data in members:
            key, ext = name.split(".", 1)
            by_key.setdefault(key, {"__key__": key})[ext] = data
        for sample in by_key.values():
            w.write(sample)


def test_each_bad_input_is_skipped_and_counted(tmp_path, tok, caplog):
    good = make_sample(0, "train", 0)
    jpg, meta = good["jpg"], json.dumps(good["json"]).encode()
    cases = [
        ("000", {"jpg": jpg, "txt": b"ok", "json": meta}),  # good
        ("001", {"txt": b"no image", "json": meta}),  # missing_image
        ("002", {"jpg": b"not a jpeg at all", "txt": b"x", "json": meta}),  # bad_image
        ("003", {"jpg": jpg[: len(jpg) // 2], "txt": b"x", "json": b"{}"}),  # bad_image (truncated)
        ("004", {"jpg": jpg, "json": b"{}"}),  # missing_caption
        ("005", {"jpg": jpg, "txt": b"  ", "json": b"{}"}),  # empty_caption
        ("006", {"jpg": jpg, "txt": b"\xff\xfe caption", "json": b"{}"}),  # bad_caption_encoding
        ("007", {"jpg": jpg, "txt": b"x", "json": b"{not json"}),  # bad_json
        ("008", {"jpg": jpg, "txt": b"fine", "json": b"{}"}),  # good
    ]
    with wds.TarWriter(str(tmp_path / "00000.tar")) as w:
        for key, sample in cases:
            w.write({"__key__": key} | sample)
    # a truncated shard: its first samples are read, then a warning and the shard ends
    write_shards((make_sample(0, "train", i) for i in range(6)), tmp_path / "t", shard_size=6)
    data = (tmp_path / "t" / "00000.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: int(len(data) * 0.6)])
    urls = f"{tmp_path}/0000{{0,1}}.tar::pipe:exit 3"  # a failing pipe: command
    cfg = _cfg(urls, random_caption=False, num_workers=2)
    loader = make_loader(cfg, tok, rank=0, world_size=1)
    ids = _ids(loader)
    skipped = loader.skipped()  # counted inside the workers, read in the main process
    assert skipped == {
        "missing_image": 1, "bad_image": 2, "missing_caption": 1, "empty_caption": 1,
        "bad_caption_encoding": 1, "bad_json": 1, "truncated_tar": 1, "shard_open": 1,
    }  # fmt: skip
    good_ids = sorted(i.split("#")[1] for i in ids if i.startswith(f"{tmp_path}/00000.tar"))
    assert good_ids == ["000", "008"]
    assert 1 <= sum(i.startswith(f"{tmp_path}/00001.tar") for i in ids) < 6
    # the warning is logged (checked in-process: worker processes log to their own handlers)
    with caplog.at_level(logging.WARNING, logger="bimac.data.loader"):
        _ids(make_loader(cfg, tok, rank=0, world_size=1, num_workers=0))
    assert "truncated_tar" in caplog.text and "rest of this shard is skipped" in caplog.text


def test_triplet_batches(tmp_path, tok):
    urls = _world(tmp_path, n=6, shard_size=6, triplet=True)
    b = next(
        iter(make_loader(_cfg(urls, kind="triplets", batch_size=6), tok, rank=0, world_size=1))
    )
    assert b["image_syn"].shape == b["image"].shape == (6, 3, 64, 64)
    assert not torch.equal(b["image_syn"], b["image"])
    assert b["text_bn"].shape == (6, 32)
    for i, sid in enumerate(b["sample_id"]):
        s = make_sample(0, "train", int(sid.split("#")[1]), 64, True)
        assert tok.decode(b["text_bn"][i : i + 1]) == [s["bn.txt"]]
        assert tok.decode(b["text"][i : i + 1]) == [s["en.txt"]]
    assert b["noun_mask"].sum(1).min() >= 1


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("triplet", [False, True])
def test_every_image_is_its_samples_pixels_to_the_short_last_batch(tmp_path, tok, workers, triplet):  # fmt: skip
    """A chunk's images are stacked into a reused (pooled) buffer; a one-pass reader's short last
    batch (10 samples in batches of 4: 4, 4, 2) has another shape and gets memory of its own.
    Every row of every batch, ``image_syn`` too, equals PIL's decode of its sample's JPEG,
    in-process and through a worker, and each batch has one row per sample."""
    urls = _world(tmp_path, n=10, shard_size=10, triplet=triplet)
    cfg = _cfg(urls, kind="triplets" if triplet else "pairs", num_workers=workers)
    batches = list(make_loader(cfg, tok, rank=0, world_size=1))
    assert [len(b["sample_id"]) for b in batches] == [4, 4, 2]
    members = {"image": "jpg", "image_syn": "syn.jpg"} if triplet else {"image": "jpg"}
    for b in batches:
        assert all(b[key].shape == (len(b["sample_id"]), 3, 64, 64) for key in members)
        for i, sid in enumerate(b["sample_id"]):
            s = make_sample(0, "train", int(sid.split("#")[1]), 64, triplet)
            for key, member in members.items():
                ref = np.array(Image.open(io.BytesIO(s[member])).convert("RGB"))
                assert torch.equal(b[key][i], torch.from_numpy(ref).permute(2, 0, 1)), (sid, key)


def test_missing_triplet_member_is_counted(tmp_path, tok):
    s = make_sample(0, "train", 1, 64, True)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as w:
        w.write({k: v for k, v in s.items() if k != "syn.jpg"})
        w.write({k: v for k, v in s.items() if k != "bn.txt"} | {"__key__": "000000002"})
    loader = make_loader(
        _cfg(str(tmp_path / "00000.tar"), kind="triplets"), tok, rank=0, world_size=1
    )
    assert _ids(loader) == [] and loader.skipped() == {
        "missing_syn_image": 1,
        "missing_bn_caption": 1,
    }


def _count_in_another_process(counter: SkipCounter) -> None:
    counter.add("bad_json")
    counter.add("truncated_tar")


def test_skip_counter_counts_across_processes_and_resets():
    """A loader worker is another process (started from the fork server, as DataLoader workers
    are): what it counts is seen by the trainer's process."""
    import multiprocessing as mp

    c = SkipCounter()
    c.add("bad_json")
    worker = mp.get_context("forkserver").Process(target=_count_in_another_process, args=(c,))
    worker.start()
    worker.join(timeout=120)
    assert worker.exitcode == 0
    assert c.as_dict() == {"bad_json": 2, "truncated_tar": 1}
    c.reset()
    assert c.as_dict() == {}


def test_bengali_pairs_use_bengali_captions_and_nouns(tmp_path, tok):
    urls = _world(tmp_path, n=8, shard_size=8)
    cfg = _cfg(urls, caption_lang="bn", batch_size=8)
    b = next(iter(make_loader(cfg, tok, rank=0, world_size=1)))
    for i, sid in enumerate(b["sample_id"]):
        meta = make_sample(0, "train", int(sid.split("#")[1]))["json"]
        (text,) = tok.decode(b["text"][i : i + 1])
        k = meta["captions_bn"].index(text)  # one of the five Bengali captions, drawn at random
        for j, n in enumerate(meta["nouns_bn"][k]):
            st, en = b["noun_spans"][i, j].tolist()
            assert tok.decode([b["text"][i, st:en].tolist()])[0].startswith(n["text"])
    # a pair without a Bengali caption is counted, not silently given the English one
    with wds.TarWriter(str(tmp_path / "en_only.tar")) as w:
        w.write({"__key__": "k", "jpg": make_sample(0, "train", 0)["jpg"], "txt": "a cat"})
    loader = make_loader(
        _cfg(str(tmp_path / "en_only.tar"), caption_lang="bn"), tok, rank=0, world_size=1
    )
    assert _ids(loader) == [] and loader.skipped() == {"missing_bn_caption": 1}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_members_equals_tarfile(tmp_path, fmt):
    # reference: Python's tarfile; long names, ustar prefixes, non-ASCII, directories, links
    names = [
        "000000001.jpg",
        "000000001.json",
        "d/" * 60 + "long.txt",
        "k\u00e9y.txt",
        "__meta__",
        "e.bin",
    ]
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        tf.addfile(_dir_info("adir"))
        for i, name in enumerate(names):
            if fmt == tarfile.USTAR_FORMAT and not name.isascii():
                continue
            data = bytes(range(256)) * i + b"x" * (i * 37)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5e9 + 0.25
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("alink")
        link.type, link.linkname = tarfile.SYMTYPE, "e.bin"
        tf.addfile(link)
    with tarfile.open(path) as tf:
        want = [
            (m.name, tf.extractfile(m).read()) for m in tf if m.isreg() and m.name != "__meta__"
        ]
    with open(path, "rb") as f:
        got = [(m["fname"], m["data"]) for m in tar_members(f)]
    assert got == want and len(got) >= 4
    # the training loader's reader: the same members as views of the mapped file
    mapped = [(m["fname"], m["data"]) for m in tar_members(MappedShard(str(path)))]
    assert all(isinstance(data, memoryview) for _, data in mapped)
    assert [(name, bytes(data)) for name, data in mapped] == want


def test_group_members_equals_webdataset_group_by_keys():
    # reference: webdataset's group_by_keys (the grouping the loader used before), whose
    # duplicate-member errors go to a handler that counts them
    names = [
        "a.jpg", "a.TXT", "a.json", "b.jpg", "b.jpg", "b.txt",  # a duplicate member in b
        "dir.x/c.jpg", "dir.x/c.tar.gz", "d/e/f.g.h", "noext", ".hidden", "d/.hidden", "x.",
        "c.jpg",  # the same key after another: a new sample
    ]  # fmt: skip
    stream = [{"fname": n, "data": n.encode(), "__url__": "s0"} for n in names]
    stream += [{}, {"fname": "c.txt", "data": b"c", "__url__": "s1"}, {}]  # shard boundaries
    stream += [{"fname": "z.jpg", "data": b"z", "__url__": "s2"}]  # a stream without a marker
    duplicates = []
    want = list(
        wds.tariterators.group_by_keys(iter(stream), handler=lambda e: duplicates.append(e) or True)
    )
    counter = SkipCounter()
    got = list(group_members(iter(stream), counter))
    assert got == want and len(got) == 9
    assert counter.as_dict() == {"tar_format": 1} and len(duplicates) == 1


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_tar_header_checksum_is_exact_at_its_largest_sums():
    """``tar_members`` sums a header's bytes with Adler-32 over each half, exact while a half
    sums below Adler's modulus 65521 (at most 256 x 255 = 65280). A header whose second half is
    mostly 0xFF and UTF-8 bytes (a sum over 50000) reads as tarfile reads it, with tarfile's
    own checksum (``calc_chksums``); the same checksum plus 65521, which a sum taken modulo
    65521 would accept, is refused."""
    hdr = bytearray(tarfile.TarInfo("a.txt").tobuf(tarfile.USTAR_FORMAT)[:512])
    for start, stop in ((157, 257), (265, 345), (500, 512)):  # link, owner, devices, padding
        hdr[start:stop] = b"\xff" * (stop - start)
    hdr[345:500] = "\u00e9".encode() * 77 + b"\0"  # a ustar prefix of 77 x "é"
    checksum = tarfile.calc_chksums(bytes(hdr))[0]
    assert sum(hdr[256:]) > 50000  # near a half's largest sum, 256 x 255

    def archive(value: int) -> bytes:
        hdr[148:156] = b"%06o\0 " % value
        return bytes(hdr) + bytes(1024)

    with tarfile.open(fileobj=io.BytesIO(archive(checksum))) as tf:
        want = [(m.name, tf.extractfile(m).read()) for m in tf]
    assert [(m["fname"], bytes(m["data"])) for m in tar_members(io.BytesIO(archive(checksum)))] == want == [("\u00e9" * 77 + "/a.txt", b"")]  # fmt: skip
    with pytest.raises(tarfile.HeaderError):
        list(tar_members(io.BytesIO(archive(checksum + 65521))))


def test_tar_members_truncated_and_corrupt(tmp_path):
    write_shards((make_sample(0, "train", i) for i in range(3)), tmp_path, shard_size=3)
    data = (tmp_path / "00000.tar").read_bytes()
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(data[: len(data) // 2])))
    corrupt = bytearray(data)
    corrupt[1024 + 130] ^= 0x01  # a size digit of the second header
    with pytest.raises(tarfile.HeaderError):
        list(tar_members(io.BytesIO(bytes(corrupt))))
    # the same through the mapped reader, and an empty file (which cannot be mapped): no members
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(tarfile.ReadError):
        list(tar_members(MappedShard(str(tmp_path / "cut.tar"))))
    with pytest.raises(tarfile.HeaderError):
        list(tar_members(MappedShard(str(tmp_path / "corrupt.tar"))))
    assert list(tar_members(MappedShard(str(tmp_path / "empty.tar")))) == []
