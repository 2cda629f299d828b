"""Tag each caption's nouns into its shard once: ``python -m shards.nouns DIR [--out DIR2]``.

With ``data.noun_source: spacy`` (the paper config's CC data) the loader tags every caption with
spaCy in every epoch: 0.65-0.71 ms a caption even batched, half of a 500 px photo's decode
(BENCHMARKS.md, "spaCy nouns"). This stage does it once, with the same ``NounExtractor``: each
pair's ``KEY.json`` gains ``captions_en`` (``[caption]``, the stripped ``KEY.txt``), ``nouns``
(``[[{text, lemma, start, end}, ...]]``, the world's format without boxes) and ``nouns_pipeline``.
The loader then reads them as it reads the world's (docs/contracts.md, "Shards") and calls spaCy
only for a sample that has none. ``python -m shards.cc15m`` runs it after img2dataset.

A directory stands for every ``*.tar`` in it. In place by default; ``--out DIR2`` writes the
tagged shards (and their ``_stats.json``) there instead. Shards are read with the loader's own
reader and written with webdataset's ``TarWriter``: every member the loader reads keeps its bytes
and name, samples keep their order (a sample's members are written by extension, with the
builders' fixed mtime). Each tar is written under a temporary name and renamed into place; a tar
with nothing left to tag is left as it is (copied as it is, with ``--out``), so a killed run rerun
with the same command finishes the rest. A shard the reader cannot read whole (truncated, broken)
is left as it is, logged and counted. Prints a JSON summary; samples without a readable caption
are left unchanged and counted.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from bimac.config import CliParser, ConfigError, program, run_main
from bimac.data.loader import SkipCounter, _json, _text, expand_shards, shard_samples
from bimac.data.nouns import NounExtractor
from bimac.data.writer import TAR_MTIME, atomic_write, partial_path
from shards.check import shard_pattern

log = logging.getLogger(__name__)
CHUNK = 256  # captions per nlp.pipe call

_extractor: NounExtractor | None = None  # one per process (ProcessPoolExecutor initializer)


def load_pipeline(pipeline: str) -> None:
    """This process's extractor; a ConfigError naming the fix when the pipeline is missing."""
    global _extractor
    try:
        _extractor = NounExtractor(pipeline)
    except RuntimeError as err:
        raise ConfigError(f"pipeline: {err}") from err


def _pending(sample: dict, pipeline: str) -> tuple[str, dict] | str:
    """``(caption, meta)`` of a sample to tag, or why it is left as it is."""
    try:
        caption = _text(sample, "txt")
        meta = _json(sample["json"]) if "json" in sample else {}
    except (UnicodeDecodeError, ValueError):
        return "unreadable_caption_or_json"
    if not caption or not isinstance(meta, dict):
        return "no_caption"
    if meta.get("nouns_pipeline") == pipeline:
        return "already_tagged"
    if "captions_en" in meta and "nouns_pipeline" not in meta:
        return "has_own_captions"  # the world's shards: nouns of their own
    return caption, meta


def is_tagged(path: Path, pipeline: str) -> bool:
    """Whether the tar at ``path`` reads whole and holds no sample left to tag with ``pipeline``."""
    counter = SkipCounter()
    done = all(isinstance(_pending(s, pipeline), str) for s in shard_samples([str(path)], counter))
    return done and not counter.as_dict()


def _tag_chunk(chunk: list[dict], counts: Counter) -> None:
    """Rewrites the JSON of the chunk's samples to tag (their captions through one ``nlp.pipe``)."""
    todo = []  # (sample, caption, meta)
    for sample in chunk:
        pending = _pending(sample, _extractor.pipeline)
        if isinstance(pending, str):
            counts[pending] += 1
        else:
            todo.append((sample, *pending))
    for (sample, caption, meta), nouns in zip(
        todo, _extractor.batch([c for _, c, _ in todo]), strict=True
    ):
        meta |= {
            "captions_en": [caption],
            "nouns": [
                [{"text": n.text, "lemma": n.lemma, "start": n.start, "end": n.end} for n in nouns]
            ],  # fmt: skip
            "nouns_pipeline": _extractor.pipeline,
        }
        sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
        counts["captions_tagged"] += 1
        counts["nouns"] += len(nouns)


