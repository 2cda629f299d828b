"""Experiment grids: the cells of the papers' ablation tables, seeds, and their collected results.

A grid is a list of :class:`Cell` (an entry point, a config and the overrides that make the
row). ``slurm/submit.py`` submits them with submitit; :func:`run_local` runs them as local
processes a few at a time (``make tables`` on a laptop). Every run writes ``<out>/<run>/
summary.json`` (the engine) and, after its evaluation, ``eval_*.json`` files with a ``scores``
object; :func:`load_cells` groups the runs of a cell (``<cell>-seed<k>``) and :func:`collect`
lays them out as one markdown table with mean ± std over seeds and Welch's t-test against a
baseline row.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bimac.config import ConfigError, load_config

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ABLATIONS = REPO / "configs" / "pretrain" / "ablations"
PAL_CONFIGS = REPO / "configs" / "finetune" / "caption_bn"
TABLE6_LAMBDAS = (0.1, 0.4, 0.7, 1.0, 1.5)
# PAL Table 3 rows in the paper's order
PAL_TABLE3 = ("ce_real", "ce_real_syn", "ce_infonce", "ce_infonce_ot", "pal", "pal_infonce",
              "pal_infonce_ot")  # fmt: skip
PAL_TABLE1_BASELINES = ("vit_gpt2", "cnn_lstm")  # Table 1 rows after PAL + InfoNCE + OT
GRIDS = ("table5", "table6", "pal_table1", "pal_table3", "pal_table4")
SEEDED_RUN = re.compile(r"^(?P<cell>.+)-seed(?P<seed>\d+)$")
SIGNIFICANCE = 0.05  # Welch's t-test level for the "*" marks


@dataclass
class Cell:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    entry: str = "pretrain"  # or "caption_bn" (the PAL captioner's fine-tuning)

    def run_overrides(self, out: Path) -> list[str]:
        """The cell's overrides plus its own output directory and run name under ``out``."""
        return [
            *self.overrides,
            f"train.output_dir={out / self.name}",
            f"train.run_name={self.name}",
        ]


def _preset_cells(presets: list[Path], section: str, config: str, entry: str) -> list[Cell]:
    """One cell per preset: its ``section`` applied to ``config`` as overrides."""
    cells = []
    for preset in presets:
        values = (yaml.safe_load(preset.read_text()) or {}).get(section, {})
        overrides = [f"{section}.{k}={json.dumps(v)}" for k, v in values.items()]
        cells.append(Cell(preset.stem, config, overrides, entry))
    return cells


def grid_cells(grid: str, config: str, lambdas: list[float] | None = None) -> list[Cell]:
    """The cells of a grid on top of ``config`` (a tiny or paper experiment YAML).

    ``table5`` takes the ``objectives`` section of each preset in ``configs/pretrain/ablations/``
    (not ``lambda_git_*``), ordered as in the paper (more objectives later; grounding after the
    row without it); ``table6`` sweeps ``objectives.lambda_git``. ``pal_table3`` / ``pal_table4``
    take the ``losses`` section of ``configs/finetune/caption_bn/{ablations,sensitivity}/*.yaml``
    and run the PAL captioner (``config`` is then a caption_bn YAML); ``pal_table1`` is Table 3's
    full row (``pal_infonce_ot``) and one cell per baseline ``model.architecture``.
    """
    if grid == "table6":
        return [
            Cell(f"lambda_git={v:g}", config, [f"objectives.lambda_git={v}"])
            for v in (lambdas or TABLE6_LAMBDAS)
        ]
    if grid == "pal_table1":
        full = PAL_CONFIGS / "ablations" / "pal_infonce_ot.yaml"
        (pal,) = _preset_cells([full], "losses", config, "caption_bn")
        pal.overrides.append("model.architecture=pal")
        baselines = [
            Cell(arch, config, [f"model.architecture={arch}"], "caption_bn")
            for arch in PAL_TABLE1_BASELINES
        ]
        return [pal, *baselines]
    if grid == "pal_table3":
        presets = [PAL_CONFIGS / "ablations" / f"{name}.yaml" for name in PAL_TABLE3]
        return _preset_cells(presets, "losses", config, "caption_bn")
    if grid == "pal_table4":
        presets = sorted((PAL_CONFIGS / "sensitivity").glob("*.yaml"))
        return _preset_cells(presets, "losses", config, "caption_bn")
    if grid != "table5":
        raise ConfigError(f"unknown grid {grid!r}: one of {', '.join(GRIDS)}")
    presets = [p for p in sorted(ABLATIONS.glob("*.yaml")) if not p.stem.startswith("lambda_git")]
    if not presets:
        raise ConfigError(f"no ablation presets in {ABLATIONS}")
    cells = _preset_cells(presets, "objectives", config, "pretrain")

    def order(cell: Cell) -> tuple[int, bool]:
        on = [o for o in cell.overrides if o.endswith("=true")]
        return len(on), "objectives.grounding=true" in on

    return sorted(cells, key=order)


