"""Training curves as PNG from a run's ``metrics.jsonl`` (what ``bimac.engine`` writes on rank 0).

Each line of ``metrics.jsonl`` is one optimizer step: ``step``, ``loss`` (the weighted sum),
``losses`` (weighted terms by objective), ``metrics`` (e.g. ``pointing_game``, ``scst_reward``),
``lr``, ``grad_norm``, ``samples`` (all ranks) and, when the engine records them, ``time`` /
``samples_per_s``. Panels: losses, metrics, learning rate, throughput (or the gradient norm
when the log has no timing).

    bimac report RUN_DIR      # plots every run it finds and embeds them
    python -m bimac.tools.plots RUN_DIR [--out curves.png]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

LOG_FILE = "metrics.jsonl"


def read_log(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl``; a torn last line (a killed run) is skipped and logged."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: unreadable line skipped", path, n)
    # a resumed run appends: keep the last record of each step
    by_step = {r["step"]: r for r in rows if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def _throughput(rows: list[dict]) -> tuple[list[int], list[float], str] | None:
    if all("samples_per_s" in r for r in rows):
        return [r["step"] for r in rows], [r["samples_per_s"] for r in rows], "samples/s"
    if all("time" in r for r in rows) and len(rows) > 1:
        steps, rates = [], []
        for a, b in zip(rows, rows[1:]):
            if b["time"] > a["time"]:
                steps.append(b["step"])
                rates.append((b["samples"] - a["samples"]) / (b["time"] - a["time"]))
        return steps, rates, "samples/s"
    return None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """``run_dir/metrics.jsonl`` -> PNG (default ``run_dir/training_curves.png``); None if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_log(run_dir / LOG_FILE)
    if not rows:
        logger.warning("%s: no training records", run_dir / LOG_FILE)
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in rows], label="total", color="black")
    for name in sorted({k for r in rows for k in r.get("losses", {})}):
        ax.plot(steps, [r["losses"].get(name, float("nan")) for r in rows], label=name)
    ax.set(title="weighted loss terms", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    names = sorted({k for r in rows for k in r.get("metrics", {})})
    for name in names:
        ax.plot(steps, [r["metrics"].get(name, float("nan")) for r in rows], label=name)
    ax.set(title="metrics (grounding score, rewards, ...)", xlabel="step")
    if names:
        ax.legend(fontsize=8)
    axes[1, 0].plot(steps, [r.get("lr", float("nan")) for r in rows])
    axes[1, 0].set(title="learning rate", xlabel="step")
    ax = axes[1, 1]
    rate = _throughput(rows)
    if rate is not None:
        ax.plot(rate[0], rate[1])
        ax.set(title="throughput", xlabel="step", ylabel=rate[2])
    else:
        ax.plot(steps, [r.get("grad_norm", float("nan")) for r in rows])
        ax.set(title="gradient norm (the log has no timing)", xlabel="step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "training_curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(
        prog="python -m bimac.tools.plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("run_dir", help="a run's train.output_dir (holds metrics.jsonl)")
    ap.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/training_curves.png)")
    args = ap.parse_args(argv)
    path = plot_run(args.run_dir, args.out)
    print(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
