"""Submit BiMAC pretraining with submitit: one run, or a grid, and collect the results.

    python slurm/submit.py run   --config configs/pretrain/paper.yaml [key=value ...]
    python slurm/submit.py grid  --grid table5 --config configs/pretrain/paper.yaml --out runs/t5
    python slurm/submit.py grid  --grid table6 --lambdas 0.1 0.4 0.7 1.0 1.5 --out runs/t6
    python slurm/submit.py grid  --grid pal_table3 --config configs/finetune/caption_bn/paper.yaml
    python slurm/submit.py grid  --grid pal_table1 --config configs/finetune/caption_bn/paper.yaml
    python slurm/submit.py grid  --grid table5 --seeds 3 --config configs/pretrain/tiny.yaml --out runs/t5
    python slurm/submit.py collect --out runs/t6 [--baseline CELL]

``table5``: one cell per preset in ``configs/pretrain/ablations/`` (the rows of BiMAC Table 5;
their ``objectives`` sections applied to ``--config``);
``table6``: the λ_GIT sweep of Table 6 (``objectives.lambda_git``);
``pal_table3`` / ``pal_table4``: the PAL captioner's Table 3 ablations and Table 4 (λ, τ, ρ)
sensitivity rows (``losses`` sections of ``configs/finetune/caption_bn/{ablations,sensitivity}``);
``pal_table1``: PAL + InfoNCE + OT against the ViT + GPT-2 and CNN + LSTM baselines
(``model.architecture``).
Each cell writes
``<out>/<cell>/summary.json``; ``collect`` (also run after ``grid --wait``) turns them into one
markdown table. ``--seeds N`` runs every cell N times with ``train.seed=0..N-1`` as
``<out>/<cell>-seed<k>``; ``collect`` then writes each number as mean ± standard deviation over
the seeds and marks a loss or metric with ``*`` where it differs from the baseline row (the
grid's first cell, or ``--baseline``) by Welch's t-test at p < 0.05, i.e. beyond the seeds'
spread. ``--cluster local`` runs the cells as local processes (tests, laptops).

Preemption: the engine saves on USR1 and requeues the job itself; submitit's ``checkpoint()``
(rank 0 only, so no collective save there) just resubmits, and the run resumes from ``latest``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml

from bimac.config import CliParser, ConfigError, load_config, run_main

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = REPO / "configs" / "pretrain" / "ablations"
TABLE6_LAMBDAS = (0.1, 0.4, 0.7, 1.0, 1.5)
PAL_CONFIGS = REPO / "configs" / "finetune" / "caption_bn"
# PAL Table 3 rows in the paper's order
PAL_TABLE3 = ("ce_real", "ce_real_syn", "ce_infonce", "ce_infonce_ot", "pal", "pal_infonce",
              "pal_infonce_ot")  # fmt: skip
PAL_TABLE1_BASELINES = ("vit_gpt2", "cnn_lstm")  # Table 1 rows after PAL + InfoNCE + OT
GRIDS = ("table5", "table6", "pal_table1", "pal_table3", "pal_table4")
SEEDED_RUN = re.compile(r"^(?P<cell>.+)-seed(?P<seed>\d+)$")
SIGNIFICANCE = 0.05  # Welch's t-test level for collect's "*" marks


@dataclass
class Cell:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    entry: str = "pretrain"  # or "caption_bn" (the PAL captioner's fine-tuning)


class RunJob(submitit.helpers.Checkpointable):
    """One run on every task of a submitit job (one task per GPU)."""

    def __call__(self, entry: str, config: str, overrides: list[str]) -> dict[str, Any]:
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        sys.path.insert(0, str(REPO))
        if entry == "caption_bn":
            from finetune import caption_bn

            return {"scores": caption_bn.main(["--config", config, *overrides])}
        from pretrain import run_pretraining

        return run_pretraining(config, overrides).summary


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


def make_executor(
    folder: Path,
    cluster: str | None,
    nodes: int,
    gpus_per_node: int,
    timeout_min: int,
    partition: str | None,
) -> submitit.Executor:
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = dict(
        nodes=nodes,
        tasks_per_node=max(1, gpus_per_node),
        timeout_min=timeout_min,
    )
    if executor.cluster == "slurm":
        params.update(
            gpus_per_node=gpus_per_node,
            cpus_per_task=10,
            slurm_signal_delay_s=120,
            slurm_partition=partition,
        )
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def submit(cells: list[Cell], out: Path, executor: submitit.Executor) -> list[submitit.Job]:
    """One job per cell; the cell's output directory is ``out/<cell name>``."""
    if __name__ != "__main__":  # imported (tests): ship this module's job class by value
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out.mkdir(parents=True, exist_ok=True)
    # collect lays the cells out in grid order, the first one the baseline
    (out / "grid.json").write_text(json.dumps({"runs": [c.name for c in cells]}, indent=1))
    jobs = []
    for cell in cells:
        executor.update_parameters(name=f"bimac-{cell.name}")
        overrides = [
            *cell.overrides,
            f"train.output_dir={out / cell.name}",
            f"train.run_name={cell.name}",
        ]
        jobs.append(executor.submit(RunJob(), cell.entry, cell.config, overrides))
    return jobs


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def _differs(runs: list[float], base: list[float]) -> bool:
    """Welch's t-test (unequal variances) of two cells' per-seed values at ``SIGNIFICANCE``;
    without spread in either cell any difference counts."""
    from scipy.stats import ttest_ind

    if statistics.pvariance(runs) == 0 and statistics.pvariance(base) == 0:
        return statistics.fmean(runs) != statistics.fmean(base)
    return bool(ttest_ind(runs, base, equal_var=False).pvalue < SIGNIFICANCE)