def with_seeds(cells: list[Cell], seeds: int) -> list[Cell]:
    """Each cell ``seeds`` times, ``train.seed=k`` and ``-seed<k>`` in the run name; one seed keeps
    the cells (and the config's own seed) as they are."""
    if seeds <= 1:
        return cells
    return [
        Cell(f"{c.name}-seed{k}", c.config, [*c.overrides, f"train.seed={k}"], c.entry)
        for c in cells
        for k in range(seeds)
    ]


def cell_config(cell: Cell) -> Any:
    """The cell's typed config (a bad key or file raises :class:`ConfigError` here)."""
    from bimac.tasks.caption_bn import CaptionBnConfig
    from bimac.tasks.pretrain import load_pretrain_config

    if cell.entry == "caption_bn":
        return load_config(CaptionBnConfig, cell.config, cell.overrides)
    return load_pretrain_config(cell.config, cell.overrides)


def check_cells(cells: list[Cell]) -> None:
    """Build every cell's config before any run starts: a bad key or file is one error now
    rather than one failed job per cell."""
    for cell in cells:
        cell_config(cell)


def run_done(run_dir: Path, evaluations: list[str]) -> bool:
    """A run finished (``summary.json`` says completed) and its evaluation files exist."""
    summary = run_dir / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text()).get("status") != "completed":
        return False
    return all((run_dir / name).is_file() for name in evaluations)


def run_local(
    runs: list[tuple[Cell, list[list[str]]]],
    out: Path,
    jobs: int = 2,
    evaluations: dict[str, list[str]] | None = None,
) -> dict[str, int]:
    """Run cells as local single-process jobs, ``jobs`` at a time; returns run -> exit code.

    Each item is a cell and its commands, one after the other (its training, then its
    evaluation), from the repository root; a run whose ``summary.json`` is complete and whose
    ``evaluations[cell.entry]`` files exist when its turn comes is skipped, so an interrupted grid
    continues where it stopped and a run another invocation finished meanwhile is not rerun. Output goes to ``<out>/<run>/run.log``, the run's wall time (training and
    evaluation) to ``<out>/<run>/run_time.json``. One thread per process: the jobs share the cores.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    pending = list(runs)
    codes: dict[str, int] = {}
    active: list[tuple[str, subprocess.Popen, list[list[str]], Any]] = []
    started: dict[str, float] = {}

    def start(name: str, commands: list[list[str]]) -> None:
        started.setdefault(name, time.time())
        (out / name).mkdir(parents=True, exist_ok=True)
        log = open(out / name / "run.log", "a")  # noqa: SIM115 (closed when the run ends)
        log.write(f"$ {' '.join(commands[0])}\n")
        log.flush()
        proc = subprocess.Popen(
            commands[0], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        active.append((name, proc, commands[1:], log))

    t0 = time.time()
    while pending or active:
        while pending and len(active) < jobs:
            cell, commands = pending.pop(0)
            # checked when its turn comes: another invocation may have finished it meanwhile
            if run_done(out / cell.name, (evaluations or {}).get(cell.entry, [])):
                logger.info("%s: done already, skipped", cell.name)
                continue
            logger.info("%s: started (%d waiting)", cell.name, len(pending))
            start(cell.name, commands)
        time.sleep(0.5)
        for item in list(active):
            name, proc, rest, log = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            if proc.returncode == 0 and rest:
                start(name, rest)  # the next command of the same run takes its slot
                continue
            codes[name] = proc.returncode
            if proc.returncode == 0:  # the run's wall time, training and evaluation
                (out / name / "run_time.json").write_text(
                    json.dumps({"wall_s": round(time.time() - started[name], 1)})
                )
            state = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
            logger.info("%s: %s after %.0f s of the grid; log %s", name, state, time.time() - t0,
                        out / name / "run.log")  # fmt: skip
    return codes


def load_runs(out: Path) -> dict[str, dict]:
    """Every ``out/*/summary.json``, with the ``scores`` (or ``metrics``) of the run's
    ``eval_*.json`` files merged into its ``final_metrics``."""
    runs: dict[str, dict] = {}
    for path in out.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        for scores in sorted(path.parent.glob("eval_*.json")):
            evaluation = json.loads(scores.read_text())
            # eval_bn.json's "scores"; bimac.eval.world's flat "metrics"
            found = evaluation.get("scores", evaluation.get("metrics"))
            if isinstance(found, dict):
                summary.setdefault("final_metrics", {}).update(found)
        runs[path.parent.name] = summary
    return runs


def _run_order(out: Path, names: list[str]) -> list[str]:
    """``names`` in the grid's order (``grid.json``, written at submission), else sorted."""
    manifest = out / "grid.json"
    order = json.loads(manifest.read_text())["runs"] if manifest.is_file() else []
    rank = {n: i for i, n in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def load_cells(out: Path) -> dict[str, list[dict]]:
    """The runs under ``out`` grouped by cell (``<cell>-seed<k>`` -> ``<cell>``), in grid order."""
    runs = load_runs(out)
    if not runs:
        raise ConfigError(f"--out: no */summary.json under {out}; give the --out of a grid")
    groups: dict[str, list[dict]] = {}
    for name in _run_order(out, list(runs)):
        match = SEEDED_RUN.match(name)
        groups.setdefault(match["cell"] if match else name, []).append(runs[name])
    return groups


