"""Resumable per-shard work shared by the Bengali corpus stages.

A stage splits its input into shards (one per SLURM array task) and each shard into fixed
batches. Every finished batch is saved as one part file, written atomically (temp file, then
``os.replace``), so a killed run loses at most the batch in flight and a rerun skips the batches
already saved. When all batches are done the parts are joined into the shard's CSV (rows kept)
and ``.rejects.csv`` (rows dropped, with the reason), then the ``.summary.json`` is written last:
its presence is what marks a shard finished, and a rerun of a finished shard does nothing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bimac.config import ConfigError, path_hint
from bimac.data.writer import atomic_write

log = logging.getLogger(__name__)

#: reason recorded for the rows of a batch whose model call raised
MODEL_ERROR = "model_error"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fieldnames: Sequence[str]) -> None:
    """Atomically write ``rows`` (dicts) as a UTF-8 CSV with a header."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="raise")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def shard_bounds(n: int, num_shards: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of shard ``index`` when ``n`` items are split into contiguous shards."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} is outside 0..{num_shards - 1}")
    return index * n // num_shards, (index + 1) * n // num_shards


def shard_indices(available: Sequence[int], shard_index: int | None) -> list[int]:
    """The shards this process runs: the one asked for (or ``SLURM_ARRAY_TASK_ID``), else all."""
    if shard_index is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        shard_index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    if shard_index is None:
        return list(available)
    if shard_index not in available:
        raise ValueError(f"shard index {shard_index} is not one of the shards {list(available)}")
    return [shard_index]


def pending_shards(
    out: Path, stage: str, available: Sequence[int], shard_index: int | None, fieldnames
) -> list[int]:
    """The requested shards (``shard_indices``) that ``stage`` has not finished in ``out``;
    says so when there is nothing left, so a rerun of a finished stage does nothing."""
    todo = [
        i
        for i in shard_indices(available, shard_index)
        if not ShardRun(out, stage, i, fieldnames).finished
    ]
    if not todo:
        log.info("%s: every requested shard in %s is already finished; nothing to do", stage, out)
    return todo


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


@dataclass
class ShardRun:
    """Files of one shard of one stage in ``out_dir``: parts while running, CSVs + summary after."""

    out_dir: Path
    stage: str
    index: int
    fieldnames: Sequence[str]

    @property
    def csv_path(self) -> Path:
        return Path(self.out_dir) / f"{shard_name(self.index)}.csv"

    @property
    def rejects_path(self) -> Path:
        return Path(self.out_dir) / f"{shard_name(self.index)}.rejects.csv"

    @property
    def summary_path(self) -> Path:
        return Path(self.out_dir) / f"{shard_name(self.index)}.summary.json"

    @property
    def parts_dir(self) -> Path:
        return Path(self.out_dir) / f"{shard_name(self.index)}.parts"

    @property
    def finished(self) -> bool:
        return self.summary_path.is_file()

    def summary(self) -> dict[str, Any]:
        """The summary of a finished shard (saying so in the log)."""
        log.info(
            "%s %s is already finished (%s); nothing to do",
            self.stage,
            shard_name(self.index),
            self.summary_path,
        )
        return json.loads(self.summary_path.read_text())

    def part_path(self, batch: int) -> Path:
        return self.parts_dir / f"{batch:07d}.json"

    def run(
        self,
        items: Sequence[dict[str, Any]],
        batch_size: int,
        check: Callable[[dict[str, Any]], str | None],
        process: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    ) -> dict[str, Any]:
        """Process ``items`` batch by batch; return (and write) the shard summary.

        ``check(item)`` returns a reject reason (e.g. ``"empty"``) or None; ``process`` maps the
        accepted items of a batch to output rows (same order, same length). A batch whose
        ``process`` raises is skipped: its rows are rejected as ``model_error`` and logged.
        """
        if self.finished:
            return self.summary()
        started = time.time()
        n_batches = (len(items) + batch_size - 1) // batch_size
        todo = [b for b in range(n_batches) if not self.part_path(b).is_file()]
        if len(todo) < n_batches:
            log.info(
                "%s %s: resuming, %d of %d batches already done",
                self.stage,
                shard_name(self.index),
                n_batches - len(todo),
                n_batches,
            )
        desc = f"{self.stage} {shard_name(self.index)}"
        for b in tqdm(
            todo, desc=desc, unit="batch", initial=n_batches - len(todo), total=n_batches
        ):
            batch = list(items[b * batch_size : (b + 1) * batch_size])
            rejects = []
            good = []
            for item in batch:
                reason = check(item)
                if reason is None:
                    good.append(item)
                else:
                    rejects.append({**item, "reason": reason})
            rows: list[dict[str, Any]] = []
            failed = False
            if good:
                try:
                    rows = process(good)
                    if len(rows) != len(good):
                        raise RuntimeError(f"{len(rows)} outputs for {len(good)} inputs")
                except Exception as err:  # one bad batch must not stop a day-long job
                    log.exception(
                        "%s: batch %d (%d items) failed, skipped: %s", desc, b, len(good), err
                    )
                    rows, failed = [], True
                    rejects.extend({**item, "reason": MODEL_ERROR} for item in good)
            atomic_write_json(
                self.part_path(b), {"rows": rows, "rejects": rejects, "failed": failed}
            )
        return self._finish(n_batches, len(items), time.time() - started)

    def _finish(self, n_batches: int, n_items: int, seconds: float) -> dict[str, Any]:
        rows, rejects, failed = [], [], 0
        for b in range(n_batches):
            part = json.loads(self.part_path(b).read_text())
            rows.extend(part["rows"])
            rejects.extend(part["rejects"])
            failed += part["failed"]
        write_csv(self.csv_path, rows, self.fieldnames)
        reject_fields = list(dict.fromkeys(k for r in rejects for k in r)) or ["reason"]
        write_csv(self.rejects_path, rejects, reject_fields)
        summary = {
            "stage": self.stage,
            "shard": self.index,
            "input": n_items,
            "kept": len(rows),
            "rejected": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "failed_batches": failed,
            "batches": n_batches,
        }
        atomic_write_json(self.summary_path, summary)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        log.info(
            "%s %s done in %.1f s: %d in, %d kept, rejected %s, %d failed batches",
            self.stage,
            shard_name(self.index),
            seconds,
            n_items,
            len(rows),
            summary["rejected"] or "none",
            failed,
        )
        return summary


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def require_input(path: Path, key: str, made_by: str) -> Path:
    """``path`` (a stage's input) if it exists, else a ConfigError naming ``key`` and the stage
    that writes it: a missing input must not read as "nothing to do"."""
    if not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist{path_hint(path)}; {made_by}")
    return Path(path)
