"""Checkpoints: DeepSpeed's collective ``save_checkpoint`` plus what it does not do for us.

Layout under ``<output_dir>/checkpoints``::

    step00000040/            one DeepSpeed tag (model, optimizer shards, client_state on rank 0)
        rng/rank{r}.pt       per-rank RNG states (client_state is written by rank 0 only)
    step00000040_universal/  that tag converted by DeepSpeed's ``ds_to_universal``, written when a
                             run with another number of ranks resumes from it (kept as long as
                             its source is kept; ``.partial`` while being written)
    latest                   the tag of the newest *complete* checkpoint

DeepSpeed writes ``latest`` itself while saving; we pass ``save_latest=False`` and replace
``latest`` atomically after every rank has finished, so a save killed midway leaves the previous
checkpoint as ``latest``. Conversion never touches ``latest``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist

from bimac.config import UserError

logger = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step\d{8}$")
UNIVERSAL_SUFFIX = "_universal"
PARTIAL_SUFFIX = ".partial"
# one optimizer-state file per data-parallel rank under every ZeRO stage (``bf16_`` for bf16)
OPTIM_SHARD_GLOB = "*zero_pp_rank_*_mp_rank_*_optim_states.pt"


class CheckpointSaveError(UserError, RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); ``latest`` is unchanged."""


class CheckpointConversionError(UserError, RuntimeError):
    """A checkpoint of another world size could not be read or converted to a universal one."""


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
        raise CheckpointSaveError(
            f"rank {rank} could not write checkpoint {ckpt_root / tag}: {_first_line(err)} "
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
    """Delete complete checkpoints older than the newest ``keep_last`` (never ``latest``), and
    universal conversions whose source checkpoint is no longer here."""
    latest = latest_tag(ckpt_root)
    if latest is None or keep_last <= 0:
        return
    tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    older = [t for t in tags if t <= latest]
    for tag in older[:-keep_last]:
        shutil.rmtree(ckpt_root / tag, ignore_errors=True)
    for p in ckpt_root.glob(f"step*{UNIVERSAL_SUFFIX}"):
        if not (ckpt_root / p.name.removesuffix(UNIVERSAL_SUFFIX)).is_dir():
            shutil.rmtree(p, ignore_errors=True)


def remove_incomplete(ckpt_root: Path) -> None:
    """Delete checkpoint directories newer than ``latest`` and unfinished universal conversions:
    saves that a kill or a failure cut short (their files would otherwise fill the disk, and
    ``prune`` never looks past ``latest``)."""
    if not Path(ckpt_root).is_dir():
        return
    latest = latest_tag(ckpt_root) or ""
    for p in sorted(Path(ckpt_root).iterdir()):
        newer = TAG_RE.match(p.name) and p.name > latest
        if p.is_dir() and (newer or p.name.endswith(UNIVERSAL_SUFFIX + PARTIAL_SUFFIX)):
            logger.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def saved_world_size(tag_dir: Path) -> int:
    """The number of ranks that wrote ``tag_dir``, from DeepSpeed's files alone (read before the
    engine is built: loading another world size's checkpoint is decided in its config)."""
    shards = list(Path(tag_dir).glob(OPTIM_SHARD_GLOB))
    if not shards:
        raise CheckpointConversionError(
            f"checkpoint {tag_dir} holds no DeepSpeed optimizer shards ({OPTIM_SHARD_GLOB}): it "
            "is not a checkpoint this engine wrote, or it is incomplete; point train.resume at a "
            "checkpoints/stepNNNNNNNN directory of a run, or start afresh with train.resume=none"
        )
    return len(shards)


@contextlib.contextmanager
def _zero_dim_params_as_vectors() -> Iterator[None]:
    """``ds_to_universal`` (DeepSpeed 0.19, pinned in pyproject.toml) reshapes each merged
    ZeRO-1/2 fragment to its saved shape and then ``torch.cat``s the tensor-parallel slices, which
    raises on 0-dim parameters (open_clip's ``logit_scale``). While it runs, the shapes it reads
    from the checkpoint give 0-dim parameters shape (1,): the universal files hold 1-element
    vectors, which DeepSpeed's universal loader copies into the 0-dim parameter element by
    element. The model's own parameter shapes are untouched (ZeRO-3 takes another path)."""
    from deepspeed.checkpoint import ds_to_universal as converter

    original = converter._group_per_tp_shapes

    def group_per_tp_shapes(*args: Any) -> dict[str, list[Any]]:
        return {
            name: [shape if len(shape) else torch.Size([1]) for shape in per_tp]
            for name, per_tp in original(*args).items()
        }

    converter._group_per_tp_shapes = group_per_tp_shapes
    try:
        yield
    finally:
        converter._group_per_tp_shapes = original


def convert_universal(tag_dir: Path, out_dir: Path) -> bool:
    """Convert ``tag_dir`` with DeepSpeed's ``ds_to_universal`` into ``out_dir`` (one process);
    False when ``out_dir`` already holds a complete conversion of the same source. Written under
    ``out_dir.partial`` and renamed at the end: ``out_dir`` exists only when complete."""
    from deepspeed.checkpoint import ds_to_universal as converter

    tag_dir, out_dir = Path(tag_dir).resolve(), Path(out_dir)
    marker = out_dir / "converted_from"
    if marker.is_file() and marker.read_text() == str(tag_dir):
        return False
    staging = out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    # one process: worker pools would fork this process and its initialised process group;
    # inject_missing_state: our ZeRO-1/2 saves carry no `universal_checkpoint_info` of their own
    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(staging / out_dir.name),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=True,
    )  # fmt: skip
    # quiet: the converter prints each stage and draws progress bars (stderr stays for errors)
    try:
        with (
            _zero_dim_params_as_vectors(),
            mock.patch.object(converter, "tqdm", SimpleNamespace(tqdm=iter)),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            converter.main(args)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / out_dir.name / marker.name).write_text(str(tag_dir))
    os.replace(staging / out_dir.name, out_dir)
    shutil.rmtree(staging)  # also DeepSpeed's `latest_universal`: our `latest` is what counts
    return True


