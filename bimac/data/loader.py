"""WebDataset pipelines for pairs and triplets (img2dataset layout), as the trainer reads them.

A global sample order, independent of the world size and of the DataLoader workers (MosaicML
Streaming's "canonical nodes"):

- **Streams.** ``data.streams`` = S virtual streams. Stream s owns the shards
  ``sorted(urls)[s::S]`` for the whole run and reads them one after another in an order shuffled
  by (seed, epoch, s), through its own shuffle buffer seeded by (seed, epoch, s). A stream just
  continues into its next shard: shard boundaries do not show in the order. Resampled mode: each
  stream draws shards from the whole set with replacement, seeded by (seed, epoch, s), and reads
  ``epoch_samples // S`` raw samples per epoch.
- **Global steps.** Global step k of an epoch takes ``chunk = global_batch / S`` consecutive good
  samples from every stream; the global batch is the streams' chunks in stream order. Rank r of W
  serves streams ``[r*S/W, (r+1)*S/W)``: its slice is its streams' chunks in stream order, cut
  into micro-batches of ``batch_size``. Which samples form step k, and their order, depend only on
  the seed, the epoch and the global batch; per-sample draws are keyed by (seed, epoch, sample
  key) (``ShardDataset.sample_rng``).
- **Bad samples** are skipped and counted by reason; the stream that met one reads one more raw
  sample, no other stream or rank shifts.
- **Epoch end.** When any stream cannot fill its next chunk the epoch ends on every rank (the
  loop all-reduces it); the good samples left in the other streams are dropped and counted as
  ``epoch_tail`` (``Loader.drop_rest``).
- **Workers.** A rank's streams are divided among its workers (stream j of the rank -> worker
  j % workers); ``num_workers`` is lowered to a divisor of the rank's stream count so that every
  worker serves as many streams (the DataLoader asks its workers in strict turn). A worker reads,
  decodes and collates whole chunks; the main process (``Loader``) joins each step's chunks.
  A worker stacks a chunk's images into one of its reused shared-memory buffers, freed for
  reuse only once no tensor in the main process uses it (``SharedImagePool``; the loader does
  the same in-process with no workers); the chunk's small arrays cross pickled inline, never as
  shared-memory tensors (``_for_the_queue``).
- **Resume.** A stream's cursor is the count of raw (post-shuffle-buffer) samples it consumed,
  good and bad, through the last global step handed out in full; replaying the stream (tar
  reading and shuffling, no decoding) and skipping that many is exact. ``Loader.state_dict()``
  gives a rank's streams; the run merges every rank's into the checkpoint, so any world size
  dividing S resumes it.

A one-pass reader (evaluation, tools: no global batch) is one stream on one rank.

Skip counts live in shared memory, so the main process sees what every worker skipped:
``loader.skipped()`` -> ``{reason: count}``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import logging
import math
import mmap
import multiprocessing as mp
import os
import random
import re
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import torch
import webdataset as wds
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bimac.config import ConfigError, path_hint
from bimac.data.decode import decode_batch, decode_image, decode_or_defer
from bimac.data.tokenizer import Tokenizer, noun_token_spans, strip_special

log = logging.getLogger(__name__)

REASONS = (
    "shard_open",  # shard could not be opened (missing file, failed pipe:)
    "truncated_tar",  # tar ended early: the rest of that shard is skipped
    "tar_format",  # other tar-level errors (e.g. duplicate member names)
    "missing_image",
    "bad_image",  # unreadable or truncated image
    "image_too_large",  # header claims more than PIL's MAX_IMAGE_PIXELS: refused before decoding
    "missing_caption",
    "missing_label",  # classification evaluation: no integer cls / label_index
    "empty_caption",
    "bad_caption_encoding",  # caption is not UTF-8
    "bad_json",
    "missing_syn_image",  # triplets: no KEY.syn.jpg, or unreadable
    "missing_bn_caption",  # triplets: no / empty / non-UTF-8 KEY.bn.txt
    "epoch_tail",  # good samples after an epoch's last full global step (a stream ran out)
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # shard member / file suffixes, first wins


@dataclasses.dataclass
class DataConfig:
    """Where the shards are and how batches are made (``configs/data/*.yaml``)."""

    train_shards: str = ""  # brace pattern / glob / "a.tar::b.tar" / "pipe:cmd"
    val_shards: str = ""
    kind: Literal["pairs", "triplets"] = "pairs"
    caption_lang: Literal["en", "bn"] = "en"  # pairs: which caption becomes `text`
    random_caption: bool = True  # world shards: draw one of the 5 captions per sample
    image_size: int = 64  # the image tower's input side
    batch_size: int = 32  # per rank
    num_workers: int = 0  # per rank; lowered to a divisor of the rank's stream count
    # Virtual streams (module docstring): stream s owns shards sorted(urls)[s::streams] for the
    # whole run. Must be a multiple of every world size the run will use, divide the global batch
    # (train.global_batch_size), and in exact mode be at most the number of shards.
    streams: int = 1
    resampled: bool = False  # True: each stream samples shards with replacement
    epoch_samples: int = 0  # resampled mode: raw samples read per epoch, over all streams
    shuffle_buffer: int = 1000  # 0 disables sample shuffling
    seed: int = 0
    max_nouns: int = 8
    noun_source: Literal["json", "spacy", "none"] = "json"  # spacy: extract from the caption
    spacy_pipeline: str = "en_core_web_sm"
    drop_last: bool = False  # one-pass readers: drop the final short batch (training always does)
    # cuda: workers ship JPEG bytes and the main process decodes each batch on the GPU (nvjpeg)
    decode_on: Literal["cpu", "cuda"] = "cpu"
    # pairs: add `references`, every caption of the image (world JSON `captions_en`/`captions_bn`,
    # else the sample's own caption) as token ids without specials, for the RF reward
    references: bool = False


def check_spacy_pipeline(cfg: DataConfig) -> None:
    """With ``noun_source: spacy``, fail now if the pipeline is not installed, rather than in the
    first DataLoader worker that meets a caption without nouns."""
    name = cfg.spacy_pipeline
    if cfg.noun_source != "spacy" or name == "world" or Path(name).exists():
        return
    import importlib.util

    from bimac.data.nouns import INSTALL_HINT

    if importlib.util.find_spec(name) is None:
        raise ConfigError("data.spacy_pipeline: " + INSTALL_HINT.format(name=name))


def worker_context() -> mp.context.BaseContext:
    """How loader workers start: from a fork server, never by forking the trainer, whose threads
    (gloo, DeepSpeed, logging) may hold a lock at the moment of the fork and leave the child
    stuck for ever (RELIABILITY.md, "hang at an epoch boundary"). The server is a fresh,
    single-threaded interpreter that imports this module once; each worker forks from it.

    A worker also runs the trainer's main module again, as multiprocessing does for every child
    it does not fork from the parent (``python -m finetune.caption_bn``: its imports, ~5 CPU-s,
    in each worker of each epoch). The server imports that module too, so a worker only re-runs
    its top level over imports already made. (``python -m pkg`` runs ``pkg.__main__``, which
    multiprocessing never re-runs.)"""
    if os.name != "posix":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(main, "name", None)
    ctx.set_forkserver_preload([__name__] + ([name] if name and not name.endswith("__main__") else []))  # fmt: skip
    return ctx


class SkipCounter:
    """Counts of skipped samples by reason, in shared memory (visible across workers)."""

    def __init__(self) -> None:
        self._counts = worker_context().Array("q", len(REASONS))
        self._warned: set[str] = set()

    def add(self, reason: str, detail: str = "", count: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[REASONS.index(reason)] += count
        level = logging.WARNING if reason not in self._warned else logging.DEBUG
        self._warned.add(reason)
        log.log(level, "skipped sample (%s): %s", reason, detail)

    def as_dict(self) -> dict[str, int]:
        return {r: int(c) for r, c in zip(REASONS, self._counts[:]) if c}

    def reset(self) -> None:
        with self._counts.get_lock():
            self._counts[:] = [0] * len(REASONS)


def _streamed(url: str) -> bool:
    """Whether ``url`` is a ``pipe:`` command or a URL (``s3://``, ``https://``, ...), which
    webdataset opens as a stream, rather than a local path."""
    return url.startswith("pipe:") or "://" in url


def expand_shards(pattern: str) -> list[str]:
    """Brace/``::`` expansion and globbing; a pattern matching no shard is an error here."""
    if not pattern:
        raise ValueError("no shard pattern given (data.train_shards is empty)")
    urls: list[str] = []
    for url in wds.shardlists.expand_urls(pattern):
        if _streamed(url):
            urls.append(url)
        elif any(c in url for c in "*?["):
            urls += sorted(glob.glob(url))
        elif os.path.isfile(url):
            urls.append(url)
        else:
            raise FileNotFoundError(f"shard {url!r} (from pattern {pattern!r}) does not exist")
    if not urls:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no shard")
    return urls


def require_shards(pattern: str, key: str) -> list[str]:
    """:func:`expand_shards` at start-up: a pattern matching no shard is a :class:`ConfigError`
    naming the config key, raised before DeepSpeed, wandb or a worker starts."""
    try:
        return expand_shards(pattern)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}{path_hint(pattern)}") from err


def tar_members(stream) -> Iterator[dict]:
    """``{"fname", "data"}`` of each regular file in a tar stream, in order; ``data`` is what the
    stream's ``read`` returns (bytes, or a ``memoryview`` of a :class:`MappedShard`).

    A lean replacement for ``tarfile``'s streaming reader (which webdataset uses): ~12x less CPU
    per sample on img2dataset shards, where every member carries a PAX header (float mtime).
    Handles ustar prefixes, PAX ``path`` records and GNU long names; skips webdataset's
    ``__meta__`` files. A short read raises ``tarfile.ReadError`` (truncated shard), a header
    with a bad checksum ``tarfile.HeaderError``.
    """
    read = stream.read
    long_name = None
    while True:
        hdr = bytes(read(512))  # no copy when the stream gives bytes
        if len(hdr) < 512:
            if hdr:
                raise tarfile.ReadError("unexpected end of data")
            return
        # The checksum is the sum of the header's bytes, its own field counted as spaces. Summed
        # in C: the low 16 bits of Adler-32 are 1 + the bytes' sum modulo 65521, which a half
        # header (at most 256 x 255) never reaches.
        total = (zlib.adler32(hdr[:256]) & 0xFFFF) + (zlib.adler32(hdr[256:]) & 0xFFFF) - 2
        if not total:  # end-of-archive marker
            return
        field = hdr[148:156]
        if total - sum(field) + 256 != int(field.strip(b"\0 ") or b"0", 8):
            raise tarfile.HeaderError("bad tar header checksum")
        size = hdr[124:136]
        size = (
            int.from_bytes(size[1:], "big")
            if size[0] & 0x80
            else int(size.strip(b"\0 ") or b"0", 8)
        )
        pad = -size % 512
        data = read(size)  # then the padding apart: slicing it off would copy the payload again
        if len(data) < size or (pad and len(read(pad)) < pad):
            raise tarfile.ReadError("unexpected end of data")
        kind = hdr[156:157]
        if kind in (b"x", b"L"):
            data = bytes(data)
        if kind == b"x":  # PAX extended header: only the path matters here
            for rec in data.split(b"\n") if b" path=" in data else ():
                _, _, kv = rec.partition(b" ")
                if kv.startswith(b"path="):
                    long_name = kv[5:].decode("utf-8")
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers, ...
            long_name = None
            continue
        name = long_name
        if name is None:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8") + "/" + name
        long_name = None
        if not (name.startswith("__") and name.endswith("__")):
            yield {"fname": name, "data": data}


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (Python's ``hash()`` of a
    string is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class MappedShard:
    """A local shard mapped into memory and read as a stream: ``read(n)`` is a ``memoryview`` of
    its next ``n`` bytes (shorter at the end), no copy.

    Read into a fresh ``bytes`` each, a sample's image is copied out of the page cache, and the
    shuffle buffer holds a private copy of every image in it (2 x 1000 x ~220 KB per worker on
    photo_1024) that a fresh worker faults in page by page. Mapped, the buffer holds views of the
    page cache: photo_1024's loader spends 0.02-0.07 ms a sample less besides decoding at 0-2
    workers, whose faults drop from 41-44 pages a sample to 14-17 (BENCHMARKS.md).
    ``MAP_POPULATE`` maps the whole file at once: page by page, the decoder's first touch of each
    page cost more than the copy saved. The mapping is released when the last view of it (the
    last of its samples in the shuffle buffer) is gone. A shard cut shorter on disk *while*
    mapped raises SIGBUS in the reader (RELIABILITY.md); one short when opened is a truncated tar
    as before.
    """

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            buf = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ) if size else b""
        self._view, self._pos = memoryview(buf), 0

    def read(self, n: int) -> memoryview:
        out = self._view[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def close(self) -> None:
        """Nothing to do: the samples' views keep the mapping until they are gone."""


def open_shard(url: str, mapped: bool = False):
    """``url`` as a readable stream: a :class:`MappedShard` for a local file when ``mapped`` (on
    POSIX), else ``webdataset.gopen`` (``pipe:``, URLs, files)."""
    if mapped and os.name == "posix" and not _streamed(url):
        return MappedShard(url)
    return wds.gopen(url)


def shard_members(
    urls: Iterable[str], counter: SkipCounter, mapped: bool = False
) -> Iterator[dict]:
    """Tar members (with ``__url__``) of each shard, then an end-of-shard marker ``{}``; a shard
    that cannot be opened is skipped and a broken one ends early, both counted by reason.
    ``mapped``: local shards' payloads are views of the mapped file (:class:`MappedShard`)."""
    for url in urls:
        try:
            stream = open_shard(url, mapped)
        except Exception as exn:
            counter.add("shard_open", f"{url}: {exn!r}")
            continue
        reason = detail = None
        try:
            try:
                for member in tar_members(stream):
                    member["__url__"] = url
                    yield member
            except (tarfile.ReadError, EOFError) as exn:
                reason, detail = "truncated_tar", f"{exn}; the rest of this shard is skipped"
            except OSError as exn:  # e.g. a pipe: command that failed
                reason, detail = "shard_open", repr(exn)
            except Exception as exn:
                reason, detail = "tar_format", f"{exn!r}; the rest of this shard is skipped"
        finally:
            try:
                stream.close()
            except Exception as exn:  # a failed pipe: command reports its exit status here
                reason, detail = "shard_open", repr(exn)
        if reason:
            counter.add(reason, f"{url}: {detail}")
        yield {}  # no sample spans two shards


# webdataset's key/extension split (``tariterators.base_plus_ext``): the key is the path up to
# the first dot of the file's base name, the extension the rest
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def group_members(members: Iterable[dict], counter: SkipCounter) -> Iterator[dict]:
    """Consecutive members with the same key -> ``{"__key__", "__url__", ext: data, ...}``.

    webdataset's ``group_by_keys`` gives the same samples (tested) at about a third of its CPU
    per sample: no regex for the usual name without a folder, no per-member exception frame. A
    member without an extension is dropped, extensions are lower-cased, a second member with
    the same extension in one sample is dropped and counted (``tar_format``), and the ``{}``
    marker of ``shard_members`` ends a sample (no sample spans two shards).
    """
    sample = None
    for member in members:
        if not member:
            if sample is not None:
                yield sample
            sample = None
            continue
        name = member["fname"]
        if "/" in name:
            match = _KEY_EXT.match(name)
            if match is None:
                continue
            key, ext = match.groups()
        else:  # what the pattern does without a folder, without the pattern
            key, dot, ext = name.partition(".")
            if not (key and dot):
                continue
        ext = ext.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": member["__url__"]}
        if ext in sample:
            counter.add(
                "tar_format", f"{member['__url__']}: {name}: duplicate file name in tar file"
            )
            continue
        sample[ext] = member["data"]
    if sample is not None:
        yield sample


def shard_samples(
    urls: Iterable[str], counter: SkipCounter, mapped: bool = False
) -> Iterator[dict]:
    """Undecoded samples (``group_members`` of ``shard_members``), in shard order; ``mapped``: a
    local shard's members are ``memoryview``s of it, not ``bytes``."""
    return group_members(shard_members(urls, counter, mapped), counter)


def _json(raw: bytes) -> Any:
    """A sample's JSON: orjson (~3x faster on the world's), or the standard library where orjson
    refuses what Python writes (``NaN``, as img2dataset's metadata columns carry)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(bytes(raw))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _text(sample: dict, key: str) -> str | None:
    raw = sample.get(key)
    return None if raw is None else str(raw, "utf-8").strip()  # bytes or a memoryview


class ShardDataset(IterableDataset):
    """The training pipeline over a shard set, as virtual streams (module docstring); yields one
    stream's chunk at a time: ``{"stream", "chunk", "raw_end", "size", "batch", "pooled"}``, where
    ``batch`` is a collated batch dict (docs/contracts.md, "Batch") of ``size`` samples (None when
    0) and ``pooled`` maps its image keys to their ``SharedImagePool`` slots."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        urls: str | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        epoch: int = 0,
        global_batch_size: int | None = None,
        cursor: dict[int, int] | None = None,
        tokenizer_bn: Tokenizer | None = None,
        counter: SkipCounter | None = None,
    ) -> None:
        self.cfg = cfg
        self.urls = sorted(expand_shards(urls if urls is not None else cfg.train_shards))
        if rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.rank, self.world_size = rank, world_size or 1
        self.epoch = epoch
        self.tokenizer = tokenizer
        self.tokenizer_bn = tokenizer_bn or tokenizer
        self.counter = counter or SkipCounter()
        if cfg.caption_lang == "bn" and cfg.noun_source == "spacy":
            raise ValueError("noun_source=spacy extracts English nouns; use json or none for bn")
        check_spacy_pipeline(cfg)
        if cfg.decode_on == "cuda" and not torch.cuda.is_available():
            raise ConfigError("data.decode_on=cuda: no CUDA device here; use data.decode_on=cpu")
        if cfg.resampled and cfg.epoch_samples <= 0:
            raise ValueError("resampled mode needs data.epoch_samples > 0 (samples per epoch)")
        # a one-pass reader (evaluation, tools) is one stream on one rank, batches of batch_size
        self.training = global_batch_size is not None
        if not self.training and self.world_size != 1:
            raise ValueError("a loader for several ranks needs make_loader(global_batch_size=...)")
        self.streams = cfg.streams if self.training else 1
        self.global_batch = global_batch_size if self.training else cfg.batch_size
        self._check_layout()
        self.chunk = self.global_batch // self.streams
        per_rank = self.streams // self.world_size
        self.my_streams = list(range(self.rank * per_rank, (self.rank + 1) * per_rank))
        self.start = self._start_positions(cursor or {})
        self._nouns = None  # spaCy extractor, built lazily in the worker
        self.pool: SharedImagePool | None = None  # the Loader's, when it runs workers

    def _check_layout(self) -> None:
        s, w, g, b = self.streams, self.world_size, self.global_batch, self.cfg.batch_size
        if s < 1 or s % w:
            raise ConfigError(
                f"data.streams={s} is not a multiple of the world size {w}: set data.streams to a "
                "multiple of every number of ranks the run will use (e.g. 8 for 1, 2, 4 or 8)"
            )
        if g % s or (g // w) % b:
            raise ConfigError(
                f"data.streams={s} and data.batch_size={b} on {w} ranks do not divide the global "
                f"batch {g} (train.global_batch_size): choose data.streams dividing it"
            )
        if not self.cfg.resampled and len(self.urls) < s:
            raise ConfigError(
                f"data.streams={s} but data.train_shards has {len(self.urls)} shards: each stream "
                f"owns whole shards; set data.streams to at most {len(self.urls)} or use more shards"
            )

    def _start_positions(self, cursor: dict[int, int]) -> dict[int, int]:
        """Each of this rank's streams' raw position from the run's merged cursor (0: fresh)."""
        if cursor and sorted(cursor) != list(range(self.streams)):
            raise ConfigError(
                f"the checkpoint's data cursor has {len(cursor)} streams but data.streams="
                f"{self.streams}: resume with the data.streams it was written with, or start fresh "
                "with train.resume=none"
            )
        return {s: int(cursor.get(s, 0)) for s in self.my_streams}

    # -- sample stream ---------------------------------------------------------------------------
    def _seed(self, *parts: object) -> int:
        return stable_seed(self.cfg.seed, self.epoch, *parts)

    def stream_urls(self, stream: int) -> list[str]:
        """Exact mode: the shards ``stream`` owns (``sorted(urls)[stream::streams]``, the same
        for the whole run), in this epoch's order (seeded by seed, epoch, stream)."""
        urls = self.urls[stream :: self.streams]
        random.Random(self._seed(stream, "shards")).shuffle(urls)
        return urls

    def _shards(self, stream: int) -> Iterator[str]:
        if self.cfg.resampled:  # with replacement from the whole set, seeded by the stream
            rng = random.Random(self._seed(stream, "shards"))
            while True:
                yield rng.choice(self.urls)
        yield from self.stream_urls(stream)

    def raw_samples(self, stream: int | None = None) -> Iterator[dict]:
        """Undecoded samples of ``stream`` in this epoch's order: its shards one after another,
        then its own shuffle buffer (seeded by seed, epoch, stream). ``None``: every stream in
        turn (tools reading an exact-mode shard set once). A resumed stream replays this and
        skips its cursor: tar reading and shuffling only, no decoding."""
        if stream is None:
            return itertools.chain.from_iterable(map(self.raw_samples, range(self.streams)))
        samples = shard_samples(self._shards(stream), self.counter, mapped=True)
        if self.cfg.shuffle_buffer > 0:
            rng = random.Random(self._seed(stream, "buffer"))
            samples = wds.filters.shuffle(self.cfg.shuffle_buffer, 100, rng=rng)(samples)
        return samples

    def stream_chunks(self, stream: int) -> Iterator[dict]:
        """``stream``'s chunks of ``self.chunk`` good samples from its start position on, then one
        short chunk (possibly empty) that marks its end. ``raw_end``: raw samples (good and bad)
        the stream has consumed through the chunk's last sample; resampled mode reads
        ``epoch_samples // streams`` raw samples per epoch."""
        start = self.start[stream]
        stop = self.cfg.epoch_samples // self.streams if self.cfg.resampled else None
        items: list[dict] = []
        index, position = 0, start
        for raw in itertools.islice(self.raw_samples(stream), start, stop):
            position += 1
            item = self.decode(raw)
            if item is None:  # counted; only this stream reads one more raw sample
                continue
            items.append(item)
            if len(items) == self.chunk:
                yield self._chunk(stream, index, position, items)
                items, index = [], index + 1
        yield self._chunk(stream, index, position, items)

    def _chunk(self, stream: int, index: int, raw_end: int, items: list[dict]) -> dict:
        pooled: dict[str, int] = {}
        batch = self.collate(items, pooled) if items else None
        if batch is not None and get_worker_info() is not None:
            batch = _for_the_queue(batch)
        return {"stream": stream, "chunk": index, "raw_end": raw_end, "size": len(items), "batch": batch, "pooled": pooled}  # fmt: skip

    def sample_rng(self, sample: dict) -> random.Random:
        """The sample's own random draws (which caption, ...), keyed by seed, epoch and sample key:
        the same whichever rank or worker decodes it and wherever a resumed run restarts."""
        return random.Random(stable_seed(self.cfg.seed, self.epoch, sample.get("__key__")))

    # bytes, size -> (uint8 HWC, (w, h)); an instance attribute travels to the workers with the
    # dataset (benchmarks/data_loader.py sets today's PIL path here for its side-by-side run)
    image_decoder = staticmethod(decode_image)

    def decode(self, sample: dict) -> dict | None:
        """Checks and decodes one sample; counts and returns None when it is bad."""
        cfg, key = self.cfg, f"{sample.get('__url__')}#{sample.get('__key__')}"
        img_key = next((e for e in IMAGE_EXTS if e in sample), None)
        if img_key is None:
            return self.counter.add("missing_image", key)
        meta = {}
        if "json" in sample:
            try:
                meta = _json(sample["json"])
                assert isinstance(meta, dict)
            except (ValueError, AssertionError):
                return self.counter.add("bad_json", key)
        triplet = cfg.kind == "triplets"
        try:
            text = _text(sample, "en.txt" if triplet and "en.txt" in sample else "txt")
            text_bn = _text(sample, "bn.txt")
        except UnicodeDecodeError:
            return self.counter.add("bad_caption_encoding", key)
        if text is None:
            return self.counter.add("missing_caption", key)
        if not text:
            return self.counter.add("empty_caption", key)
        nouns = None  # list of (start, end, box or None)
        references = [text]  # real data: one caption per image
        if triplet:
            if not text_bn:
                return self.counter.add("missing_bn_caption", key)
            if "syn.jpg" not in sample:
                return self.counter.add("missing_syn_image", key)
        elif "captions_en" in meta and (cfg.caption_lang == "en" or "captions_bn" in meta):
            caps = meta["captions_bn"] if cfg.caption_lang == "bn" else meta["captions_en"]
            i = self.sample_rng(sample).randrange(len(caps)) if cfg.random_caption else 0
            text, references = caps[i], list(caps)
            # the world's shards and those tagged by shards.nouns carry nouns per caption; the
            # others fall back to the noun extractor
            noun_lists = meta.get("nouns_bn" if cfg.caption_lang == "bn" else "nouns")
            nouns = noun_lists[i] if noun_lists else None
        elif cfg.caption_lang == "bn":
            if not text_bn:
                return self.counter.add("missing_bn_caption", key)
            text = text_bn
        if triplet and "nouns" in meta and text in meta.get("captions_en", []):  # world triplets
            nouns = meta["nouns"][meta["captions_en"].index(text)]
        decode = decode_or_defer if cfg.decode_on == "cuda" else self.image_decoder
        try:
            image, (w, h) = decode(sample[img_key], cfg.image_size)
        except Image.DecompressionBombError as exn:
            return self.counter.add("image_too_large", f"{key}: {exn}")
        except Exception as exn:  # PIL raises many types for broken files
            return self.counter.add("bad_image", f"{key}: {exn!r}")
        out = {"image": image, "text": text, "sample_id": key}
        if triplet:
            try:
                out["image_syn"] = decode(sample["syn.jpg"], cfg.image_size)[0]
            except Exception as exn:
                return self.counter.add("missing_syn_image", f"{key}: {exn!r}")
            out["text_bn"] = text_bn
        if cfg.references:
            out["references"] = references
        out["nouns"] = self._noun_spans(nouns, meta, w, h)
        return out

    def _noun_spans(self, nouns, meta, w, h) -> list[tuple[int, int, list[float] | None]] | None:
        """The shard's nouns as ``(start, end, box or None)``; None: spaCy's, which ``collate``
        extracts for the whole chunk at once."""
        if nouns is not None:
            objs = meta.get("objects", [])
            return [(n["start"], n["end"], _union_box(objs, n, w, h, self.cfg.image_size)) for n in nouns]  # fmt: skip
        return None if self.cfg.noun_source == "spacy" else []

    def _extract_nouns(self, items: list[dict]) -> None:
        """spaCy's nouns for the items whose shard gave none: their captions through one
        ``nlp.pipe``: 0.65-0.71 ms of CPU a caption against 2.2-2.3 ms for a call each, with an
        en_core_web_sm-sized tagger (``benchmarks/noun_extraction.py``, BENCHMARKS.md)."""
        todo = [it for it in items if it["nouns"] is None]
        if not todo:
            return
        if self._nouns is None:
            from bimac.data.nouns import NounExtractor

            self._nouns = NounExtractor(self.cfg.spacy_pipeline)
        for it, nouns in zip(todo, self._nouns.batch([it["text"] for it in todo]), strict=True):
            it["nouns"] = [(n.start, n.end, None) for n in nouns]

    # -- batches ---------------------------------------------------------------------------------
    def collate(self, items: list[dict], pooled: dict[str, int] | None = None) -> dict:
        """Stack uint8 images, tokenise, map noun character spans to token spans. In a worker
        with a ``pool``, images go into its reused buffers and ``pooled`` gets {key: slot}."""
        self._extract_nouns(items)
        ids, offsets = self.tokenizer.encode_with_offsets([it["text"] for it in items])
        spans, mask, boxes, has_box = self._noun_arrays(items, offsets)
        batch = {
            **self._images("image", [it["image"] for it in items], pooled),
            "text": ids,
            "noun_spans": torch.from_numpy(spans),
            "noun_mask": torch.from_numpy(mask),
            "noun_boxes": torch.from_numpy(boxes),
            "noun_has_box": torch.from_numpy(has_box),
            "sample_id": [it["sample_id"] for it in items],
        }
        if self.cfg.references:
            batch["references"] = self._references([it["references"] for it in items])
        if self.cfg.kind == "triplets":
            batch |= self._images("image_syn", [it["image_syn"] for it in items], pooled)
            batch["text_bn"] = self.tokenizer_bn.encode([it["text_bn"] for it in items])
        return batch

    def _noun_arrays(self, items: list[dict], offsets: np.ndarray) -> tuple[np.ndarray, ...]:
        """The batch's noun spans ``int64 [B, max_nouns, 2]`` (token indices), their mask, boxes
        ``float32 [B, max_nouns, 4]`` and box mask: each sample's first ``max_nouns`` nouns the
        tokenizer kept, in caption order. Every noun of the batch at once (``noun_token_spans``)."""
        b, n = len(items), self.cfg.max_nouns
        spans, boxes = np.zeros((b, n, 2), np.int64), np.zeros((b, n, 4), np.float32)
        mask, has_box = np.zeros((b, n), bool), np.zeros((b, n), bool)
        nouns = [noun for it in items for noun in it["nouns"]]
        if not nouns:
            return spans, mask, boxes, has_box
        rows = np.repeat(np.arange(b), [len(it["nouns"]) for it in items])
        chars = np.array([noun[:2] for noun in nouns], np.int64)
        token, found = noun_token_spans(offsets[rows], chars[:, 0], chars[:, 1])
        # each kept noun's place in its row: the kept nouns before it in that row
        kept_before = np.cumsum(found) - found
        place = kept_before - kept_before[np.searchsorted(rows, rows)]
        keep = found & (place < n)
        spans[rows[keep], place[keep]], mask[rows[keep], place[keep]] = token[keep], True
        with_box = [i for i in np.flatnonzero(keep) if nouns[i][2] is not None]
        if with_box:
            boxes[rows[with_box], place[with_box]] = [nouns[i][2] for i in with_box]
            has_box[rows[with_box], place[with_box]] = True
        return spans, mask, boxes, has_box

    def _images(self, key: str, arrays: list[np.ndarray], pooled: dict[str, int] | None) -> dict:
        """``{key: uint8 [B, 3, H, W]}``; with ``decode_on: cuda``, ``{key_encoded: [tensors]}``
        (JPEG bytes or pixels) for ``decode_batch`` in the main process."""
        if self.cfg.decode_on == "cuda":
            return {f"{key}_encoded": [torch.from_numpy(a) for a in arrays]}
        out, slot = None, -1
        if self.pool is not None and pooled is not None:
            out, slot = self.pool.take((len(arrays), *arrays[0].shape))
        images = _stack(arrays, out)
        if slot >= 0:
            pooled[key] = slot
            images = self.pool.send(slot, images)
        return {key: images}

    def _references(self, captions: list[list[str]]) -> list[list[list[int]]]:
        """Each sample's reference captions -> token-id lists, tokenised like ``text`` (same
        truncation) with BOS/EOS/padding stripped."""
        tok = self.tokenizer
        flat = iter(
            strip_special(
                tok.encode([c for caps in captions for c in caps]),
                tok.bos_id,
                tok.eos_id,
                tok.pad_id,
            )
        )
        return [[next(flat) for _ in caps] for caps in captions]

    def __iter__(self) -> Iterator[dict]:
        """This worker's streams (stream j of the rank -> worker j % num_workers) chunk by chunk:
        chunk k of each of them in stream order, then chunk k + 1; a stream leaves after its
        short end chunk."""
        worker, num_workers = _worker()
        live = [self.stream_chunks(s) for s in self.my_streams[worker::num_workers]]
        while live:
            for chunks in list(live):
                chunk = next(chunks)
                if chunk["size"] < self.chunk:
                    live.remove(chunks)
                yield chunk


def _stack(arrays: list[np.ndarray], out: torch.Tensor | None = None) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` in channels-last memory (``.to(device)`` handles it), stacked into
    ``out`` (``uint8 [B, H, W, 3]``) when given.

    In a DataLoader worker the batch is stacked straight into shared memory, which the worker
    would otherwise copy it into when handing it to the main process.
    """
    if out is None:
        out = _uint8_buffer((len(arrays), *arrays[0].shape))
    np.stack(arrays, out=out.numpy())
    return out.permute(0, 3, 1, 2)


def _uint8_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised ``uint8`` tensor; in a DataLoader worker, in shared memory from the start.
    ``torch.empty(...).share_memory_()`` would copy the fresh tensor into shared memory, faulting
    in both: 17 ms of CPU per 64 images at 224 px until its first fill, against 8 ms; a photo_500
    epoch of ``benchmarks/data_loader.py`` faults 15.0 pages per image instead of 18.3 with 1
    worker, 18.5 instead of 23 with 2 (development machine, 2026-12-07)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))  # as torch's default_collate
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class SharedImagePool:
    """Reused image buffers for the chunks a rank's loader hands out, in its workers or in-process.

    A fresh batch costs a page fault per 4 KB (~5 ms per 64 images at 224 px, about 0.08 ms per
    image), and a shared-memory tensor sent through the DataLoader's queue costs its file
    descriptor's hand-over (a socket connection and handshake per tensor). Instead each worker
    (or the loader itself, with no workers) owns ``slots`` buffers. The first chunk stacked into
    a slot carries the buffer (its descriptor passes once); later ones carry only the slot
    number. The main process keeps every buffer it received and hands the trainer an *alias* of
    it (``torch.frombuffer``: the same memory under a storage of its own). A slot is busy from the
    moment it is filled until that alias's storage is freed (``expired``), which no view,
    ``detach()`` or ``.numpy()`` of it outlives. No free slot, or a chunk of another shape (an
    epoch's short last chunk): fresh memory as before, so the slot count changes speed, never
    what the trainer sees. ``reused``: chunks handed out in a buffer filled before.
    """

    def __init__(self, workers: int, slots: int) -> None:
        self.slots = slots
        self.busy = worker_context().Array("b", max(workers, 1) * slots, lock=False)
        self._buffers: dict[int, torch.Tensor] = {}  # filling side: slot -> its buffer
        self._sent: set[int] = set()  # filling side: slots whose buffer went out already
        self._mapped: dict[int, torch.Tensor] = {}  # main: slot -> the buffer received
        self._held: list[tuple[StorageWeakRef, int]] = []  # main: aliases handed out, alive
        self.reused = 0

    def __getstate__(self) -> dict:  # what travels to a worker: the flags and the slot count
        return {"slots": self.slots, "busy": self.busy}

    def __setstate__(self, state: dict) -> None:
        self.__init__(0, state["slots"])
        self.busy = state["busy"]

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, int]:
        """Filling side: a free slot's buffer ``uint8 shape`` and the slot, marked busy; (None,
        -1) when none is free or the shape differs."""
        first = _worker()[0] * self.slots
        for slot in range(first, first + self.slots):
            if self.busy[slot]:
                continue
            buf = self._buffers.get(slot)
            if buf is None:
                buf = self._buffers[slot] = _uint8_buffer(shape)
            if tuple(buf.shape) != shape:
                return None, -1
            self.busy[slot] = 1
            return buf, slot
        return None, -1

    def send(self, slot: int, images: torch.Tensor) -> torch.Tensor | None:
        """Filling side: what a chunk carries for its images in ``slot``: the buffer the first
        time (always in-process, where nothing is sent), then None (the slot number says it)."""
        if get_worker_info() is None or slot not in self._sent:
            self._sent.add(slot)
            return images
        return None

    def hold(self, chunk: dict) -> None:
        """Main process: give a received chunk aliases of its slots' buffers, watch them, and
        free the slots whose aliases no tensor uses any more."""
        batch = chunk["batch"]
        for key, slot in chunk.get("pooled", {}).items():
            self.reused += slot in self._mapped
            if batch[key] is not None:  # the buffer itself: its first use (or in-process)
                self._mapped[slot] = batch[key]
            base = self._mapped[slot]  # uint8 [B, 3, H, W], channels-last
            nhwc = base.permute(0, 2, 3, 1)
            alias = torch.frombuffer(nhwc.numpy(), dtype=torch.uint8).view(nhwc.shape)
            batch[key] = alias.permute(0, 3, 1, 2)
            self._held.append((StorageWeakRef(alias.untyped_storage()), slot))
        held = []
        for ref, slot in self._held:
            if ref.expired():
                self.busy[slot] = 0
            else:
                held.append((ref, slot))
        self._held = held


def _for_the_queue(batch: dict) -> dict:
    """A worker's batch as it crosses to the main process: every tensor not in shared memory (token
    ids, noun spans and boxes; JPEG bytes with ``decode_on: cuda``) as a numpy array, pickled
    inline. A tensor would cross as a file descriptor of fresh shared memory, each handed over
    through its own socket connection (~0.1 ms of CPU per tensor on both sides)."""

    def convert(v):
        if isinstance(v, torch.Tensor) and not v.is_shared():
            return v.numpy()
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [convert(x) for x in v]
        return v

    return {k: convert(v) for k, v in batch.items()}


def _from_the_queue(batch: dict) -> dict:
    """Main process: :func:`_for_the_queue` undone (no copy)."""

    def convert(v):
        if isinstance(v, np.ndarray):
            return torch.from_numpy(v)
        if isinstance(v, list) and v and isinstance(v[0], np.ndarray):
            return [torch.from_numpy(x) for x in v]
        return v

    return {k: convert(v) for k, v in batch.items()}


def _as_is(chunk: dict) -> dict:
    """The DataLoader's collate_fn: chunks are collated already (its default would turn the
    queue's numpy arrays into tensors in the worker)."""
    return chunk


def _union_box(objs: list[dict], noun: dict, w: int, h: int, size: int) -> list[float] | None:
    """The box around a noun's objects, mapped through resize + centre crop, in [0, 1]."""
    idx = noun.get("objects", [noun["object"]] if "object" in noun else [])
    if not idx:
        return None
    x0s, y0s, x1s, y1s = zip(*(objs[i]["box"] for i in idx))
    scale = size / min(w, h)
    ox, oy = (round(w * scale) - size) // 2, (round(h * scale) - size) // 2
    box = ((min(x0s) * scale - ox) / size, (min(y0s) * scale - oy) / size,
           (max(x1s) * scale - ox) / size, (max(y1s) * scale - oy) / size)  # fmt: skip
    return [0.0 if v < 0.0 else 1.0 if v > 1.0 else v for v in box]


def _init_worker(trainer_pid: int, worker_id: int) -> None:
    """A loader worker's set-up.

    Its parent is the fork server, not the trainer: when the trainer dies (SIGKILL, the
    watchdog) nothing else would end the worker, and it would hold the node's memory and the
    launcher's output pipes. It polls the trainer and leaves with it.

    The workers are the loader's parallelism: HF tokenizers' own thread pool on top of it would
    only oversubscribe the cores (its idle threads spin: ~25 % more CPU per caption measured
    here), so it is off unless the user's environment sets ``TOKENIZERS_PARALLELISM``."""
    import threading
    import time

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(trainer_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="trainer-watch").start()


_LOGGED: set[str] = set()  # messages logged once per process


def _log_once(msg: str, *args: object) -> None:
    text = msg % args
    if text not in _LOGGED:
        _LOGGED.add(text)
        log.info(text)


def loader_workers(streams: int, num_workers: int) -> int:
    """The workers a rank runs: the largest divisor of its stream count up to ``num_workers``, so
    every worker serves as many streams as every other. The DataLoader asks its workers in strict
    turn; unequal workers would make the main process hold the chunks of the ones ahead."""
    return max(
        (d for d in range(1, streams + 1) if streams % d == 0 and d <= num_workers), default=0
    )


def _concat(batches: list[dict]) -> dict:
    """Batches -> one batch: tensors concatenated along the batch, lists joined."""
    if len(batches) == 1:
        return batches[0]
    return {
        k: torch.cat([b[k] for b in batches]) if isinstance(v, torch.Tensor)
        else [x for b in batches for x in b[k]]
        for k, v in batches[0].items()
    }  # fmt: skip


def _slice(batch: dict, start: int, stop: int) -> dict:
    if start == 0 and stop == len(batch["sample_id"]):
        return batch
    return {k: v[start:stop] for k, v in batch.items()}


def _micro_batches(batches: list[dict], size: int) -> list[dict]:
    """Consecutive batches -> micro-batches of ``size`` (the last may be short). A micro-batch
    inside one batch is a view of it; only one that spans batches is copied: concatenating a
    step's chunks and cutting the result again would copy every image once more (~150 KB each
    at 224 px) in the main process."""
    out, pieces, have = [], [], 0
    for batch in batches:
        n, start = len(batch["sample_id"]), 0
        while start < n:
            take = min(size - have, n - start)
            pieces.append(_slice(batch, start, start + take))
            start, have = start + take, have + take
            if have == size:
                out.append(_concat(pieces))
                pieces, have = [], 0
    if pieces:
        out.append(_concat(pieces))
    return out


class Loader:
    """One rank's training loader for one epoch: a DataLoader over a ``ShardDataset``'s chunks,
    reassembled into this rank's slice of each global step (its streams' chunks in stream order)
    and cut into micro-batches of ``cfg.batch_size``. ``state_dict()``: the rank's cursor;
    ``skipped()``: skip counters summed over every worker."""

    def __init__(self, dataset: ShardDataset, num_workers: int) -> None:
        self.dataset = dataset
        ds = dataset
        workers = loader_workers(len(ds.my_streams), num_workers)
        if workers != num_workers:
            _log_once(
                "data.num_workers=%d -> %d: each loader worker serves the same number of the "
                "rank's %d streams", num_workers, workers, len(ds.my_streams),
            )  # fmt: skip
        if ds.training:
            first, last = ds.my_streams[0], ds.my_streams[-1]
            _log_once(
                "data: %d streams, rank %d serves streams %d..%d, chunk %d samples per stream per "
                "step", ds.streams, ds.rank, first, last, ds.chunk,
            )  # fmt: skip
        self.cursor = dict(ds.start)
        prefetch = 4
        # a worker's chunks alive at once: those the DataLoader prefetches, this step's and the
        # last step's (held until the next step's are taken), and the one being filled
        # (in-process: this step's, the last step's and the one being filled)
        in_flight = prefetch if workers else 0
        self.pool_slots = in_flight + 2 * len(ds.my_streams) // max(workers, 1) + 1
        if ds.cfg.decode_on != "cpu":
            self.pool_slots = 0
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            worker_init_fn=functools.partial(_init_worker, os.getpid()) if workers else None,
            multiprocessing_context=worker_context() if workers else None,
            persistent_workers=False,
            prefetch_factor=prefetch if workers else None,
        )
        self._chunks: Iterator[dict] = iter(())
        self._pending: dict[tuple[int, int], dict] = {}

    def __iter__(self) -> Iterator[dict]:
        ds, cfg = self.dataset, self.dataset.cfg
        if self.pool_slots:  # fresh flags: workers of an earlier iteration keep their own
            ds.pool = SharedImagePool(self.loader.num_workers, self.pool_slots)
        self._chunks, self._pending = iter(self.loader), {}
        for step in itertools.count():
            got = [self._take(stream, step) for stream in ds.my_streams]
            if any(c["size"] < ds.chunk for c in got):
                if not ds.training and not cfg.drop_last and got[0]["size"]:
                    yield self._on_device(got[0]["batch"])  # a one-pass reader's final batch
                    got = []
                self.drop_rest(chunks=got)
                return
            micro = _micro_batches([c["batch"] for c in got], cfg.batch_size)
            for i, batch in enumerate(micro):
                if i == len(micro) - 1:  # the step is handed out in full: the cursor moves
                    self.cursor = {c["stream"]: c["raw_end"] for c in got}
                yield self._on_device(batch)

    def _take(self, stream: int, index: int) -> dict:
        """Chunk ``index`` of ``stream``, holding the chunks of other streams read on the way."""
        key = (stream, index)
        while key not in self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise RuntimeError(
                    f"the loader workers ended before chunk {index} of stream {stream}"
                )
            if chunk["batch"] is not None and self.loader.num_workers:
                chunk["batch"] = _from_the_queue(chunk["batch"])
            if self.dataset.pool is not None:
                self.dataset.pool.hold(chunk)
            self._pending[(chunk["stream"], chunk["chunk"])] = chunk
        return self._pending.pop(key)

    def _on_device(self, batch: dict) -> dict:
        cfg = self.dataset.cfg
        return decode_batch(batch, cfg.image_size, "cuda") if cfg.decode_on == "cuda" else batch

    def drop_rest(self, chunks: list[dict] = (), unused: list[dict] = ()) -> None:
        """End the epoch here: read what is left of this rank's streams and count every sample
        not trained on (``chunks`` and micro-batches ``unused`` already handed out included) as
        ``epoch_tail``. The loop calls it when any rank's streams ran out. Reading the rest costs
        the streams' imbalance (under a chunk each with equal shards; more when a broken shard
        cut one stream short), while the other ranks wait at their next collective."""
        n = sum(c["size"] for c in chunks) + sum(len(b["sample_id"]) for b in unused)
        n += sum(c["size"] for c in self._pending.values())
        n += sum(c["size"] for c in self._chunks)
        self._chunks, self._pending = iter(()), {}
        if n:
            self.dataset.counter.add(
                "epoch_tail", f"{n} samples after the last full global step", n
            )

    def state_dict(self) -> dict[int, int]:
        """``{stream: raw samples consumed}`` of this rank's streams after the last global step
        handed out in full (the start positions before the first)."""
        return dict(self.cursor)

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, by reason, summed over all workers."""
        return self.dataset.counter.as_dict()


class IndexLoader:
    """One rank's training batches for one epoch over an in-memory dataset in a given ``order``
    of its indices: global step k is ``order[k*G:(k+1)*G]`` (the short tail is left out) and rank
    r of W serves its contiguous G/W of it, in micro-batches ``make_batch(indices)`` of
    ``micro`` indices, so step k holds the same items on any world size. The cursor
    ``{0: items of the order consumed}`` counts the steps handed out in full."""

    def __init__(
        self, order: list[int], make_batch, global_batch: int, micro: int, rank: int, world: int,
        cursor: dict[int, int] | None,
    ) -> None:  # fmt: skip
        self.order, self.make_batch = order, make_batch
        self.global_batch, self.micro, self.rank, self.world = global_batch, micro, rank, world
        self.start = self.cursor = (cursor or {}).get(0, 0)

    def __iter__(self) -> Iterator[Any]:
        g, per_rank = self.global_batch, self.global_batch // self.world
        for a in range(self.start, len(self.order) - g + 1, g):
            mine = self.order[a + self.rank * per_rank : a + (self.rank + 1) * per_rank]
            for i in range(0, per_rank, self.micro):
                if i + self.micro >= per_rank:  # the step is handed out in full
                    self.cursor = a + g
                yield self.make_batch(mine[i : i + self.micro])

    def state_dict(self) -> dict[int, int]:
        return {0: self.cursor}


def make_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    urls: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    epoch: int = 0,
    global_batch_size: int | None = None,
    cursor: dict[int, int] | None = None,
    num_workers: int | None = None,
    tokenizer_bn: Tokenizer | None = None,
    counter: SkipCounter | None = None,
) -> Loader:
    """The loader of one rank for one epoch (micro-batches of ``cfg.batch_size``).

    Training: pass ``global_batch_size``; global step k is the same samples in the same order on
    any world size dividing ``cfg.streams`` and with any ``num_workers`` (module docstring).
    ``cursor`` (the run's merged ``{stream: raw position}``, every rank's ``state_dict()``)
    resumes mid-epoch exactly, on any such world size. Without ``global_batch_size``: a one-pass
    reader, one stream on one rank, ending with a short batch unless ``cfg.drop_last``.
    ``urls`` defaults to ``cfg.train_shards``; ``rank``/``world_size`` default to
    torch.distributed's. Pass the same ``counter`` every epoch to keep running totals.
    """
    ds = ShardDataset(
        cfg, tokenizer, urls, rank=rank, world_size=world_size, epoch=epoch,
        global_batch_size=global_batch_size, cursor=cursor, tokenizer_bn=tokenizer_bn,
        counter=counter,
    )  # fmt: skip
    return Loader(ds, cfg.num_workers if num_workers is None else num_workers)