def _cell_value(values: list[Any], compared: bool, base: list[Any] | None) -> str:
    """One run, or a bookkeeping column its seeds agree on: the value. Several seeds: ``mean ±
    std`` (sample std), with ``*`` where ``base`` (the baseline cell's values) differs beyond the
    spread."""
    nums = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(values) == 1 or not nums or (not compared and len(set(map(str, values))) == 1):
        return _fmt(values[0]) if len(set(map(str, values))) == 1 else "/".join(map(str, values))
    text = f"{statistics.fmean(nums):.4f} ± {statistics.stdev(nums) if len(nums) > 1 else 0:.4f}"
    base_nums = [v for v in base or [] if isinstance(v, (int, float)) and math.isfinite(v)]
    if compared and len(nums) > 1 and len(base_nums) > 1 and _differs(nums, base_nums):
        text += " *"
    return text


def _run_order(out: Path, names: list[str]) -> list[str]:
    """``names`` in the grid's order (``grid.json``, written at submission), else sorted."""
    manifest = out / "grid.json"
    order = json.loads(manifest.read_text())["runs"] if manifest.is_file() else []
    rank = {n: i for i, n in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def collect(out: Path, baseline: str | None = None) -> str:
    """Markdown table of every ``out/*/summary.json``, with the captioning scores of
    ``eval_bn.json`` beside them for the PAL grids: one row per cell, its seeds' runs
    (``<cell>-seed<k>``) aggregated as mean ± std and compared with the ``baseline`` cell."""
    runs: dict[str, dict] = {}
    for path in out.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        scores = path.with_name("eval_bn.json")
        if scores.is_file():
            summary.setdefault("final_metrics", {}).update(json.loads(scores.read_text())["scores"])
        runs[path.parent.name] = summary
    if not runs:
        raise ConfigError(f"--out: no */summary.json under {out}; give the --out of a grid")
    groups: dict[str, list[dict]] = {}
    for name in _run_order(out, list(runs)):
        match = SEEDED_RUN.match(name)
        groups.setdefault(match["cell"] if match else name, []).append(runs[name])
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


def check_cells(cells: list[Cell]) -> None:
    """Build every cell's config here, before any job is submitted: a bad key or file is one
    error now rather than one failed job per cell."""
    from bimac.tasks.caption_bn import CaptionBnConfig
    from bimac.tasks.pretrain import load_pretrain_config

    for cell in cells:
        if cell.entry == "caption_bn":
            load_config(CaptionBnConfig, cell.config, cell.overrides)
        else:
            load_pretrain_config(cell.config, cell.overrides)


PROG = "python slurm/submit.py"


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["run", "grid", "collect"])
    p.add_argument(
        "--config",
        default="configs/pretrain/paper.yaml",
        help="experiment YAML; its keys: `python -m pretrain --help` (default: %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--grid", choices=GRIDS, default="table6")
    p.add_argument("--lambdas", type=float, nargs="*", help="table6 values (default: the paper's)")
    p.add_argument("--out", type=Path, default=Path("runs/grid"))
    p.add_argument(
        "--cluster",
        choices=["slurm", "local", "debug"],
        default=None,
        help="default: slurm when available, else local",
    )
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--timeout-min", type=int, default=48 * 60)
    p.add_argument("--partition", default=None)
    p.add_argument("--seeds", type=int, default=1, help="runs per cell (train.seed=0..N-1)")
    p.add_argument("--baseline", help="collect: the cell others are compared with (default: first)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs, then collect")
    p.add_argument("overrides", nargs="*", help="key=value applied to every cell")
    a = p.parse_intermixed_args(argv)  # overrides may follow options: `grid --grid t6 k=v`
    if a.mode == "collect":
        print(collect(a.out, a.baseline))  # no runs yet or an unknown --baseline: ConfigError
        return 0
    if a.mode == "run":
        cells = [Cell(Path(a.config).stem, a.config)]
    else:
        cells = grid_cells(a.grid, a.config, a.lambdas)
    for cell in cells:
        cell.overrides += a.overrides
    check_cells(cells)
    cells = with_seeds(cells, a.seeds)
    executor = make_executor(
        a.out / "submitit", a.cluster, a.nodes, a.gpus_per_node, a.timeout_min, a.partition
    )
    jobs = submit(cells, a.out, executor)
    for cell, job in zip(cells, jobs):
        print(f"{cell.name}: job {job.job_id} -> {a.out / cell.name}")
    if a.wait:
        for job in jobs:
            job.result()
        print(collect(a.out, a.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
