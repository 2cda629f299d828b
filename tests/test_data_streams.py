"""The global sample order of the shard loader (virtual streams, bimac/data/loader.py): global
step k holds the same samples in the same order on 1, 2 or 4 ranks and with any number of loader
workers, every sample at most once per epoch, resume from the merged cursor on another world size,
and a bad sample shifts only its own stream.

Reference for every expectation: the layout written here by hand. 4 shards of 80, 80, 80 and 75
samples, 4 streams (one shard each), global batch 32 -> chunk 8 per stream per step: 9 full
steps (stream 3 holds 75 = 9 * 8 + 3), 288 samples, the 27 left over counted as ``epoch_tail``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bimac.config import ConfigError
from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from bimac.data.loader import _micro_batches
from bimac.data.tokenizer import save_world_tokenizer
from bimac.data.world import make_sample
from bimac.data.writer import write_shards

GLOBAL, MICRO, STREAMS = 32, 8, 4
SIZES = (80, 80, 80, 75)
STEPS, TAIL = 9, 3 * (80 - 72) + (75 - 72)
CORRUPT = 170  # sample 10 of shard 2 (stream 2)


def _write(root, corrupt: int | None = None) -> str:
    def samples():
        for i in range(sum(SIZES)):
            s = make_sample(0, "train", i, 32)
            if i == corrupt:
                s["jpg"] = b"not a jpeg"
            yield s

    paths = []
    it = samples()
    for shard, n in enumerate(SIZES):  # uneven shard sizes: one writer call per shard
        out = root / f"part{shard}"
        (path,) = write_shards((next(it) for _ in range(n)), out, shard_size=n)
        paths.append(path.rename(root / f"{shard:05d}.tar"))
    return str(root / "{00000..00003}.tar")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    clean, bad = root / "clean", root / "bad"
    tok = save_world_tokenizer(root / "tokenizer.json")
    tokenizer = build_tokenizer(TokenizerConfig(kind="world", path=str(tok), context_length=32))
    return {
        "clean": _write(clean),
        "bad": _write(bad, CORRUPT),
        "tok": tokenizer,
        "tok_path": str(tok),
    }


def _cfg(urls: str, **kw) -> DataConfig:
    return DataConfig(train_shards=urls, image_size=32, batch_size=MICRO, streams=STREAMS,
                      shuffle_buffer=20, seed=3, **kw)  # fmt: skip


def _run(world, urls, ranks: int, workers: int, cursor=None, stop_after: int | None = None):
    """What the training loop gets: global steps (sample ids in order: the ranks' micro-batches
    concatenated in rank order) until any rank runs out, the loaders' merged cursor (after
    ``stop_after`` steps), and the summed skip counts (a rank's micro-batches beyond the last
    common step are handed back through ``drop_rest``, as the loop does)."""
    acc = GLOBAL // ranks // MICRO
    loaders, per_rank = [], []
    for rank in range(ranks):
        loader = make_loader(_cfg(urls), world["tok"], rank=rank, world_size=ranks, epoch=1,
                             global_batch_size=GLOBAL, cursor=cursor, num_workers=workers)  # fmt: skip
        batches = []
        for b in loader:
            assert len(b["sample_id"]) == MICRO and b["image"].shape == (MICRO, 3, 32, 32)
            batches.append(b)
            if stop_after is not None and len(batches) == stop_after * acc:
                break
        loaders.append(loader)
        per_rank.append(batches)
    steps = min(len(b) for b in per_rank) // acc
    merged, skipped = {}, {}
    for loader, batches in zip(loaders, per_rank):
        if stop_after is None:
            loader.drop_rest(unused=batches[steps * acc :])
        merged |= loader.state_dict()
        for k, v in loader.skipped().items():
            skipped[k] = skipped.get(k, 0) + v
    order = [
        [i for r in per_rank for mb in r[k * acc : (k + 1) * acc] for i in mb["sample_id"]]
        for k in range(steps)
    ]
    return order, merged, skipped


@pytest.fixture(scope="module")
def reference(world):
    return _run(world, world["clean"], 1, 0)


@pytest.mark.parametrize("ranks,workers", [(2, 1), (2, 2), (4, 0), (4, 1)])
def test_each_global_step_holds_the_same_samples_on_any_world_size(world, reference, ranks, workers):  # fmt: skip
    steps, _, skipped = reference
    assert len(steps) == STEPS and all(len(s) == GLOBAL for s in steps)
    seen = [i for s in steps for i in s]
    assert len(seen) == len(set(seen)) == sum(SIZES) - TAIL
    assert skipped == {"epoch_tail": TAIL}
    # each step's chunk of stream s comes from shard s (stream s owns sorted(urls)[s::4])
    for step in steps:
        shards = [i.split("#")[0][-9:] for i in step]
        assert shards == [f"{k // 8:05d}.tar" for k in range(GLOBAL)]
    other, _, skipped = _run(world, world["clean"], ranks, workers)
    assert other == steps
    assert skipped == {"epoch_tail": TAIL}  # every rank's leftovers, summed


@pytest.mark.parametrize("ranks,workers,resume_ranks,resume_workers", [(2, 2, 1, 0), (2, 2, 4, 1), (1, 0, 2, 1)])  # fmt: skip
def test_resume_from_the_merged_cursor_on_another_world_size(world, reference, ranks, workers, resume_ranks, resume_workers):  # fmt: skip
    steps = reference[0]
    first, cursor, _ = _run(world, world["clean"], ranks, workers, stop_after=7)
    assert first == steps[:7] and sorted(cursor) == [0, 1, 2, 3]
    # raw samples consumed per stream: 7 chunks of 8 good samples, no bad ones in the clean shards
    assert cursor == {s: 56 for s in range(STREAMS)}
    rest, _, _ = _run(world, world["clean"], resume_ranks, resume_workers, cursor=cursor)
    assert rest == steps[7:]


def test_a_bad_sample_shifts_only_its_own_stream(world, reference):
    steps = reference[0]
    bad, cursor, skipped = _run(world, world["bad"], 1, 0, stop_after=7)
    assert skipped == {"bad_image": 1}
    corrupt_id = f"{world['bad'].rsplit('/', 1)[0]}/00002.tar#{CORRUPT:09d}"

    def stream(order, s):
        return [i.rsplit("/", 1)[1] for step in order for i in step[s * 8 : (s + 1) * 8]]

    for s in (0, 1, 3):
        assert stream(bad, s) == stream(steps[:7], s)
    corrupt = corrupt_id.rsplit("/", 1)[1]
    assert corrupt in stream(steps[:7], 2)  # the fixture's premise: it falls in steps 1-7
    assert stream(bad, 2) == [i for i in stream(steps, 2) if i != corrupt][:56]
    assert cursor == {0: 56, 1: 56, 2: 57, 3: 56}  # stream 2 read one more raw sample


def test_layouts_that_cannot_keep_the_order_are_refused_in_one_line(world):
    tok = world["tok"]
    with pytest.raises(ConfigError, match="data.streams=4 is not a multiple of the world size 3"):
        make_loader(_cfg(world["clean"]), tok, rank=0, world_size=3, global_batch_size=48)
    with pytest.raises(ConfigError, match="do not divide the global batch 30"):
        make_loader(_cfg(world["clean"]), tok, rank=0, world_size=1, global_batch_size=30)
    with pytest.raises(ConfigError, match="has 1 shards: each stream owns whole shards"):
        one = world["clean"].replace("{00000..00003}", "00000")
        make_loader(_cfg(one), tok, rank=0, world_size=1, global_batch_size=GLOBAL)
    with pytest.raises(ConfigError, match="cursor has 2 streams but data.streams=4"):
        make_loader(_cfg(world["clean"]), tok, rank=0, world_size=1, global_batch_size=GLOBAL,
                    cursor={0: 8, 1: 8})  # fmt: skip


def _chunk(first: int, n: int) -> dict:
    """A collated chunk of ``n`` samples numbered from ``first``: channels-last uint8 images whose
    pixels carry the sample number, token rows, a list."""
    ids = torch.arange(first, first + n)
    image = ids.to(torch.uint8).view(n, 1, 1, 1).expand(n, 4, 4, 3).contiguous()
    return {
        "image": image.permute(0, 3, 1, 2),
        "text": ids.view(n, 1).repeat(1, 5),
        "sample_id": [f"s{i}" for i in ids.tolist()],
    }


@pytest.mark.parametrize("sizes,micro", [([8, 8, 8, 8], 16), ([8, 8], 4), ([8, 8, 8], 6), ([5, 3, 0], 4), ([4], 8)])  # fmt: skip
def test_micro_batches_cut_the_chunks_as_concatenating_them_would(sizes, micro):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chunks = [_chunk(a, n) for a, n in zip(starts, sizes) if n]
    got = _micro_batches(chunks, micro)
    # reference: concatenate every chunk, then cut every `micro` samples (the loader's old path)
    whole = {k: torch.cat([c[k] for c in chunks]) for k in ("image", "text")}
    ids = [i for c in chunks for i in c["sample_id"]]
    cuts = range(0, len(ids), micro)
    assert [b["sample_id"] for b in got] == [ids[i : i + micro] for i in cuts]
    for b, i in zip(got, cuts):
        assert torch.equal(b["image"], whole["image"][i : i + micro])
        assert torch.equal(b["text"], whole["text"][i : i + micro])
        assert b["image"].is_contiguous(memory_format=torch.channels_last)
    # a micro-batch inside one chunk is a view of it, not a copy
    for b in got:
        owners = [c for c in chunks if b["sample_id"][0] in c["sample_id"]]
        if set(b["sample_id"]) <= set(owners[0]["sample_id"]):
            assert b["image"].untyped_storage().data_ptr() == owners[0]["image"].untyped_storage().data_ptr()  # fmt: skip


@pytest.fixture(scope="module")
def reference_images(world):
    loader = make_loader(_cfg(world["clean"]), world["tok"], rank=0, world_size=1, epoch=1,
                         global_batch_size=GLOBAL, num_workers=0)  # fmt: skip
    return [(b["sample_id"], b["image"].clone()) for b in loader]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_reused_image_buffer_is_never_overwritten_while_a_tensor_can_see_it(world, reference_images, workers):  # fmt: skip
    """The pooled image buffers (``SharedImagePool``: the workers' shared memory, or the
    loader's own with no workers) are reused once the trainer dropped a batch, never while any
    tensor on them lives: every third micro-batch is kept to the end, as a ``detach()`` view, a
    slice or a numpy array of its image, and must still hold its pixels after the epoch.
    Reference: the 0-worker loader's images, cloned as handed out (the same samples in the same
    order), exactly equal."""
    loader = make_loader(_cfg(world["clean"]), world["tok"], rank=0, world_size=1, epoch=1,
                         global_batch_size=GLOBAL, num_workers=workers)  # fmt: skip
    kept, seen = [], []
    for i, b in enumerate(loader):
        seen.append((b["sample_id"], b["image"].clone()))  # its pixels when handed out
        if i % 3 == 0:
            kept.append((i, (b["image"].detach(), b["image"][2:], b["image"].numpy())[i % 9 // 3]))
        del b  # the rest are dropped at once: their buffers may come back
    assert loader.loader.num_workers == workers
    assert [ids for ids, _ in seen] == [ids for ids, _ in reference_images]
    for (_, got), (_, want) in zip(seen, reference_images):
        assert torch.equal(got, want)
    for i, view in kept:
        want = reference_images[i][1]
        want = want[2:] if i % 9 == 3 else want
        assert torch.equal(torch.as_tensor(view), want), f"micro-batch {i} was overwritten"
    # the buffers of the dropped batches did come back (else this test would prove nothing)
    assert loader.dataset.pool.reused > 0


TRAINER = """
import sys
import heavy_dependency  # noqa: F401  (what a trainer's main module imports: transformers, ...)
from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader

