"""The one training loop: any task (pretraining, every fine-tuning stage) on DeepSpeed ZeRO.

Per optimizer step each rank draws ``accumulation`` micro-batches, the task returns its weighted
loss terms, the loop sums them and calls ``engine.backward`` once per micro-batch on that sum
(DeepSpeed ZeRO-1/2 silently mis-accumulates when backward runs once per term).

Global-batch losses: a task with ``step_context`` (pretraining) first runs over all of the step's
micro-batches itself (a feature cache, GradCache: a forward without gradient, features gathered
across ranks, the global loss and its gradient with respect to the features computed once), then
each micro-batch is re-forwarded with gradient and ``losses(model, batch, context)`` returns its
*contribution* to the global loss: contrastive negatives are the whole global batch
(``micro_batch_size x accumulation x world_size``) and every term is normalised over it, so a
step's loss and gradient do not depend on how the global batch is split into ranks and
micro-batches. The loop undoes DeepSpeed's 1/accumulation and 1/world averaging for these tasks,
sums the contributions over micro-batches and ranks, and logs the global terms. Other tasks keep
per-micro-batch losses, averaged over micro-batches and ranks.

Data order: a task's loader gives each rank its slice of every global step (the shard loader's
virtual streams, ``bimac.data.loader``), so step k trains on the same samples whatever the world
size. A rank whose loader runs out ends the epoch on every rank together (an all-reduce before
each step; the loader counts what is left as ``epoch_tail``), and micro-batches smaller than
``micro_batch_size`` are dropped and counted, so every step has the same shapes on every rank.

Non-finite values: a NaN/inf loss makes the gradients non-finite, and every ZeRO stage then
skips the optimizer step (DeepSpeed's overflow check, agreed across ranks). The loop counts the
skip by reason, logs it, and stops after ``max_consecutive_nonfinite`` skips in a row.

Another world size: a checkpoint written by another number of ranks is converted once with
DeepSpeed's universal checkpoint (``ds_to_universal``, into ``checkpoints/<tag>_universal``) and
loaded with ``checkpoint.load_universal``: weights, optimizer moments, step and schedule continue.

Exact resume: the run state (:class:`RunState`) is in every checkpoint, the loader resumes at
its cursor (every rank's merged: another world size resumes it too) and keys per-sample draws by
the sample, and each micro-batch's random draws come from generators seeded by (seed, step,
rank, micro-batch). Only one run may hold ``output_dir`` (``run.lock``), and a wait on the loader
or on other ranks longer than ``train.watchdog_s`` ends the run (:mod:`bimac.engine.watchdog`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from bimac.config import UserError, config_hash
from bimac.data.loader import stable_seed
from bimac.engine import checkpoint as ckpt
from bimac.engine.config import TrainConfig, derive_accumulation
from bimac.engine.distributed import init_distributed
from bimac.engine.preemption import PreemptionFlag, requeue_slurm_job
from bimac.engine.run_lock import RunDirectoryLocked, RunLock
from bimac.engine.run_log import RunLogger
from bimac.engine.schedule import build_lr_scheduler
from bimac.engine.state import RunState
from bimac.engine.watchdog import Watchdog

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


class TrainLoader(Protocol):
    """One rank's training batches for one epoch (docs/contracts.md, "Task"). Optional:
    ``drop_rest(unused=micro_batches)``, called when the epoch ends, to count what is left."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[int, int]:
        """The cursor after the last global step handed out in full: this rank's part of what
        ``build_train_loader(..., cursor=)`` resumes from (every rank's parts merged)."""
        ...


