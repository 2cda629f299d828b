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
import sys
from pathlib import Path
from typing import Any

import submitit

from bimac.config import CliParser, run_main
from bimac.tools.grid import GRIDS, Cell, check_cells, collect, grid_cells, with_seeds

REPO = Path(__file__).resolve().parents[1]


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
        jobs.append(executor.submit(RunJob(), cell.entry, cell.config, cell.run_overrides(out)))
    return jobs


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
