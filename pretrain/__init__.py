"""BiMAC pretraining entry point: ``python -m pretrain --config configs/pretrain/tiny.yaml k=v ...``.

The config and the task live in :mod:`bimac.tasks.pretrain`; this package runs them on the engine
(one process per rank under torchrun / srun, or :func:`launch_local` on this machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bimac.engine import TrainResult, train
from bimac.tasks.pretrain import BiMACPretrain, PretrainConfig, load_pretrain_config

REPO = Path(__file__).resolve().parents[1]


def run_pretraining(config: PretrainConfig | str | Path, overrides: list[str] = ()) -> TrainResult:
    """Pretrain (or resume) BiMAC; call on every rank (torchrun / srun / one local process)."""
    cfg = config if isinstance(config, PretrainConfig) else load_pretrain_config(config, overrides)
    if isinstance(config, PretrainConfig) and overrides:
        raise ValueError("overrides apply to a config file; edit the PretrainConfig instead")
    return train(BiMACPretrain(cfg), cfg.train, experiment_config=cfg)


def launch_local(
    config: str | Path, overrides: list[str] = (), nproc: int = 2, env: dict[str, str] | None = None
) -> int:
    """Pretrain on this machine with ``nproc`` processes (torchrun); returns the exit code.

    Without CUDA it uses DeepSpeed's CPU accelerator and gloo (what ``make demo`` runs:
    ``launch_local("configs/pretrain/tiny.yaml", nproc=2)``; ZeRO-2 is the tiny config's stage).
    """
    import torch

    run_env = {**os.environ, **(env or {})}
    if not torch.cuda.is_available():
        run_env.setdefault("DS_ACCELERATOR", "cpu")
        run_env.setdefault("OMP_NUM_THREADS", "1")
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), run_env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "pretrain", "--config", str(config), *overrides]  # fmt: skip
    return subprocess.run(cmd, env=run_env, cwd=REPO).returncode
