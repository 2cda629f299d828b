"""Training curves as PNG from a run's ``metrics.jsonl`` (what ``bimac.engine`` writes on rank 0).

Each line of ``metrics.jsonl`` is one optimizer step: ``step``, ``loss`` (the weighted sum),
``losses`` (weighted terms by objective), ``metrics`` (e.g. ``pointing_game``, ``scst_reward``),
``lr``, ``grad_norm``, ``samples`` (all ranks) and, when the engine records them, ``time`` /
``samples_per_s``. Panels: losses, learning rate, throughput (or the gradient norm when the log
has no timing), then the metrics: those that stay within [0, 1] (rates, accuracies) share one
panel, every other metric (counts such as ``grounding_nouns``, rewards) gets a panel of its own,
and a metric that is a constant multiple of a loss term (the unweighted ``loss_*`` copies) is
left out, as it repeats that loss curve. Per-step metrics are noisy: each is drawn faint with
its moving average over a twentieth of the run on top, so a trend (the pointing game rising)
shows.

    bimac report RUN_DIR      # plots every run it finds and embeds them
    python -m bimac.tools.plots RUN_DIR [--out curves.png]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

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


def logged_names(rows: list[dict], section: str) -> list[str]:
    """Names logged under ``section`` (``losses``, ``metrics``) at any step, sorted."""
    return sorted({k for r in rows for k in r.get(section, {})})


def series(rows: list[dict], section: str, name: str) -> np.ndarray:
    """One logged value per step (NaN where a step lacks it)."""
    return np.array([r.get(section, {}).get(name, np.nan) for r in rows], dtype=float)


def repeats_a_loss(values: np.ndarray, losses: list[np.ndarray], rtol: float = 1e-4) -> bool:
    """True when ``values`` is a constant multiple of one of ``losses`` at every logged step."""
    for loss in losses:
        both = np.isfinite(values) & np.isfinite(loss) & (loss != 0)
        if both.sum() >= 2:
            ratio = values[both] / loss[both]
            if np.ptp(ratio) <= rtol * abs(ratio.mean()):
                return True
    return False


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` finite values at each step (fewer at the start)."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    lagged = lambda a: np.concatenate([np.zeros(window), a[:-window]])  # noqa: E731
    n = counts - lagged(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums - lagged(sums)) / n, np.nan)


def metric_panels(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """``(title, metric names)`` per metrics panel (the grouping of the module docstring)."""
    losses = [series(rows, "losses", k) for k in logged_names(rows, "losses")]
    unit, own = [], []
    for name in logged_names(rows, "metrics"):
        values = series(rows, "metrics", name)
        if repeats_a_loss(values, losses):
            continue
        finite = values[np.isfinite(values)]
        in_unit = finite.size and finite.min() >= 0.0 and finite.max() <= 1.0
        (unit if in_unit else own).append(name)
    panels = [("metrics within [0, 1]", unit)] if unit else []
    return panels + [(name, [name]) for name in own]


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
    metrics = metric_panels(rows)
    cols = 3
    n_rows = 1 + -(-len(metrics) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(15, 3.8 * n_rows), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in rows], label="total", color="black")
    for name in logged_names(rows, "losses"):
        ax.plot(steps, series(rows, "losses", name), label=name)
    ax.set(title="weighted loss terms", xlabel="step")
    ax.legend(fontsize=8)
    axes[0, 1].plot(steps, [r.get("lr", np.nan) for r in rows])
    axes[0, 1].set(title="learning rate", xlabel="step")
    ax = axes[0, 2]
    rate = _throughput(rows)
    if rate is not None:
        ax.plot(rate[0], rate[1])
        ax.set(title="throughput", xlabel="step", ylabel=rate[2])
    else:
        ax.plot(steps, [r.get("grad_norm", np.nan) for r in rows])
        ax.set(title="gradient norm (the log has no timing)", xlabel="step")
    window = max(1, len(rows) // 20)
    for ax, (title, names) in zip(axes.flat[cols:], metrics):
        for i, name in enumerate(names):
            values = series(rows, "metrics", name)
            colour = f"C{i}"
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
            ax.plot(steps, moving_average(values, window), color=colour, label=name)
        ax.set(title=f"{title} (faint: per step; line: mean of {window})", xlabel="step")
        ax.title.set_fontsize(10)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in axes.flat[cols + len(metrics) :]:
        ax.axis("off")
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
