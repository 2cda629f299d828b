"""Submit BiMAC pretraining with submitit: one run, or a grid, and collect the results.

    python slurm/submit.py run   --config configs/pretrain/paper.yaml [key=value ...]
    python slurm/submit.py grid  --grid table5 --config configs/pretrain/paper.yaml --out runs/t5
    python slurm/submit.py grid  --grid table6 --lambdas 0.1 0.4 0.7 1.0 1.5 --out runs/t6
    python slurm/submit.py grid  --grid pal_table3 --config configs/finetune/caption_bn/paper.yaml
    python slurm/submit.py collect --out runs/t6

``table5``: one cell per preset in ``configs/pretrain/ablations/`` (the rows of BiMAC Table 5;
their ``objectives`` sections applied to ``--config``);
``table6``: the λ_GIT sweep of Table 6 (``objectives.lambda_git``);
``pal_table3`` / ``pal_table4``: the PAL captioner's Table 3 ablations and Table 4 (λ, τ, ρ)
sensitivity rows (``losses`` sections of ``configs/finetune/caption_bn/{ablations,sensitivity}``).
Each cell writes
``<out>/<cell>/summary.json``; ``collect`` (also run after ``grid --wait``) turns them into one
markdown table. ``--cluster local`` runs the cells as local processes (tests, laptops).

Preemption: the engine saves on USR1 and requeues the job itself; submitit's ``checkpoint()``
(rank 0 only, so no collective save there) just resubmits, and the run resumes from ``latest``.
"""

from __future__ import annotations

import argparse
import json
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
GRIDS = ("table5", "table6", "pal_table3", "pal_table4")


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
    and run the PAL captioner (``config`` is then a caption_bn YAML).
    """
    if grid == "table6":
        return [
            Cell(f"lambda_git={v:g}", config, [f"objectives.lambda_git={v}"])
            for v in (lambdas or TABLE6_LAMBDAS)
        ]
    if grid == "pal_table3":
        presets = [PAL_CONFIGS / "ablations" / f"{name}.yaml" for name in PAL_TABLE3]
        return _preset_cells(presets, "losses", config, "caption_bn")
    if grid == "pal_table4":
        presets = sorted((PAL_CONFIGS / "sensitivity").glob("*.yaml"))
        return _preset_cells(presets, "losses", config, "caption_bn")
    if grid != "table5":
        raise ValueError(f"unknown grid {grid!r}: one of {', '.join(GRIDS)}")
    presets = [p for p in sorted(ABLATIONS.glob("*.yaml")) if not p.stem.startswith("lambda_git")]
    if not presets:
        raise FileNotFoundError(f"no ablation presets in {ABLATIONS}")
    cells = _preset_cells(presets, "objectives", config, "pretrain")

    def order(cell: Cell) -> tuple[int, bool]:
        on = [o for o in cell.overrides if o.endswith("=true")]
        return len(on), "objectives.grounding=true" in on

    return sorted(cells, key=order)


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


def collect(out: Path) -> str:
    """Markdown table of every ``out/*/summary.json`` (one row per cell), with the captioning
    scores of ``eval_bn.json`` beside them for the PAL grids."""
    rows = []
    for path in sorted(out.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        scores = path.with_name("eval_bn.json")
        if scores.is_file():
            summary.setdefault("final_metrics", {}).update(json.loads(scores.read_text())["scores"])
        rows.append((path.parent.name, summary))
    if not rows:
        raise ConfigError(f"--out: no */summary.json under {out}; give the --out of a grid")
    losses = sorted({k for _, s in rows for k in s.get("final_losses", {})})
    metrics = sorted({k for _, s in rows for k in s.get("final_metrics", {})})
    head = ["cell", "status", "steps", "samples", "loss", *losses, *metrics, "skipped", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows:
        cells = [name, s.get("status"), s.get("step"), s.get("samples"), s.get("final_loss")]
        cells += [s.get("final_losses", {}).get(k) for k in losses]
        cells += [s.get("final_metrics", {}).get(k) for k in metrics]
        cells += [sum(s.get("skipped", {}).values()), s.get("wall_s")]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
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
    p.add_argument("--wait", action="store_true", help="wait for the jobs, then collect")
    p.add_argument("overrides", nargs="*", help="key=value applied to every cell")
    a = p.parse_intermixed_args(argv)  # overrides may follow options: `grid --grid t6 k=v`
    if a.mode == "collect":
        print(collect(a.out))
        return 0
    if a.mode == "run":
        cells = [Cell(Path(a.config).stem, a.config)]
    else:
        cells = grid_cells(a.grid, a.config, a.lambdas)
    for cell in cells:
        cell.overrides += a.overrides
    check_cells(cells)
    executor = make_executor(
        a.out / "submitit", a.cluster, a.nodes, a.gpus_per_node, a.timeout_min, a.partition
    )
    jobs = submit(cells, a.out, executor)
    for cell, job in zip(cells, jobs):
        print(f"{cell.name}: job {job.job_id} -> {a.out / cell.name}")
    if a.wait:
        for job in jobs:
            job.result()
        print(collect(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
