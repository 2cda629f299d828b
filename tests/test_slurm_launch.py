"""slurm/pretrain.sh: valid bash, and the exact launch commands it builds (DRY_RUN=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "pretrain.sh"


def _dry_run(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    out = subprocess.run(
        ["bash", str(SCRIPT)], env={**clean, "DRY_RUN": "1", "PYTHON": sys.executable, **env},
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
