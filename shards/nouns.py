"""Tag each caption's nouns into its shard once: ``python -m shards.nouns DIR [--out DIR2]``.

With ``data.noun_source: spacy`` (the paper config's CC data) the loader tags every caption with
spaCy in every epoch: 0.65-0.71 ms a caption even batched, half of a 500 px photo's decode
(BENCHMARKS.md, "spaCy nouns"). This stage does it once, with the same ``NounExtractor``: each
pair's ``KEY.json`` gains ``captions_en`` (``[caption]``, the stripped ``KEY.txt``), ``nouns``
(``[[{text, lemma, start, end}, ...]]``, the world's format without boxes) and ``nouns_pipeline``.
The loader then reads them as it reads the world's (docs/contracts.md, "Shards") and calls spaCy
only for a sample that has none. ``python -m shards.cc15m`` runs it after img2dataset.

A directory stands for every ``*.tar`` in it. In place by default; ``--out DIR2`` writes the
tagged shards (and their ``_stats.json``) there instead. Every other member keeps its bytes, name
and order; the headers are written anew (the builders' fixed mtime, mode 0444). Each tar is
written under a temporary name and renamed into place; a tar with nothing left to tag is left as
it is (copied as it is, with ``--out``), so a killed run rerun with the same command finishes the
rest. Prints a JSON summary; samples without a readable caption are left unchanged and counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from bimac.config import CliParser, ConfigError, program, run_main
from bimac.data.loader import _json, expand_shards, tar_members
from bimac.data.nouns import NounExtractor
from bimac.data.writer import TAR_MTIME, atomic_write, partial_path
from shards.check import shard_pattern

log = logging.getLogger(__name__)
# webdataset's split of a member name: the key runs to the first dot of the file name
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
CHUNK = 256  # captions per nlp.pipe call

_extractor: NounExtractor | None = None  # one per process (ProcessPoolExecutor initializer)


def load_pipeline(pipeline: str) -> None:
    """This process's extractor; a ConfigError naming the fix when the pipeline is missing."""
    global _extractor
    try:
        _extractor = NounExtractor(pipeline)
    except RuntimeError as err:
        raise ConfigError(f"pipeline: {err}") from err


def _samples(path: Path):
    """``(key, [(name, bytes), ...])`` of each sample of the tar at ``path``, in member order, read
    with the loader's own tar reader (with ``tarfile``'s, and PAX headers written, tagging took
    about 1.4 ms a sample of photo_500 against 0.25-0.40: BENCHMARKS.md, "spaCy nouns")."""
    key, members = None, []
    with open(path, "rb") as stream:
        for member in tar_members(stream):
            name = member["fname"]
            m = _KEY_EXT.match(name)
            k = m.group(1) if m else name
            if members and k != key:
                yield key, members
                members = []
            key = k
            members.append((name, member["data"]))
    if members:
        yield key, members


def _ext(name: str) -> str:
    m = _KEY_EXT.match(name)
    return m.group(2) if m else ""


def _pending(members: list, pipeline: str) -> tuple[str, dict] | str:
    """``(caption, meta)`` of a sample to tag, or why it is left as it is."""
    by_ext = {_ext(name): data for name, data in members}
    try:
        caption = by_ext["txt"].decode("utf-8").strip() if "txt" in by_ext else ""
        meta = _json(by_ext["json"]) if "json" in by_ext else {}
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
    """Whether the tar at ``path`` holds no sample left to tag with ``pipeline``."""
    try:
        return all(isinstance(_pending(m, pipeline), str) for _, m in _samples(path))
    except (tarfile.TarError, OSError):
        return False


def _tag_chunk(chunk: list[tuple[str, list]], counts: Counter) -> list[list]:
    """The chunk's samples with their JSON rewritten (captions through one ``nlp.pipe``)."""
    todo = []  # (sample index, caption, meta)
    for i, (_, members) in enumerate(chunk):
        pending = _pending(members, _extractor.pipeline)
        if isinstance(pending, str):
            counts[pending] += 1
        else:
            todo.append((i, *pending))
    out = [list(members) for _, members in chunk]
    for (i, caption, meta), nouns in zip(
        todo, _extractor.batch([c for _, c, _ in todo]), strict=True
    ):
        meta |= {
            "captions_en": [caption],
            "nouns": [
                [{"text": n.text, "lemma": n.lemma, "start": n.start, "end": n.end} for n in nouns]
            ],  # fmt: skip
            "nouns_pipeline": _extractor.pipeline,
        }
        data = json.dumps(meta, ensure_ascii=False).encode()
        members = out[i]
        j = next((j for j, (name, _) in enumerate(members) if _ext(name) == "json"), None)
        if j is None:  # no JSON member: one is added after the sample's others
            members.append((f"{chunk[i][0]}.json", data))
        else:
            members[j] = (members[j][0], data)
        counts["captions_tagged"] += 1
        counts["nouns"] += len(nouns)
    return out


def tag_shard(src: Path, dst: Path) -> dict[str, int]:
    """Tag the captions of the tar ``src`` into ``dst`` (may be ``src``); counts by outcome."""
    counts: Counter = Counter()
    if dst.exists() and is_tagged(dst, _extractor.pipeline):
        _copy_stats(src, dst)  # a run killed between the tar and its stats left them out
        return {"shards_with_nothing_to_tag": 1}
    tmp = partial_path(dst)
    if is_tagged(src, _extractor.pipeline):  # into --out as it is: the in-place run's bytes
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        _copy_stats(src, dst)
        return {"shards_with_nothing_to_tag": 1}
    with open(tmp, "wb") as f:
        # plain GNU headers with the builders' fixed mtime: no PAX record to build per member
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as out:
            chunk = []
            for sample in _samples(src):
                counts["samples"] += 1
                chunk.append(sample)
                if len(chunk) == CHUNK:
                    _write(out, _tag_chunk(chunk, counts))
                    chunk = []
            _write(out, _tag_chunk(chunk, counts))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    _copy_stats(src, dst)
    counts["shards_tagged"] += 1
    return dict(counts)


def _copy_stats(src: Path, dst: Path) -> None:
    """The ``_stats.json`` beside ``src`` beside ``dst`` too (``--out``)."""
    stats = src.with_name(src.name[: -len(".tar")] + "_stats.json")
    if dst != src and stats.exists():
        atomic_write(dst.with_name(stats.name), stats.read_bytes())


def _write(out: tarfile.TarFile, samples: list[list]) -> None:
    for members in samples:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(TAR_MTIME), 0o444
            out.addfile(info, io.BytesIO(data))


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