if __name__ == "__main__":
    urls, tok = sys.argv[1], sys.argv[2]
    tokenizer = build_tokenizer(TokenizerConfig(kind="world", path=tok, context_length=32))
    cfg = DataConfig(train_shards=urls, image_size=32, batch_size=8, streams=4, num_workers=2)
    for epoch in range(2):
        loader = make_loader(cfg, tokenizer, rank=0, world_size=1, epoch=epoch, global_batch_size=32)
        print(sum(len(b["sample_id"]) for b in loader))
"""


def test_loader_workers_do_not_import_the_trainers_main_module_again(world, tmp_path):
    """Every loader worker re-runs the trainer's main module (multiprocessing's spawn rules for a
    child not forked from its parent); with ``python -m finetune.caption_bn`` that was its imports,
    ~5 CPU-s per worker per epoch. The fork server imports the main module once, so its imports
    run in two processes only (the trainer and the server), not in each of the 2 workers x 2
    epochs. Reference: the pids ``heavy_dependency`` records each time it is imported."""
    import os
    import subprocess
    import sys

    (tmp_path / "trainer_main.py").write_text(TRAINER)
    log = tmp_path / "imports.log"
    (tmp_path / "heavy_dependency.py").write_text(
        f"import os\nwith open({str(log)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo}"}
    out = subprocess.run(
        [sys.executable, "-m", "trainer_main", world["clean"], world["tok_path"]],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["288", "288"]  # both epochs ran through 2 workers
    assert len(log.read_text().split()) == 2, log.read_text()


@pytest.mark.parametrize("user_setting", [None, "true"])
def test_loader_workers_turn_tokenizer_threads_off_unless_the_user_set_them(user_setting, monkeypatch):  # fmt: skip
    """A worker's set-up (``_init_worker``) sets ``TOKENIZERS_PARALLELISM=false`` (the workers
    are the parallelism; the HF tokenizers pool on top of them spins idle threads), and leaves a
    value the user set alone."""
    import os

    from bimac.data.loader import _init_worker

    if user_setting is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", user_setting)
    _init_worker(os.getpid(), 0)
    assert os.environ["TOKENIZERS_PARALLELISM"] == (user_setting or "false")