class Task(Protocol):
    """What a task gives the engine (docs/contracts.md). Optional extras: ``export(model, dir)``,
    ``skipped_counts() -> dict[str, int]`` (the loader's skip counters by reason),
    ``summary() -> dict`` (merged into ``summary.json``), ``state_dict()`` /
    ``load_state_dict(d)`` (the task's own counters, saved in every checkpoint) and
    ``step_context(model, micro_batches, seed_micro_batch) -> StepContext`` (global-batch losses:
    then ``losses(model, batch, context.micro[i])`` returns micro-batch i's contributions)."""

    def build_model(self) -> nn.Module: ...

    def build_train_loader(
        self, rank: int, world_size: int, epoch: int, cursor: dict[int, int] | None
    ) -> TrainLoader: ...

    def losses(
        self, model: nn.Module, batch: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...


@dataclass
class StepContext:
    """What a task's pass over all of a step's micro-batches leaves for their ``losses`` calls.

    ``micro[i]``: the task's object for micro-batch i (e.g. its rows of the cached feature
    gradients), passed to ``losses(model, batch, micro[i])``. ``metrics``: step-level metrics
    that are already global (the same on every rank), logged as they are.
    """

    micro: list[Any]
    metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteTrainingError(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    status: str  # "completed" | "preempted"
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    export_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def build_deepspeed_config(
    cfg: TrainConfig, accumulation: int, load_universal: bool = False
) -> dict[str, Any]:
    """DeepSpeed config: ``configs/deepspeed/zero{stage}.json`` (or ``cfg.deepspeed_config``)
    for the ZeRO knobs, with batch sizes, precision and clipping from ``cfg``; ``load_universal``
    when the checkpoint to resume is a universal one (DeepSpeed reads it at ``initialize``)."""
    path = Path(cfg.deepspeed_config or f"configs/deepspeed/zero{cfg.zero_stage}.json")
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    base: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if cfg.deepspeed_config is not None and not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config: {cfg.deepspeed_config} does not exist")
    zero = base.get("zero_optimization", {})
    if zero.get("stage", cfg.zero_stage) != cfg.zero_stage:
        raise ValueError(
            f"train.zero_stage={cfg.zero_stage} but {path} sets stage {zero['stage']}: make them agree"
        )
    checkpoint = {**base.get("checkpoint", {}), "load_universal": load_universal}
    return {
        **base,
        "checkpoint": checkpoint,
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {**zero, "stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {**base.get("fp16", {}), "enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": base.get("steps_per_print", 10**9),
    }


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam(W); weight decay only on matrices (not on biases, norms, logit scale)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


@contextlib.contextmanager
def _broadcast_handles_scalars() -> Iterator[None]:
    """DeepSpeed 0.19 (pinned in pyproject.toml; ``tests/test_engine_units.py`` checks that the
    patch is still needed) broadcasts parameters at set-up as ``p.data.view(torch.uint8)`` (the
    engine's ``_broadcast_model``; ZeRO-3's ``Init._zero_init_param``), which raises on 0-dim
    parameters such as open_clip's ``logit_scale``. While ``initialize`` runs, both broadcast
    through a flat view instead: the same bytes, 0-dim included. We use no model, sequence or
    expert parallelism, so the data-parallel group is the world."""
    from deepspeed import comm
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus

    def flat_bytes(p: torch.Tensor) -> torch.Tensor:
        return p.data.view(-1).view(torch.uint8)

    def broadcast_model(self: Any) -> None:
        for p in self.module.parameters():
            if getattr(p, "ds_status", ZeroParamStatus.AVAILABLE) is ZeroParamStatus.AVAILABLE:
                comm.broadcast(flat_bytes(p), 0)

    def zero_init_param(self: Any, param: torch.Tensor) -> None:
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        comm.broadcast(flat_bytes(param), comm.get_global_rank(group, 0), group)
        param.partition()

    originals = DeepSpeedEngine._broadcast_model, Init._zero_init_param
    DeepSpeedEngine._broadcast_model, Init._zero_init_param = broadcast_model, zero_init_param
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model, Init._zero_init_param = originals


def total_optimizer_steps(cfg: TrainConfig) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.samples_per_epoch > 0:
        return cfg.epochs * (cfg.samples_per_epoch // cfg.global_batch_size)
    raise ValueError(
        "set train.max_steps or train.samples_per_epoch: the schedule needs the run's length "
        "and a streaming loader does not know it"
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (NumPy takes 32 bits)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Samples in a micro-batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise ValueError("cannot count the samples of a batch without tensors")


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}


def _sum_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: sum(d[k] for d in dicts if k in d) for k in keys}


def _resolve_resume(cfg: TrainConfig, ckpt_root: Path) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        tag = ckpt.latest_tag(ckpt_root)
        return ckpt_root / tag if tag else None
    path = Path(cfg.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={cfg.resume!r}: no such checkpoint directory")
    return path


def _gather_skip_counts(task: Any) -> dict[str, int]:
    if not hasattr(task, "skipped_counts"):
        return {}
    gathered: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, dict(task.skipped_counts()))
    total: Counter[str] = Counter()
    for counts in gathered:
        total.update(counts)
    return dict(total)


@contextlib.contextmanager
def _run_directory_lock(out: Path, rank: int) -> Iterator[None]:
    """Rank 0 takes ``out/run.lock``; every rank raises the same one-line refusal."""
    lock, refusal = RunLock(out), [None]
    if rank == 0:
        try:
            lock.acquire()
        except RunDirectoryLocked as err:
            refusal = [str(err)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise RunDirectoryLocked(refusal[0])
    try:
        yield
    finally:
        lock.release()


def _build_engine(
    task: Task, cfg: TrainConfig, accumulation: int, total_steps: int, load_universal: bool
) -> Any:
    import deepspeed

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = task.build_model()
    if cfg.activation_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(
                f"train.activation_checkpointing: {type(model).__name__} has no "
                "set_grad_checkpointing(enable) method"
            )
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps)
    with _broadcast_handles_scalars():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=build_deepspeed_config(cfg, accumulation, load_universal),
        )
    return engine, scheduler


class _Trainer:
    """One run of the loop: the engine, the run state and the named parts of a step."""

    def __init__(self, task: Task, cfg: TrainConfig, experiment_config: Any, rank: int, world: int):
        self.task, self.cfg, self.rank, self.world = task, cfg, rank, world
        self.accumulation = derive_accumulation(cfg.global_batch_size, cfg.micro_batch_size, world)
        self.total_steps = total_optimizer_steps(cfg)
        self.chash = config_hash(experiment_config if experiment_config is not None else cfg)
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.experiment_config = experiment_config
        self.steps_per_epoch_cap = cfg.samples_per_epoch // cfg.global_batch_size
        self.global_losses = hasattr(task, "step_context")
        self.state = RunState()
        self.history: list[dict[str, Any]] = []
        self.last_saved: Path | None = None
        self.resume_dir: Path | None = None
        self.universal_dir: Path | None = None  # resume_dir converted for this world size

    def plan_resume(self) -> None:
        """Before the engine is built (its config says whether it loads a universal checkpoint):
        find the checkpoint to resume and, when another number of ranks wrote it, convert it."""
        if self.rank == 0:
            ckpt.remove_incomplete(self.ckpt_root)
        dist.barrier()
        self.resume_dir = _resolve_resume(self.cfg, self.ckpt_root)
        if self.resume_dir is None or ckpt.saved_world_size(self.resume_dir) == self.world:
            return
        where = f"converting checkpoint {self.resume_dir} to a universal checkpoint on rank 0"
        with self.watchdog.waiting(where):
            self.universal_dir = ckpt.convert_to_universal(
                self.resume_dir, self.ckpt_root, self.world
            )

    def resume(self) -> None:
        """Restore the run state, weights, optimizer and schedule from the checkpoint to resume."""
        resume_dir = self.resume_dir
        if resume_dir is None:
            return
        saved = ckpt.load_checkpoint(self.engine, resume_dir, self.universal_dir)
        if saved["config_hash"] != self.chash:
            logger.warning("config changed since %s was saved (hash differs)", resume_dir)
        saved_total = getattr(self.scheduler, "total_steps", None)  # one-cycle keeps its length
        if saved_total is not None and saved_total != max(2, self.total_steps):
            raise ValueError(
                f"checkpoint {resume_dir} holds a one-cycle schedule of {saved_total} steps but "
                f"train.max_steps gives {self.total_steps}: resume with the same length, or start "
                "fresh with train.resume=none or a new train.output_dir"
            )
        self.state = RunState.restore(saved)
        if hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(self.state.task_state)
        self.last_saved = resume_dir

    def draw_micro_batches(self, loader: TrainLoader, batches: Iterator[Any]) -> list[Any] | None:
        """This rank's micro-batches for the next step, or None when any rank ran out or the
        epoch's step cap is reached (the epoch ends on every rank together; the loader counts
        what is left). Partial micro-batches are dropped and counted: ranks would disagree on the
        batch shape (cross-rank gathers abort or hang)."""
        cfg, st = self.cfg, self.state
        micro: list[Any] = []
        dropped = 0
        capped = self.steps_per_epoch_cap and st.epoch_steps >= self.steps_per_epoch_cap
        with self.watchdog.waiting(f"waiting for the data loader before step {st.step + 1}"):
            while len(micro) < self.accumulation and not capped:
                nxt = next(batches, None)
                if nxt is None:
                    break
                if batch_size(nxt) < cfg.micro_batch_size:
                    dropped += batch_size(nxt)
                    continue
                micro.append(nxt)
        short_dropped = torch.tensor([float(len(micro) < self.accumulation), float(dropped)])
        where = f"the all_reduce agreeing on the end of the epoch before step {st.step + 1}"
        with self.watchdog.waiting(where):
            dist.all_reduce(short_dropped)
        if short_dropped[1]:
            st.skipped["partial_batch_samples"] += int(short_dropped[1])
        if short_dropped[0]:
            if hasattr(loader, "drop_rest") and not capped:  # a cap is no tail: read no further
                loader.drop_rest(unused=micro)
            return None
        st.epoch_steps += 1
        st.data_cursor = loader.state_dict()
        return micro

    def forward_backward(self, micro: list[Any]) -> tuple[dict, dict, dict]:
        """Backward once per micro-batch on the weighted sum of its terms (DeepSpeed ZeRO-1/2
        mis-accumulates when backward runs once per term). Each micro-batch's random draws
        (dropout, masks, sampling) come from generators seeded by (seed, step, rank, micro-batch):
        the same after a resume as in an uninterrupted run, and the same in a task's first pass
        over the micro-batch (``step_context``) as in its re-forward. Returns this rank's loss
        terms and metrics (sums of contributions to the global ones for a task with
        ``step_context``, else means over the micro-batches) and the step-level global metrics."""
        engine, terms_list, metrics_list = self.engine, [], []
        step = self.state.step + 1
        micro = [_to_device(mb, engine.device) for mb in micro]

        def seed_micro_batch(i: int) -> None:
            seed_everything(stable_seed(self.cfg.seed, step, self.rank, i))

        context = None
        if self.global_losses:
            context = self.task.step_context(engine, micro, seed_micro_batch)
        # contributions to a global sum: undo DeepSpeed's 1/accumulation (engine.backward) and
        # its 1/world (the gradient all-reduce averages), so the step's gradient is the global one
        backward_scale = self.world * len(micro) if context is not None else 1.0
        for i, mb in enumerate(micro):
            seed_micro_batch(i)
            if context is None:
                terms, metrics = self.task.losses(engine, mb)
            else:
                terms, metrics = self.task.losses(engine, mb, context.micro[i])
            loss = torch.stack([t.float() for t in terms.values()]).sum()
            engine.backward(loss * backward_scale)
            engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
            terms_list.append({k: v.detach().float().item() for k, v in terms.items()})
            metrics_list.append(metrics)
        if context is None:
            return _mean_dicts(terms_list), _mean_dicts(metrics_list), {}
        return _sum_dicts(terms_list), _sum_dicts(metrics_list), context.metrics

    def account_step(
        self, micro: list[Any], results: tuple[dict, dict, dict], applied: bool, preempt: bool
    ) -> tuple[dict[str, Any], bool]:
        """Gather every rank's losses, count samples and skips; the step's record, and whether
        any rank asked to be preempted. Global-batch losses: the ranks' contributions are summed
        (the global terms, the same number on every rank); others: averaged over ranks."""
        cfg, st = self.cfg, self.state
        step_samples = sum(batch_size(mb) for mb in micro)
        st.step += 1
        gathered: list[Any] = [None] * self.world
        # train.log_sample_ids: the step's sample keys ride along (global order: rank-major, then
        # micro-batch) for sample_ids.jsonl
        ids = [
            i for mb in micro if isinstance(mb, dict) and cfg.log_sample_ids
            for i in mb.get("sample_id", [])
        ]  # fmt: skip
        local = (*results, preempt, step_samples, ids)
        with self.watchdog.waiting(f"the all_gather of step {st.step}'s results"):
            dist.all_gather_object(gathered, local)
        if cfg.log_sample_ids:
            self.run_log.log_sample_ids(st.step, [i for g in gathered for i in g[5]])
        st.total_samples += sum(g[4] for g in gathered)
        combine = _sum_dicts if self.global_losses else _mean_dicts
        terms_step = combine([g[0] for g in gathered])
        # the step-level metrics are global already (the same on every rank): rank 0's
        step_metrics = {**combine([g[1] for g in gathered]), **gathered[0][2]}
        bad_terms = [k for k, v in terms_step.items() if not math.isfinite(v)]
        if not applied:
            if bad_terms:
                reason = "nonfinite_loss"
            else:
                reason = "fp16_overflow" if cfg.precision == "fp16" else "nonfinite_grad"
            st.skipped[reason] += 1
            st.consecutive_nonfinite += reason != "fp16_overflow"
            logger.warning("step %d skipped (%s): loss terms %s", st.step, reason, terms_step)
        else:
            st.consecutive_nonfinite = 0
            if bad_terms:  # the NaN never reached the gradients: applied, said loudly
                st.skipped["nonfinite_loss_applied"] += 1
                logger.error("step %d: non-finite %s, finite gradients", st.step, bad_terms)
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": st.step,
            "epoch": st.epoch,
            "loss": sum(terms_step.values()),
            "losses": terms_step,
            "metrics": step_metrics,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "applied": applied,
            "samples": st.total_samples,
            "skipped": dict(st.skipped),
        }
        if st.step % cfg.log_every == 0:
            data_skips = _gather_skip_counts(self.task)
            record["skipped"].update({f"data/{k}": v for k, v in data_skips.items()})
        return record, any(g[3] for g in gathered)

    def check_divergence(self, record: dict[str, Any]) -> None:
        st = self.state
        if st.consecutive_nonfinite < self.cfg.max_consecutive_nonfinite:
            return
        bad = [k for k, v in record["losses"].items() if not math.isfinite(v)]
        msg = (
            f"stopping at step {st.step}: {st.consecutive_nonfinite} consecutive steps skipped "
            f"with a non-finite {', '.join(bad) if bad else 'gradient norm'} (loss terms: "
            f"{record['losses']}); check that objective's inputs, the learning rate and the "
            "precision"
        )
        self.run_log.finish({"status": "diverged", "step": st.step, "message": msg})
        raise NonFiniteTrainingError(msg)

    def save(self) -> None:
        if hasattr(self.task, "state_dict"):
            self.state.task_state = self.task.state_dict()
        client_state = self.state.client_state(self.world, self.chash)
        with self.watchdog.waiting(f"saving checkpoint {ckpt.tag_for_step(self.state.step)}"):
            self.last_saved = ckpt.save_checkpoint(
                self.engine, self.ckpt_root, self.state.step, client_state, self.cfg.keep_last
            )

    def run(self) -> str:
        """The loop over epochs and steps; returns "completed" or "preempted"."""
        cfg, st = self.cfg, self.state
        t_start, samples_at_start = time.time(), st.total_samples
        self.engine.train()
        with PreemptionFlag() as preempt:
            while st.step < self.total_steps and st.epoch < cfg.epochs:
                with self.watchdog.waiting(f"building the data loader of epoch {st.epoch}"):
                    loader = self.task.build_train_loader(
                        self.rank, self.world, st.epoch, st.data_cursor or None
                    )
                    batches = iter(loader)
                first_step = st.step
                while st.step < self.total_steps:
                    micro = self.draw_micro_batches(loader, batches)
                    if micro is None:
                        break
                    skipped_before = self.engine.skipped_steps
                    with self.watchdog.waiting(f"forward/backward of step {st.step + 1}"):
                        results = self.forward_backward(micro)
                    applied = self.engine.skipped_steps == skipped_before
                    record, preempted = self.account_step(
                        micro, results, applied, preempt.requested
                    )
                    self.history.append(record)
                    rate = (st.total_samples - samples_at_start) / max(time.time() - t_start, 1e-9)
                    self.run_log.log_step(record, rate)
                    self.check_divergence(record)
                    if preempted:  # preemption on any rank: save and leave
                        self.save()
                        return "preempted"
                    if cfg.save_every_steps and st.step % cfg.save_every_steps == 0:
                        self.save()
                else:
                    break  # max_steps reached inside the epoch
                if st.step == first_step and st.epoch_steps == 0:
                    raise RuntimeError(
                        f"epoch {st.epoch} gave no optimizer step: each rank needs "
                        f"{self.accumulation} micro-batches of {cfg.micro_batch_size}; the "
                        f"loader's skipped samples by reason: {_gather_skip_counts(self.task)}"
                    )
                st.epoch, st.epoch_steps, st.data_cursor = st.epoch + 1, 0, {}
        return "completed"

    def summary(self, status: str, export_dir: Path | None) -> dict[str, Any]:
        st, tail = self.state, self.history[-min(len(self.history), 10) :]
        summary = {
            "status": status,
            "step": st.step,
            "total_steps": self.total_steps,
            "epoch": st.epoch,
            "samples": st.total_samples,
            "world_size": self.world,
            "zero_stage": self.cfg.zero_stage,
            "precision": self.cfg.precision,
            "config_hash": self.chash,
            "final_loss": sum(r["loss"] for r in tail) / len(tail) if tail else None,
            "final_losses": _mean_dicts([r["losses"] for r in tail]),
            "final_metrics": _mean_dicts([r["metrics"] for r in tail]),
            "skipped": dict(st.skipped),
            "data_skipped": _gather_skip_counts(self.task),  # the loader's skips by reason
            "checkpoint": str(self.last_saved) if self.last_saved else None,
            "export": str(export_dir) if export_dir else None,
        }
        if hasattr(self.task, "summary"):
            summary.update(self.task.summary())
        return summary


def train(task: Task, cfg: TrainConfig, experiment_config: Any = None) -> TrainResult:
    """Run (or resume) training of ``task`` under DeepSpeed; see the module docstring.

    Collective: every rank calls it. Returns on completion or after a preemption signal (the
    checkpoint is saved and, under SLURM, the job requeued); raises
    :class:`NonFiniteTrainingError` when the run diverges, :class:`RunDirectoryLocked` when
    another live run holds ``cfg.output_dir``.
    """
    rank, world = init_distributed()
    t = _Trainer(task, cfg, experiment_config, rank, world)
    with _run_directory_lock(t.out, rank), Watchdog(cfg.watchdog_s, rank) as t.watchdog:
        t.plan_resume()
        t.engine, t.scheduler = _build_engine(
            task, cfg, t.accumulation, t.total_steps, load_universal=t.universal_dir is not None
        )
        t.resume()
        t.run_log = RunLogger(cfg, experiment_config, rank, t.total_steps, t.state.step, t.chash)
        status = t.run()
        export_dir = None
        if status == "completed":
            if t.last_saved is None or t.last_saved.name != ckpt.tag_for_step(t.state.step):
                t.save()
            if cfg.export_at_end:
                export_dir = ckpt.export_model(t.engine, t.out / "export", experiment_config, task)
        summary = t.summary(status, export_dir)
        t.run_log.finish(summary)
    if status == "preempted" and rank == 0 and cfg.requeue_on_preemption:
        requeue_slurm_job()
    if hasattr(t.engine, "destroy"):
        t.engine.destroy()
    return TrainResult(status, t.state.step, t.history, t.last_saved, export_dir, summary)