def tag_shard(src: Path, dst: Path) -> dict[str, int]:
    """Tag the captions of the tar ``src`` into ``dst`` (may be ``src``); counts by outcome. A
    shard the loader's reader cannot read whole is left as it is and counted."""
    counts: Counter = Counter()
    if dst.exists() and is_tagged(dst, _extractor.pipeline):
        _copy_stats(src, dst)  # a run killed between the tar and its stats left them out
        return {"shards_with_nothing_to_tag": 1}
    tmp = partial_path(dst)
    if dst != src and is_tagged(src, _extractor.pipeline):  # into --out: the in-place bytes
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        _copy_stats(src, dst)
        return {"shards_with_nothing_to_tag": 1}
    counter = SkipCounter()  # the shard's read errors (logged by the loader's reader)
    with open(tmp, "wb") as f:
        # bytes as they are; an int mtime: plain headers, no PAX record per member (a float needs one)
        with wds.TarWriter(f, encoder=False, mtime=int(TAR_MTIME)) as out:
            samples = shard_samples([str(src)], counter)
            while chunk := list(itertools.islice(samples, CHUNK)):
                counts["samples"] += len(chunk)
                _tag_chunk(chunk, counts)
                for sample in chunk:
                    out.write(sample)
        f.flush()
        os.fsync(f.fileno())
    if counter.as_dict():
        tmp.unlink()
        return {"shards_unreadable": 1}
    os.replace(tmp, dst)
    _copy_stats(src, dst)
    counts["shards_tagged"] += 1
    return dict(counts)


def _copy_stats(src: Path, dst: Path) -> None:
    """The ``_stats.json`` beside ``src`` beside ``dst`` too (``--out``)."""
    stats = src.with_name(src.name[: -len(".tar")] + "_stats.json")
    if dst != src and stats.exists():
        atomic_write(dst.with_name(stats.name), stats.read_bytes())


def tag_shards(
    urls: str | Path, pipeline: str, out: str | Path | None = None, processes: int = 1
) -> dict[str, int]:
    """Tag every tar of the directory or list ``urls`` (``a.tar::b.tar``, a glob); totals."""
    tars = list(dict.fromkeys(Path(u) for u in expand_shards(shard_pattern(str(urls)))))
    remote = [str(t) for t in tars if not t.is_file()]
    if remote:
        raise ConfigError(f"urls: {remote[0]} is not a local tar; tagging rewrites local files")
    dst_dir = Path(out) if out else None
    named: dict[str, Path] = {}
    for t in tars if dst_dir else ():
        if named.setdefault(t.name, t) != t:
            raise ConfigError(
                f"out: {named[t.name]} and {t} would both be written to {dst_dir / t.name}; "
                "tag each folder into its own --out"
            )
    load_pipeline(pipeline)  # here first: a missing pipeline is one line before any work
    if dst_dir:
        dst_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(t, dst_dir / t.name if dst_dir else t) for t in tars]
    totals: Counter = Counter({"shards": len(tars)})
    if processes <= 1:
        results = (tag_shard(s, d) for s, d in jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(processes, initializer=load_pipeline, initargs=(pipeline,))
        results = pool.map(tag_shard, *zip(*jobs))
    try:
        for counts in tqdm(results, total=len(jobs), desc="tagging nouns", unit="shard"):
            totals.update(counts)
    finally:
        if pool:
            pool.shutdown()
    log.info("nouns (%s): %s", pipeline, dict(totals))
    return dict(totals)


PROG = "python -m shards.nouns"


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog=program(PROG), description=__doc__)
    p.add_argument("urls", help="shard directory, glob or a.tar::b.tar list")
    p.add_argument("--out", help="write the tagged shards here (default: in place)")
    p.add_argument("--pipeline", default="en_core_web_sm", help="spaCy pipeline (or 'world')")
    p.add_argument("--processes", type=int, default=1, help="shards tagged in parallel")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(tag_shards(a.urls, a.pipeline, a.out, a.processes), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