def numbers(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def welch_p(runs: list[float], base: list[float]) -> float:
    """Welch's t-test (SciPy ``ttest_ind(equal_var=False)``) p-value of two cells' per-seed values;
    without spread in either cell: 0 where the means differ, else 1."""
    from scipy.stats import ttest_ind

    if statistics.pvariance(runs) == 0 and statistics.pvariance(base) == 0:
        return 0.0 if statistics.fmean(runs) != statistics.fmean(base) else 1.0
    return float(ttest_ind(runs, base, equal_var=False).pvalue)


def differs(runs: list[float], base: list[float]) -> bool:
    """Beyond the seeds' spread: Welch's t-test at ``SIGNIFICANCE``."""
    return welch_p(runs, base) < SIGNIFICANCE


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def _cell_value(values: list[Any], compared: bool, base: list[Any] | None) -> str:
    """One run, or a bookkeeping column its seeds agree on: the value. Several seeds: ``mean ±
    std`` (sample std), with ``*`` where ``base`` (the baseline cell's values) differs beyond the
    spread."""
    nums = numbers(values)
    if len(values) == 1 or not nums or (not compared and len(set(map(str, values))) == 1):
        return _fmt(values[0]) if len(set(map(str, values))) == 1 else "/".join(map(str, values))
    text = f"{statistics.fmean(nums):.4f} ± {statistics.stdev(nums) if len(nums) > 1 else 0:.4f}"
    base_nums = numbers(base or [])
    if compared and len(nums) > 1 and len(base_nums) > 1 and differs(nums, base_nums):
        text += " *"
    return text


def collect(out: Path, baseline: str | None = None) -> str:
    """Markdown table of every ``out/*/summary.json`` (and its ``eval_*.json`` scores): one row
    per cell, its seeds' runs aggregated as mean ± std and compared with the ``baseline`` cell
    (default: the grid's first); also written to ``out/results.md``."""
    groups = load_cells(out)
    baseline = baseline or next(iter(groups))
    if baseline not in groups:
        raise ConfigError(f"--baseline {baseline!r} is not a cell under {out}: {', '.join(groups)}")
    seeded = any(len(g) > 1 for g in groups.values())
    summaries = [s for g in groups.values() for s in g]
    losses = sorted({k for s in summaries for k in s.get("final_losses", {})})
    metrics = sorted({k for s in summaries for k in s.get("final_metrics", {})})

    def columns(s: dict) -> list[tuple[Any, bool]]:
        """(value, compared with the baseline) per column of one run."""
        cols = [(s.get("status"), False), (s.get("step"), False), (s.get("samples"), False)]
        cols += [(s.get("final_loss"), True)]
        cols += [(s.get("final_losses", {}).get(k), True) for k in losses]
        cols += [(s.get("final_metrics", {}).get(k), True) for k in metrics]
        return cols + [(sum(s.get("skipped", {}).values()), False), (s.get("wall_s"), False)]

    head = ["cell", *(["seeds"] if seeded else []), "status", "steps", "samples", "loss"]
    head += [*losses, *metrics, "skipped", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_cols = [columns(s) for s in groups[baseline]]
    for name, group in groups.items():
        per_run = [columns(s) for s in group]
        cells = [name, *([str(len(group))] if seeded else [])]
        for j, (_, compared) in enumerate(per_run[0]):
            base = [c[j][0] for c in base_cols] if name != baseline else None
            cells.append(_cell_value([c[j][0] for c in per_run], compared, base))
        lines.append("| " + " | ".join(cells) + " |")
    if seeded:
        lines.append(
            f"\nmean ± sample standard deviation over the seeds; `*`: differs from `{baseline}` "
            f"by Welch's t-test (SciPy `ttest_ind(equal_var=False)`) at p < {SIGNIFICANCE}."
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table