def convert_to_universal(tag_dir: Path, ckpt_root: Path, world_size: int) -> Path:
    """Collective: rank 0 converts ``tag_dir`` (written by another number of ranks) into
    ``<ckpt_root>/<tag>_universal`` once, the other ranks wait; returns that directory. A failure
    is the same one-line :class:`CheckpointConversionError` on every rank."""
    tag_dir = Path(tag_dir)
    out_dir = Path(ckpt_root) / f"{tag_dir.name}{UNIVERSAL_SUFFIX}"
    saved = saved_world_size(tag_dir)
    failure: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            converted = convert_universal(tag_dir, out_dir)
            logger.info(
                "%s checkpoint %s written by %d ranks as a universal checkpoint %s for %d ranks",
                "converted" if converted else "reusing the conversion of", tag_dir, saved,
                out_dir, world_size,
            )  # fmt: skip
        except Exception as err:
            failure = [_first_line(err)]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise CheckpointConversionError(
            f"checkpoint {tag_dir} was written by {saved} ranks and this run has {world_size}; "
            f"DeepSpeed's ds_to_universal could not convert it: {failure[0]}. Resume it on "
            f"{saved} ranks, or start afresh with train.resume=none or another train.output_dir"
        )
    return out_dir


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_checkpoint(
    engine: Any, tag_dir: Path, universal_dir: Path | None = None
) -> dict[str, Any]:
    """Load model/optimizer/scheduler from ``tag_dir`` and this rank's RNG; returns client_state.

    With ``universal_dir`` (``tag_dir`` converted for another world size; the engine was built
    with ``checkpoint.load_universal``) the state comes from there and no RNG state is restored:
    the per-rank RNG files of another world size map to no rank of this one, and the loop reseeds
    every micro-batch from (seed, step, rank, micro-batch) anyway, so the state each rank keeps
    from its seeded start is as good as any.
    """
    tag_dir = Path(tag_dir)
    source = Path(universal_dir) if universal_dir is not None else tag_dir
    path, client_state = engine.load_checkpoint(
        str(source.parent),
        tag=source.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {source}")
    if universal_dir is None:
        rng_file = tag_dir / "rng" / f"rank{dist.get_rank()}.pt"
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        _unshare_step_counts(engine)
    logger.info("resumed from %s (step %s)", source, client_state.get("step"))
    return client_state


def _unshare_step_counts(engine: Any) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load (``load_hp_checkpoint_state_from_checkpoint_dir_
    stage3``) hands every sub-group's optimizer state the same ``step`` tensor, and torch's Adam
    increments it in place once per sub-group: Adam's step count (its bias correction) would
    advance by the number of sub-groups per step (measured: 3 -> 5 -> 7). Give each its own."""
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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
