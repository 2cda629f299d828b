"""Process-group set-up: torchrun, srun (SLURM variables), submitit, or a single local process."""

from __future__ import annotations

import atexit
import logging
import os
import socket

import torch

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_env() -> None:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT exist.

    ``deepspeed.init_distributed`` reads these and otherwise tries MPI. In a submitit job,
    submitit's TorchDistributedEnvironment exports them; under plain ``srun`` we map
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (master = first host of the node list, port from the
    job id); with nothing set we are one local process.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    if "SUBMITIT_EXECUTOR" in os.environ:  # a submitit job (slurm or local executor)
        import submitit

        env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        logger.info("submitit rank %d/%d, master %s", env.rank, env.world_size, env.master_addr)
        return
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:  # srun, one task per GPU
        job_id = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
        os.environ.setdefault("MASTER_ADDR", master_host())
        os.environ.setdefault("MASTER_PORT", str(20000 + job_id % 20000))  # as slurm/pretrain.sh
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns ``(rank, world_size)``.

    Without CUDA the DeepSpeed accelerator is the CPU one with the gloo backend
    (``DS_ACCELERATOR`` must be set before DeepSpeed is first imported).
    """
    export_env()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        atexit.register(destroy_process_group)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def destroy_process_group() -> None:
    """Run at exit (registered by :func:`init_distributed`): destroy the process group while the
    interpreter is still whole. Left to interpreter teardown, gloo's threads can free tensors of
    unfinished work (a step a run stopped in, e.g. on divergence) after Python is gone, and the
    rank dies with SIGABRT after its work is done (pytorch/pytorch#179291; the likely cause of a
    2-rank ZeRO test's SIGABRT in CI on 2026-12-06, which did not recur here)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def master_host() -> str:
    """First host of the job's ``SLURM_JOB_NODELIST`` (``gpu[01-02,05]`` -> ``gpu01``), read by
    submitit's public SLURM job environment."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    return SlurmJobEnvironment().hostnames[0]
