"""CC3M + CC12M shards with img2dataset: ``python -m shards.cc15m --cc3m TSV --cc12m TSV --out DIR``.

img2dataset pins ``webdataset<0.3``, so it cannot live in the training environment: it runs from
an isolated venv of its own, created on first use (``--venv``, default
``~/.cache/bimac/img2dataset-venv``; ``--setup`` only creates it). Each source is written to
``DIR/<source>/`` (their keys collide; a sample is identified by shard URL + key), its captions'
nouns tagged into each sample's JSON by ``shards.nouns`` (``--nouns en_core_web_sm``; ``none``
leaves them to the loader), validated with ``shards.check`` through the trainer's pipeline, and
summarised in ``DIR/sizes.json`` from the ``*_stats.json`` files.

Input TSVs as distributed: CC3M ``caption<TAB>url`` and CC12M ``url<TAB>caption``, no header;
the URL column is detected per file, rows without an http(s) URL or caption are dropped (counted).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

from bimac.config import ConfigError, parse_cli, path_hint, run_main

log = logging.getLogger(__name__)
DEFAULT_VENV = Path(os.environ.get("BIMAC_IMG2DATASET_VENV", "~/.cache/bimac/img2dataset-venv"))
IMG2DATASET_SPEC = "img2dataset>=1.45"


def ensure_venv(path: str | Path = DEFAULT_VENV) -> Path:
    """The ``img2dataset`` executable of an isolated venv at ``path``, created when absent."""
    path = Path(path).expanduser()
    exe = path / "bin" / "img2dataset"
    if exe.exists():
        return exe
    log.info("creating the img2dataset venv at %s (first use; needs PyPI)", path)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q", IMG2DATASET_SPEC], check=True)
    return exe


def normalise_tsv(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Rewrite a CC3M/CC12M TSV (either column order, no header) as ``url<TAB>caption`` + header."""
    kept = dropped = 0
    with open(src, encoding="utf-8", errors="replace", newline="") as fin, open(dst, "w", encoding="utf-8", newline="") as fout:  # fmt: skip
        out = csv.writer(fout, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        out.writerow(["url", "caption"])
        for row in csv.reader(fin, delimiter="\t", quoting=csv.QUOTE_NONE):
            urls = [c for c in row if c.strip().startswith(("http://", "https://"))]
            others = [c.strip() for c in row if c not in urls and c.strip()]
            if len(urls) != 1 or not others or row[0].lower() in ("url", "caption"):
                dropped += 1
                continue
            out.writerow([urls[0].strip(), " ".join(" ".join(others).split())])
            kept += 1
    return {"rows": kept, "dropped_rows": dropped}


def run_img2dataset(
    exe: Path,
    url_list: Path,
    out: Path,
    image_size: int = 256,
    processes: int = 4,
    threads: int = 64,
    shard_size: int = 10000,
    timeout: int = 10,
) -> None:
    """img2dataset's webdataset output (``00000.tar`` + ``00000_stats.json``) in ``out``."""
    cmd = [
        str(exe), "--url_list", str(url_list), "--input_format", "tsv",
        "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
        "--output_folder", str(out), "--image_size", str(image_size),
        "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
        "--processes_count", str(processes), "--thread_count", str(threads),
        "--number_sample_per_shard", str(shard_size), "--timeout", str(timeout),
        "--enable_wandb", "False", "--save_additional_columns", "[]",
    ]  # fmt: skip
    env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"}
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def sizes(root: Path) -> dict:
    """Per source: samples per shard (img2dataset's ``successes``) and the failure counters."""
    report = {}
    for src_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        stats = sorted(src_dir.glob("*_stats.json"))
        if not stats:
            continue
        per_shard, failed = {}, {}
        for f in stats:
            s = json.loads(f.read_text())
            per_shard[f.name.replace("_stats.json", ".tar")] = s["successes"]
            for k in ("failed_to_download", "failed_to_resize"):
                failed[k] = failed.get(k, 0) + s.get(k, 0)
        report[src_dir.name] = {"samples": sum(per_shard.values()), "shards": per_shard, **failed}
    return report


def build(
    out: str | Path,
    tsvs: dict[str, str | Path],
    venv_path: str | Path = DEFAULT_VENV,
    nouns: str = "en_core_web_sm",
    **img2dataset_kw,
) -> dict:
    """Download every source, tag its nouns (spaCy pipeline ``nouns``, unless ``none``), validate
    it, write ``out/sizes.json``; returns that summary."""
    from shards.check import check
    from shards.nouns import load_pipeline, tag_shards

    if nouns != "none":
        load_pipeline(nouns)  # a missing pipeline fails now, not after hours of download
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exe = ensure_venv(venv_path)
    summary = {}
    for name, tsv in tsvs.items():
        url_list = out / f"{name}.urls.tsv"
        rows = normalise_tsv(tsv, url_list)
        log.info("%s: %d rows (%d dropped)", name, rows["rows"], rows["dropped_rows"])
        run_img2dataset(exe, url_list, out / name, **img2dataset_kw)
        if nouns != "none":
            rows["nouns"] = tag_shards(
                out / name, nouns, processes=img2dataset_kw.get("processes", 4)
            )
        summary[name] = rows
    report = sizes(out)
    for name in tsvs:
        checked = check(str(out / name / "*.tar"), image_size=64)
        if checked["samples"] != report[name]["samples"]:
            raise RuntimeError(
                f"{name}: shards.check read {checked['samples']} samples but the stats files "
                f"count {report[name]['samples']}; skipped: {checked['skipped']}"
            )
        report[name] |= {"input": summary[name], "check": checked}
    (out / "sizes.json").write_text(json.dumps(report, indent=2))
    return report


@dataclass
class CC15MConfig:
    """What ``python -m shards.cc15m`` downloads (``--key value`` or ``key=value``)."""

    cc3m: str = ""  # CC3M TSV (caption<TAB>url)
    cc12m: str = ""  # CC12M TSV (url<TAB>caption)
    out: str = ""  # output folder: one sub-folder per source
    venv: str = str(DEFAULT_VENV)  # the isolated img2dataset venv
    setup: bool = False  # only create the img2dataset venv
    image_size: int = 256
    processes: int = 4
    threads: int = 64
    shard_size: int = 10000
    timeout: int = 10  # per-image download timeout (s)
    nouns: str = "en_core_web_sm"  # spaCy pipeline tagging the captions' nouns (none: skip)

    def __post_init__(self) -> None:
        if not self.setup and not (self.out and (self.cc3m or self.cc12m)):
            raise ConfigError("give --out and at least one of --cc3m / --cc12m (or --setup)")
        for key in ("cc3m", "cc12m"):
            path = getattr(self, key)
            if path and not self.setup and not Path(path).is_file():
                raise ConfigError(f"{key}: {path} does not exist{path_hint(path)}")


PROG = "python -m shards.cc15m"


def main(argv: list[str] | None = None) -> None:
    a = parse_cli(CC15MConfig, PROG, __doc__, argv)
    logging.basicConfig(level=logging.INFO)
    if a.setup:
        print(ensure_venv(Path(a.venv)))
        return
    tsvs = {k: Path(v) for k, v in (("cc3m", a.cc3m), ("cc12m", a.cc12m)) if v}
    report = build(
        Path(a.out), tsvs, Path(a.venv), nouns=a.nouns, image_size=a.image_size, processes=a.processes,
        threads=a.threads, shard_size=a.shard_size, timeout=a.timeout,
    )  # fmt: skip
    json.dump({k: {"samples": v["samples"]} for k, v in report.items()}, sys.stdout, indent=2)


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
