"""Checkpoints: DeepSpeed's collective ``save_checkpoint`` plus what it does not do for us.

Layout under ``<output_dir>/checkpoints``::

    step00000040/            one DeepSpeed tag (model, optimizer shards, client_state on rank 0)
        rng/rank{r}.pt       per-rank RNG states (client_state is written by rank 0 only)
    latest                   the tag of the newest *complete* checkpoint

DeepSpeed writes ``latest`` itself while saving; we pass ``save_latest=False`` and replace
``latest`` atomically after every rank has finished, so a save killed midway leaves the previous
checkpoint as ``latest``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bimac.config import ConfigError, UserError

logger = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step\d{8}$")


class CheckpointSaveError(UserError, RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); ``latest`` is unchanged."""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/tuples (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(ckpt_root: Path) -> str | None:
    """Tag named by ``latest``, or None when there is no complete checkpoint."""
    path = Path(ckpt_root) / "latest"
    return path.read_text().strip() if path.is_file() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    engine: Any, ckpt_root: Path, step: int, client_state: dict[str, Any], keep_last: int
) -> Path:
    """Collective save of tag ``stepNNNNNNNN`` on every rank; returns the tag directory.

    ``client_state`` must already hold every rank's data cursor (only rank 0's copy is written).
    """
    ckpt_root = Path(ckpt_root)
    tag = tag_for_step(step)
    rank = dist.get_rank()
    try:
        engine.save_checkpoint(
            str(ckpt_root), tag=tag, client_state=client_state, save_latest=False
        )
        rng_dir = ckpt_root / tag / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_dir / f"rank{rank}.pt")
    except Exception as err:
        # ENOSPC arrives as OSError from Python's writers but as RuntimeError ("basic_ios::clear",
        # "enforce fail at inline_container.cc") from torch's C++ one: any failure is a failed
        # save. This rank exits; the launcher (or the watchdog) stops the others.
        shutil.rmtree(ckpt_root / tag, ignore_errors=True)
        free_mib = shutil.disk_usage(ckpt_root).free / 2**20
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointSaveError(
            f"rank {rank} could not write checkpoint {ckpt_root / tag}: {first_line} "
            f"({free_mib:.0f} MiB free there); the partial checkpoint was removed and `latest` "
            f"still names {latest_tag(ckpt_root) or 'no checkpoint'}, which is intact. Free space "
            f"under {ckpt_root} (or lower train.keep_last) and restart: the run resumes from it"
        ) from err
    dist.barrier()  # every rank's shards and RNG file are on disk before `latest` moves
    if rank == 0:
        _write_atomic(ckpt_root / "latest", tag)
        prune(ckpt_root, keep_last)
    dist.barrier()
    logger.info("saved checkpoint %s", ckpt_root / tag)
    return ckpt_root / tag


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` (never ``latest``)."""
    latest = latest_tag(ckpt_root)
    if latest is None or keep_last <= 0:
        return
    tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    older = [t for t in tags if t <= latest]
    for tag in older[:-keep_last]:
        shutil.rmtree(ckpt_root / tag, ignore_errors=True)


def remove_incomplete(ckpt_root: Path) -> None:
    """Delete checkpoint directories newer than ``latest``: saves that a kill or a failure cut
    short (their files would otherwise fill the disk, and ``prune`` never looks past ``latest``)."""
    if not Path(ckpt_root).is_dir():
        return
    latest = latest_tag(ckpt_root) or ""
    for p in sorted(Path(ckpt_root).iterdir()):
        if p.is_dir() and TAG_RE.match(p.name) and p.name > latest:
            logger.warning("removing incomplete checkpoint %s (newer than `latest`)", p)
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine: Any, tag_dir: Path) -> dict[str, Any]:
    """Load model/optimizer/scheduler from ``tag_dir`` and this rank's RNG; returns client_state."""
    tag_dir = Path(tag_dir)
    written_by = len(list((tag_dir / "rng").glob("rank*.pt")))  # one RNG file per rank
    if written_by != dist.get_world_size():
        raise ConfigError(
            f"checkpoint {tag_dir} was written by {written_by} ranks and this run has "
            f"{dist.get_world_size()}: exact resume needs the same number of ranks; launch "
            f"{written_by}, or start afresh with train.resume=none or another train.output_dir"
        )
    rng_file = tag_dir / "rng" / f"rank{dist.get_rank()}.pt"
    path, client_state = engine.load_checkpoint(
        str(tag_dir.parent),
        tag=tag_dir.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    set_rng_state(torch.load(rng_file, weights_only=True))
    logger.info("resumed from %s (step %s)", tag_dir, client_state.get("step"))
    return client_state


def export_model(engine: Any, out_dir: Path, experiment_config: Any, task: Any) -> Path:
    """Single-file export for inference and fine-tuning (collective under ZeRO-3).

    Writes ``model.safetensors`` + ``config.yaml`` (the experiment config), or calls
    ``task.export(model, out_dir)`` when the task provides one (e.g. to add the tokenizer).
    """
    import deepspeed

    from bimac import export_folder

    out_dir = Path(out_dir)
    module = engine.module
    params = list(module.parameters())
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if engine.zero_optimization_stage() == 3
        else contextlib.nullcontext()
    )
    with gather:
        if dist.get_rank() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            if hasattr(task, "export"):
                task.export(module, out_dir)
            else:
                # ZeRO parameters are views into flat buffers: write standalone copies
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                export_folder.save(out_dir, state, experiment_config)
    dist.barrier()
    return out_dir
