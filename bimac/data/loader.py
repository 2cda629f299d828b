"""WebDataset pipelines for pairs and triplets (img2dataset layout), as the trainer reads them.

One ``ShardDataset`` does: shard list (exact: seeded per-epoch shuffle, split by rank then by
DataLoader worker; resampled: seeded sampling with replacement, a fixed number of samples per
rank) -> webdataset's tar reading -> seeded sample shuffle -> skip ``samples_seen`` (resume) ->
decode + checks (each bad sample skipped and counted by reason, no sleeping handler) -> uint8
resize/centre-crop -> batches (tokenised, noun token spans, boxes). Batches are built in the
workers; ``make_loader`` wraps the dataset in a ``DataLoader(batch_size=None)``.

Skip counts live in shared memory, so the main process sees what every worker skipped:
``loader.skipped()`` -> ``{reason: count}``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bimac.config import ConfigError, path_hint
from bimac.data.decode import decode_batch, decode_image, decode_or_defer
from bimac.data.tokenizer import Tokenizer, strip_special, token_spans

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
    num_workers: int = 0
    resampled: bool = False  # True: sample shards with replacement, epoch_samples per rank
    epoch_samples: int = 0  # per rank, resampled mode
    shuffle_buffer: int = 1000  # 0 disables sample shuffling
    seed: int = 0
    max_nouns: int = 8
    noun_source: Literal["json", "spacy", "none"] = "json"  # spacy: extract from the caption
    spacy_pipeline: str = "en_core_web_sm"
    drop_last: bool = False  # exact mode keeps the final partial batch of each worker
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
    single-threaded interpreter that imports this module once; each worker forks from it."""
    if os.name != "posix":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


class SkipCounter:
    """Counts of skipped samples by reason, in shared memory (visible across workers)."""

    def __init__(self) -> None:
        self._counts = worker_context().Array("q", len(REASONS))
        self._warned: set[str] = set()

    def add(self, reason: str, detail: str = "") -> None:
        with self._counts.get_lock():
            self._counts[REASONS.index(reason)] += 1
        level = logging.WARNING if reason not in self._warned else logging.DEBUG
        self._warned.add(reason)
        log.log(level, "skipped sample (%s): %s", reason, detail)

    def as_dict(self) -> dict[str, int]:
        return {r: int(c) for r, c in zip(REASONS, self._counts[:]) if c}

    def reset(self) -> None:
        with self._counts.get_lock():
            self._counts[:] = [0] * len(REASONS)


def expand_shards(pattern: str) -> list[str]:
    """Brace/``::`` expansion and globbing; a pattern matching no shard is an error here."""
    if not pattern:
        raise ValueError("no shard pattern given (data.train_shards is empty)")
    urls: list[str] = []
    for url in wds.shardlists.expand_urls(pattern):
        if url.startswith("pipe:") or "://" in url:
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
    """``{"fname", "data"}`` of each regular file in a tar stream, in order.

    A lean replacement for ``tarfile``'s streaming reader (which webdataset uses): ~12x less CPU
    per sample on img2dataset shards, where every member carries a PAX header (float mtime).
    Handles ustar prefixes, PAX ``path`` records and GNU long names; skips webdataset's
    ``__meta__`` files. A short read raises ``tarfile.ReadError`` (truncated shard), a header
    with a bad checksum ``tarfile.HeaderError``.
    """
    read = stream.read
    long_name = None
    while True:
        hdr = read(512)
        if len(hdr) < 512:
            if hdr:
                raise tarfile.ReadError("unexpected end of data")
            return
        if hdr.count(0) == 512:  # end-of-archive marker
            return
        if sum(hdr) - sum(hdr[148:156]) + 256 != int(hdr[148:156].strip(b"\0 ") or b"0", 8):
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
        if kind == b"x":  # PAX extended header: only the path matters here
            for rec in data.split(b"\n"):
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


def shard_members(urls: Iterable[str], counter: SkipCounter) -> Iterator[dict]:
    """Tar members (with ``__url__``) of each shard, then an end-of-shard marker ``{}``; a shard
    that cannot be opened is skipped and a broken one ends early, both counted by reason."""
    for url in urls:
        try:
            stream = wds.gopen(url)
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


