"""slurm/pretrain.sh: valid bash, and the exact launch commands it builds (DRY_RUN=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "pretrain.sh"


def _dry_run(*args: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    out = subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**clean, "DRY_RUN": "1", "PYTHON": sys.executable, **env},
        capture_output=True, text=True, check=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    return out.stdout.strip()


def test_script_parses_and_asks_for_the_preemption_signal():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text


def test_dry_run_two_nodes_eight_gpus_prints_the_srun_command(tmp_path):
    # no scontrol on this machine: the node list is parsed by submitit's parser
    cmd = _dry_run(SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2",
                   SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="10",
                   CONFIG="configs/pretrain/paper.yaml", RUN_DIR="/scratch/bimac",
                   OVERRIDES="train.lr=1e-4 objectives.lambda_git=0.4")  # fmt: skip
    assert cmd == (
        "MASTER_ADDR=gpu07 MASTER_PORT=24242 "
        "srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=10 "
        f"--kill-on-bad-exit=1 {sys.executable} -u -m pretrain --config configs/pretrain/paper.yaml "
        "train.output_dir=/scratch/bimac train.lr=1e-4 objectives.lambda_git=0.4"
    )


def test_dry_run_outside_slurm_is_two_local_cpu_processes():
    cmd = _dry_run(CONFIG="configs/pretrain/tiny.yaml")
    assert cmd == (
        f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 "
        "-m pretrain --config configs/pretrain/tiny.yaml"
    )


def test_arguments_are_the_config_and_overrides_and_anything_else_is_one_line():
    """``bash slurm/pretrain.sh CONFIG k=v`` (or through sbatch) means CONFIG=... OVERRIDES=...;
    arguments come after OVERRIDES; a stray word is refused, never ignored."""
    cmd = _dry_run("configs/pretrain/tiny.yaml", "train.max_steps=5", OVERRIDES="train.lr=1e-4")
    assert cmd.endswith(
        "-m pretrain --config configs/pretrain/tiny.yaml train.lr=1e-4 train.max_steps=5"
    )
    bad = subprocess.run(["bash", str(SCRIPT), "configs/pretrain/tiny.yaml", "tiny"],
                         env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True,
                         cwd=REPO, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "slurm/pretrain.sh: error: argument 'tiny' is neither the config YAML (first) nor "
        "key=value; usage: bash slurm/pretrain.sh [CONFIG.yaml] [key=value ...]"
    ]


def _srun_on_path(tmp_path: Path) -> dict[str, str]:
    """PATH with ``srun`` = tests/fake_srun.py (one machine, the SLURM task variables set)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").symlink_to(REPO / "tests" / "fake_srun.py")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        clean.pop(var, None)
    return {**clean, "PATH": f"{bindir}{os.pathsep}{clean['PATH']}", "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.mark.slow
def test_slurm_branch_trains_through_srun_tasks(tmp_path):
    """`sbatch slurm/pretrain.sh`'s branch, run for real: the script's srun line starts one task
    per "GPU" (here 2 CPU tasks on 1 node) with the SLURM variables; the tasks form one gloo group
    from them and train the shipped tiny config."""
    from test_engine_pretrain import world_overrides

    env = _srun_on_path(tmp_path)
    overrides = world_overrides(tmp_path / "world") + [
        "train.max_steps=3",
        "train.save_every_steps=0",
    ]
    job = {"SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_JOB_ID": str(os.getpid()), "SLURM_CPUS_PER_TASK": "1",
           "CONFIG": "configs/pretrain/tiny.yaml", "RUN_DIR": str(tmp_path / "run"),
           "OVERRIDES": " ".join(overrides)}  # fmt: skip
    out = subprocess.run(["bash", str(SCRIPT)], env={**env, **job}, cwd=REPO,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["world_size"]) == ("completed", 3, 2)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


@pytest.mark.slow
def test_slurm_allocation_that_does_not_divide_the_global_batch_is_one_line(tmp_path):
    """3 srun tasks for a global batch of 8: every task stops with the one-line error naming
    train.global_batch_size and world_size=3, before any model is built; srun exits non-zero."""
    from test_engine_pretrain import world_overrides

    env = _srun_on_path(tmp_path)
    overrides = world_overrides(tmp_path / "world") + ["train.global_batch_size=8",
                                                       "train.micro_batch_size=4"]  # fmt: skip
    job = {"SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "3",
           "SLURM_JOB_ID": str(os.getpid() + 1), "SLURM_CPUS_PER_TASK": "1",
           "CONFIG": "configs/pretrain/tiny.yaml", "RUN_DIR": str(tmp_path / "run"),
           "OVERRIDES": " ".join(overrides)}  # fmt: skip
    out = subprocess.run(["bash", str(SCRIPT)], env={**env, **job}, cwd=REPO,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode != 0
    assert "train.global_batch_size=8 is not a multiple of" in out.stderr
    assert "world_size=3" in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_project_venv_is_preferred_over_the_system_python(tmp_path):
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "PYTHON"))
    }
    out = subprocess.run(
        ["bash", str(SCRIPT)], env={**clean, "DRY_RUN": "1", "NPROC": "2"},
        capture_output=True, text=True, check=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert out.stdout.startswith(".venv/bin/python -m torch.distributed.run ")
