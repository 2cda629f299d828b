"""Run logging on rank 0: progress bar, ``metrics.jsonl``, wandb (offline by default), summary."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bimac.config import to_dict
from bimac.engine.config import TrainConfig

logger = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _step_of(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a line cut short by a kill counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class RunLogger:
    """Everything a run reports. Only rank 0 writes; other ranks get a no-op logger.

    wandb offline runs cannot be resumed, so every segment of a preempted run is its own wandb
    run in the group ``run_name`` (sync them with ``wandb sync``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        experiment_config: Any,
        rank: int,
        total_steps: int,
        start_step: int,
        config_hash: str,
    ) -> None:
        self.active = rank == 0
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.run_name = cfg.run_name or self.out.name
        self.commit = git_commit() if self.active else ""
        self.t0 = time.time()
        self.wandb_run = None
        self.pbar = None
        self.ids_jsonl = None
        if not self.active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._keep_steps_up_to(start_step, "metrics.jsonl")
        # line-buffered: a step's line is on disk before the checkpoint that covers it is saved
        self.jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - finish()
        if cfg.log_sample_ids:
            self._keep_steps_up_to(start_step, "sample_ids.jsonl")
            self.ids_jsonl = open(self.out / "sample_ids.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg.progress_bar:
            self.pbar = tqdm(total=total_steps, initial=start_step, desc=self.run_name, unit="step")
        if cfg.wandb != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                name=self.run_name,
                group=self.run_name,
                mode=cfg.wandb,
                dir=str(self.out),
                config={
                    "experiment": to_dict(experiment_config) if experiment_config else {},
                    "git_commit": self.commit,
                    "config_hash": config_hash,
                },
            )

    def _keep_steps_up_to(self, step: int, name: str) -> None:
        """Drop lines of ``name`` of steps after ``step`` (the checkpoint resumed from), which a
        killed run logged before its next save: the resumed run logs them again, so each step
        appears once."""
        path = self.out / name
        if not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if _step_of(ln) <= step]
        if len(kept) != len(lines):
            logger.info("%s: dropped %d lines after step %d", name, len(lines) - len(kept), step)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)

    def log_step(self, record: dict[str, Any], samples_per_s: float) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({**record, "samples_per_s": samples_per_s}) + "\n")
        step = record["step"]
        if self.pbar is not None:
            self.pbar.update(1)
            post = {"samples/s": f"{samples_per_s:.1f}", "loss": f"{record['loss']:.4f}"}
            post.update({k: f"{v:.3f}" for k, v in record["losses"].items()})
            self.pbar.set_postfix(post, refresh=False)
        if self.wandb_run is not None and (step % self.cfg.log_every == 0 or step == 1):
            flat = {
                "train/loss": record["loss"],
                "train/lr": record["lr"],
                "train/grad_norm": record["grad_norm"],
                "train/samples_per_s": samples_per_s,
            }
            flat.update({f"loss/{k}": v for k, v in record["losses"].items()})
            flat.update({f"metric/{k}": v for k, v in record["metrics"].items()})
            flat.update({f"skipped/{k}": v for k, v in record["skipped"].items()})
            self.wandb_run.log(flat, step=step)

    def log_sample_ids(self, step: int, ids: list[str]) -> None:
        """``sample_ids.jsonl``: the samples global step ``step`` consumed, in global order."""
        if self.ids_jsonl is not None:
            self.ids_jsonl.write(json.dumps({"step": step, "ids": ids}) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.active:
            return
        if self.pbar is not None:
            self.pbar.close()
        self.jsonl.close()
        if self.ids_jsonl is not None:
            self.ids_jsonl.close()
        summary = {
            **summary,
            "run_name": self.run_name,
            "git_commit": self.commit,
            "wall_s": round(time.time() - self.t0, 2),
        }
        if self.wandb_run is not None:
            summary["wandb_run_id"] = self.wandb_run.id
            self.wandb_run.summary.update(
                {k: v for k, v in summary.items() if not isinstance(v, dict)}
            )
            self.wandb_run.finish()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