def shard_samples(urls: Iterable[str], counter: SkipCounter) -> Iterator[dict]:
    """Undecoded samples (``group_members`` of ``shard_members``), in shard order."""
    return group_members(shard_members(urls, counter), counter)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _text(sample: dict, key: str) -> str | None:
    raw = sample.get(key)
    return None if raw is None else raw.decode("utf-8").strip()


class ShardDataset(IterableDataset):
    """The training pipeline over a shard set; yields batch dicts (docs/contracts.md, "Batch")."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        urls: str | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        epoch: int = 0,
        samples_seen: int = 0,
        tokenizer_bn: Tokenizer | None = None,
        counter: SkipCounter | None = None,
    ) -> None:
        self.cfg = cfg
        self.urls = expand_shards(urls if urls is not None else cfg.train_shards)
        if rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.rank, self.world_size = rank, world_size or 1
        self.epoch, self.samples_seen = epoch, samples_seen
        self.tokenizer = tokenizer
        self.tokenizer_bn = tokenizer_bn or tokenizer
        self.counter = counter or SkipCounter()
        if cfg.caption_lang == "bn" and cfg.noun_source == "spacy":
            raise ValueError("noun_source=spacy extracts English nouns; use json or none for bn")
        check_spacy_pipeline(cfg)
        if cfg.decode_on == "cuda" and not torch.cuda.is_available():
            raise ConfigError("data.decode_on=cuda: no CUDA device here; use data.decode_on=cpu")
        if cfg.resampled and cfg.epoch_samples <= 0:
            raise ValueError("resampled mode needs data.epoch_samples > 0 (samples per rank)")
        if not cfg.resampled and len(self.urls) < self.world_size:
            raise ValueError(
                f"exact mode: {len(self.urls)} shards for {self.world_size} ranks; use more "
                "shards or resampled mode"
            )
        self._nouns = None  # spaCy extractor, built lazily in the worker

    # -- sample stream ---------------------------------------------------------------------------
    def _seed(self, *parts: int) -> int:
        return stable_seed(self.cfg.seed, self.epoch, *parts)

    def worker_quota(self, worker: int, num_workers: int) -> int:
        """Resampled mode: samples this worker yields, so the rank's workers sum to epoch_samples."""
        n = self.cfg.epoch_samples
        return n // num_workers + (worker < n % num_workers)

    def _shard_urls(self, worker: int, num_workers: int) -> list[str]:
        """Exact mode: this worker's shards (seeded per-epoch order, split by rank then worker)."""
        urls = list(self.urls)
        random.Random(self._seed(0)).shuffle(urls)  # same order on every rank, new each epoch
        return urls[self.rank :: self.world_size][worker::num_workers]

    def _shards(self, worker: int, num_workers: int) -> Iterator[dict]:
        if self.cfg.resampled:
            rng = random.Random(self._seed(self.rank, worker, 1))
            while True:
                yield {"url": rng.choice(self.urls)}
        mine = self._shard_urls(worker, num_workers)
        if not mine:
            log.warning("rank %d worker %d has no shard (too few shards)", self.rank, worker)
        for url in mine:
            yield {"url": url}

    def _worker_sizes(self, num_workers: int) -> list[int] | None:
        """Samples each worker yields this epoch: known in resampled mode; in exact mode read from
        the shards' ``*_stats.json`` (img2dataset's ``successes``) when every shard has one."""
        if self.cfg.resampled:
            return [self.worker_quota(w, num_workers) for w in range(num_workers)]
        sizes = []
        for w in range(num_workers):
            total = 0
            for url in self._shard_urls(w, num_workers):
                stats = Path(url.removesuffix(".tar") + "_stats.json")
                if not url.endswith(".tar") or not stats.is_file():
                    return None
                total += json.loads(stats.read_text())["successes"]
            sizes.append(total)
        return sizes

    def resume_plan(self, num_workers: int) -> tuple[list[int], int]:
        """After ``samples_seen`` samples of this epoch: samples each worker had produced and the
        worker whose batch came next, replaying the DataLoader's round-robin over its workers."""
        bs, seen, w = self.cfg.batch_size, self.samples_seen, 0
        done = [0] * num_workers
        if seen == 0:
            return done, 0
        sizes = self._worker_sizes(num_workers)
        if sizes is None:  # sizes unknown: valid while every worker still yields full batches
            if seen % bs:
                raise ValueError(f"samples_seen={seen} is not a multiple of batch size {bs}")
            k = seen // bs
            done = [(k // num_workers + (v < k % num_workers)) * bs for v in range(num_workers)]
            return done, k % num_workers
        left = [n - n % bs for n in sizes] if self.cfg.drop_last else sizes
        count = 0
        while count < seen:
            if all(d >= n for d, n in zip(done, left)):
                raise ValueError(f"samples_seen={seen} is beyond this epoch ({sum(left)} samples)")
            n = max(0, min(bs, left[w] - done[w]))
            done[w] += n
            count += n
            w = (w + 1) % num_workers
        if count != seen:
            raise ValueError(f"samples_seen={seen} does not fall on a batch boundary")
        return done, w

    def raw_samples(self, worker: int = 0, num_workers: int = 1, skip: int = 0) -> Iterator[dict]:
        """Undecoded samples of this rank/worker for this epoch, shuffled, first ``skip`` dropped.

        Resume skips raw samples: a bad sample in the skipped prefix shifts the resume point by one.
        """
        stream = shard_samples((s["url"] for s in self._shards(worker, num_workers)), self.counter)
        if self.cfg.shuffle_buffer > 0:
            rng = random.Random(self._seed(self.rank, worker, 2))
            stream = wds.filters.shuffle(self.cfg.shuffle_buffer, 100, rng=rng)(stream)
        for i, sample in enumerate(stream):
            if i >= skip:
                yield sample

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
                meta = json.loads(sample["json"])
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
        elif "captions_en" in meta:
            caps = meta["captions_bn"] if cfg.caption_lang == "bn" else meta["captions_en"]
            i = self.sample_rng(sample).randrange(len(caps)) if cfg.random_caption else 0
            text, references = caps[i], list(caps)
            # world shards carry nouns per caption; other JSON falls back to the noun extractor
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
        out["nouns"] = self._noun_spans(text, nouns, meta, w, h)
        return out

    def _noun_spans(self, text, nouns, meta, w, h) -> list[tuple[int, int, list[float] | None]]:
        if nouns is not None:
            objs = meta.get("objects", [])
            return [(n["start"], n["end"], _union_box(objs, n, w, h, self.cfg.image_size)) for n in nouns]  # fmt: skip
        if self.cfg.noun_source != "spacy":
            return []
        if self._nouns is None:
            from bimac.data.nouns import NounExtractor

            self._nouns = NounExtractor(self.cfg.spacy_pipeline)
        return [(n.start, n.end, None) for n in self._nouns(text)]

    # -- batches ---------------------------------------------------------------------------------
    def collate(self, items: list[dict]) -> dict:
        """Stack uint8 images, tokenise, map noun character spans to token spans."""
        n = self.cfg.max_nouns
        ids, offsets = self.tokenizer.encode_with_offsets([it["text"] for it in items])
        spans, boxes = (
            np.zeros((len(items), n, 2), np.int64),
            np.zeros((len(items), n, 4), np.float32),
        )
        mask, has_box = np.zeros((len(items), n), bool), np.zeros((len(items), n), bool)
        for i, it in enumerate(items):
            tok = token_spans(offsets[i], [(s, e) for s, e, _ in it["nouns"]])
            kept = [(span, box) for span, (_, _, box) in zip(tok, it["nouns"]) if span][:n]
            for j, (span, box) in enumerate(kept):
                spans[i, j], mask[i, j] = span, True
                if box is not None:
                    boxes[i, j], has_box[i, j] = box, True
        batch = {
            **self._images("image", [it["image"] for it in items]),
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
            batch |= self._images("image_syn", [it["image_syn"] for it in items])
            batch["text_bn"] = self.tokenizer_bn.encode([it["text_bn"] for it in items])
        return batch

    def _images(self, key: str, arrays: list[np.ndarray]) -> dict:
        """``{key: uint8 [B, 3, H, W]}``; with ``decode_on: cuda``, ``{key_encoded: [tensors]}``
        (JPEG bytes or pixels) for ``decode_batch`` in the main process."""
        if self.cfg.decode_on == "cuda":
            return {f"{key}_encoded": [torch.from_numpy(a) for a in arrays]}
        return {key: _stack(arrays)}

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
        physical, num_workers = _worker()
        done, next_worker = self.resume_plan(num_workers)
        # A resumed DataLoader starts its round-robin at worker 0; the original would next have
        # asked `next_worker`, so physical worker p plays the part of worker p + next_worker.
        worker = (physical + next_worker) % num_workers
        quota = self.worker_quota(worker, num_workers) if self.cfg.resampled else math.inf
        quota -= done[worker]
        items: list[dict] = []
        produced = 0
        for raw in self.raw_samples(worker, num_workers, done[worker]):
            if produced >= quota:
                break
            item = self.decode(raw)
            if item is None:
                continue
            items.append(item)
            produced += 1
            if len(items) == self.cfg.batch_size:
                yield self.collate(items)
                items = []
        if items and not self.cfg.drop_last:
            yield self.collate(items)


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` in channels-last memory (``.to(device)`` handles it).

    In a DataLoader worker the batch is stacked straight into shared memory, which the worker
    would otherwise copy it into when handing it to the main process.
    """
    out = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    np.stack(arrays, out=out.numpy())
    return out.permute(0, 3, 1, 2)


def _union_box(objs: list[dict], noun: dict, w: int, h: int, size: int) -> list[float] | None:
    """The box around a noun's objects, mapped through resize + centre crop, in [0, 1]."""
    idx = noun.get("objects", [noun["object"]] if "object" in noun else [])
    if not idx:
        return None
    x0 = min(objs[i]["box"][0] for i in idx)
    y0 = min(objs[i]["box"][1] for i in idx)
    x1 = max(objs[i]["box"][2] for i in idx)
    y1 = max(objs[i]["box"][3] for i in idx)
    scale = size / min(w, h)
    ox, oy = (round(w * scale) - size) // 2, (round(h * scale) - size) // 2
    box = [(x0 * scale - ox) / size, (y0 * scale - oy) / size]
    box += [(x1 * scale - ox) / size, (y1 * scale - oy) / size]
    return [min(1.0, max(0.0, v)) for v in box]


def _exit_with(trainer_pid: int, worker_id: int) -> None:
    """A worker's parent is the fork server, not the trainer: when the trainer dies (SIGKILL, the
    watchdog) nothing else would end the worker, and it would hold the node's memory and the
    launcher's output pipes. Poll the trainer and leave with it."""
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(trainer_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="trainer-watch").start()


class Loader:
    """A DataLoader over a ``ShardDataset`` plus its skip counters (``skipped()``)."""

    def __init__(self, dataset: ShardDataset, num_workers: int) -> None:
        self.dataset = dataset
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            worker_init_fn=functools.partial(_exit_with, os.getpid()) if num_workers else None,
            multiprocessing_context=worker_context() if num_workers else None,
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,
        )

    def __iter__(self) -> Iterator[dict]:
        cfg = self.dataset.cfg
        if cfg.decode_on == "cuda":
            return (decode_batch(b, cfg.image_size, "cuda") for b in self.loader)
        return iter(self.loader)

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, by reason, summed over all workers."""
        return self.dataset.counter.as_dict()


def make_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    urls: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    epoch: int = 0,
    samples_seen: int = 0,
    num_workers: int | None = None,
    tokenizer_bn: Tokenizer | None = None,
    counter: SkipCounter | None = None,
) -> Loader:
    """The training loader of one rank for one epoch (batches of ``cfg.batch_size``).

    ``urls`` defaults to ``cfg.train_shards``; ``rank``/``world_size`` default to
    torch.distributed's; ``samples_seen`` (this rank's samples already consumed this epoch, at a
    batch boundary, same batch size and ``num_workers``) resumes mid-epoch exactly: the
    DataLoader's round-robin over workers is replayed (``ShardDataset.resume_plan``). A bad sample
    inside the skipped prefix shifts the resume point by one. Pass the same ``counter`` every
    epoch to keep running totals.
    """
    ds = ShardDataset(
        cfg, tokenizer, urls, rank=rank, world_size=world_size, epoch=epoch,
        samples_seen=samples_seen, tokenizer_bn=tokenizer_bn, counter=counter,
    )  # fmt: skip
    return Loader(ds, cfg.num_workers if num_workers is None else num_workers)
