"""Engine pieces that need no process group: batch arithmetic, LR schedule, DeepSpeed config,
RNG round trip, checkpoint bookkeeping, SLURM variable mapping, preemption signals (and one
subprocess: the process group's end at exit)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bimac.config import ConfigError, load_config
from bimac.engine import TrainConfig, derive_accumulation
from bimac.engine import checkpoint as ckpt
from bimac.engine.distributed import export_env, master_host
from bimac.engine.loop import build_deepspeed_config, total_optimizer_steps
from bimac.engine.preemption import PreemptionFlag, requeue_slurm_job
from bimac.engine.schedule import build_lr_scheduler, warmup_cosine_factor


def test_accumulation_is_derived_from_the_global_batch():
    assert derive_accumulation(1024, 64, 16) == 1
    assert derive_accumulation(32, 4, 2) == 4
    with pytest.raises(ValueError, match="global_batch_size=10 is not a multiple"):
        derive_accumulation(10, 4, 2)


def test_warmup_cosine_by_hand():
    # warm-up 4 steps: (s+1)/4; then a half cosine over the 10 remaining steps to min_ratio 0.1
    f = [warmup_cosine_factor(s, 4, 14, 0.1) for s in range(15)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert f[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_scheduler_drives_the_optimizer_lr():
    cfg = TrainConfig(lr=0.1, warmup_steps=2, min_lr_ratio=0.0)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_lr_scheduler(opt, cfg, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.05, 0.1, 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 4)), 0.05]
    assert lrs[:5] == pytest.approx(expected)
    onecycle = build_lr_scheduler(opt, TrainConfig(lr=0.1, schedule="onecycle"), 10)
    assert isinstance(onecycle, torch.optim.lr_scheduler.OneCycleLR)


def test_deepspeed_config_from_train_config_and_json():
    cfg = TrainConfig(global_batch_size=32, micro_batch_size=4, zero_stage=3, precision="bf16")
    ds = build_deepspeed_config(cfg, accumulation=4)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # json
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["checkpoint"] == {"load_universal": False}
    assert build_deepspeed_config(cfg, 4, load_universal=True)["checkpoint"]["load_universal"]
    wrong = TrainConfig(zero_stage=1, deepspeed_config="configs/deepspeed/zero2.json")
    with pytest.raises(ValueError, match="zero_stage=1 but"):
        build_deepspeed_config(wrong, 1)


def test_run_length_needs_steps_or_epoch_size():
    assert total_optimizer_steps(TrainConfig(max_steps=7)) == 7
    assert (
        total_optimizer_steps(TrainConfig(epochs=3, samples_per_epoch=100, global_batch_size=8))
        == 36
    )
    with pytest.raises(ValueError, match="max_steps or train.samples_per_epoch"):
        total_optimizer_steps(TrainConfig())


def test_train_config_is_strict(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("zero_stage: 2\nprecision: bf16\n")
    assert load_config(TrainConfig, path).precision == "bf16"
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(TrainConfig, path, ["zero_stage=4"])
    with pytest.raises(ConfigError, match="unknown config key lr_max"):
        load_config(TrainConfig, path, ["lr_max=1"])


def test_rng_state_round_trip(tmp_path):
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_latest_is_atomic_and_prune_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / ckpt.tag_for_step(step)).mkdir()
    ckpt._write_atomic(tmp_path / "latest", "step00000006")
    assert ckpt.latest_tag(tmp_path) == "step00000006"
    assert not (tmp_path / "latest.tmp").exists()
    ckpt.prune(tmp_path, keep_last=2)
    # step 8 is newer than `latest` (a partial save): never counted, never deleted
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step00000004",
        "step00000006",
        "step00000008",
    ]
    assert ckpt.latest_tag(tmp_path / "missing") is None


def _private_environ(monkeypatch, drop: tuple[str, ...]) -> None:
    """export_env writes os.environ: give it a copy so nothing leaks into later tests."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in drop})


def test_slurm_variables_map_to_torch_env(monkeypatch):
    _private_environ(
        monkeypatch,
        ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR"),
    )
    slurm = dict(
        SLURM_JOB_ID="4242",
        SLURM_PROCID="11",
        SLURM_NTASKS="16",
        SLURM_LOCALID="3",
        SLURM_NODEID="1",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu[07-08]",
    )
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    export_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
        "11",
        "16",
        "3",
    )
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["MASTER_PORT"] == "24242"
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node-a,node-b")
    assert master_host() == "node-a"


def test_local_single_process_env(monkeypatch):
    _private_environ(
        monkeypatch, ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_EXECUTOR")
    )
    export_env()
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"


def test_the_process_group_is_destroyed_at_exit_while_python_is_whole():
    """init_distributed registers destroy_process_group with atexit: a handler registered before
    it runs after it (last in, first out) and finds no process group. Left to interpreter
    teardown, gloo killed a rank with SIGABRT after its work was done (CI, 2026-12-06)."""
    code = (
        "import atexit, torch\n"
        "atexit.register(lambda: print('initialised at exit:', torch.distributed.is_initialized()))\n"
        "from bimac.engine.distributed import init_distributed\n"
        "print('rank, world:', init_distributed())\n"
    )  # fmt: skip
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_NTASKS", "SUBMITIT_EXECUTOR")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env |= {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank, world: (0, 1)" in proc.stdout
    assert "initialised at exit: False" in proc.stdout


def test_preemption_flag_catches_usr1_and_restores_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_requeue_calls_scontrol(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue_slurm_job() is False
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/called\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job() is True
    assert (tmp_path / "called").read_text().split() == ["requeue", "4242"]


def test_run_logger_writes_metrics_and_summary(tmp_path):
    from bimac.engine.run_log import RunLogger

    cfg = TrainConfig(output_dir=tmp_path, wandb="disabled", progress_bar=False)
    log = RunLogger(cfg, None, rank=0, total_steps=2, start_step=0, config_hash="abc")
    rec = {"step": 1, "loss": 2.5, "losses": {"mcl": 2.5}, "metrics": {}, "lr": 0.1,
           "grad_norm": 1.0, "skipped": {}}  # fmt: skip
    log.log_step(rec, samples_per_s=10.0)
    log.finish({"status": "completed", "step": 1})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{**rec, "samples_per_s": 10.0}]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["run_name"] == tmp_path.name
    assert len(summary["git_commit"]) in (40, len("unknown"))
    other_rank = RunLogger(TrainConfig(output_dir=tmp_path / "r1"), None, 1, 2, 0, "abc")
    other_rank.finish({"status": "completed"})
    assert not (tmp_path / "r1").exists()


def test_resumed_log_keeps_each_step_once(tmp_path):
    """A killed run logged steps 1-12 (the last line cut short); it resumes from step 10."""
    from bimac.engine.run_log import RunLogger

    lines = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 13)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 13, "lo')
    cfg = TrainConfig(output_dir=tmp_path, wandb="disabled", progress_bar=False)
    log = RunLogger(cfg, None, rank=0, total_steps=20, start_step=10, config_hash="abc")
    log.log_step({"step": 11, "loss": 0.5, "losses": {}}, samples_per_s=1.0)
    # line-buffered: on disk before any later save, with no close (a SIGKILL closes nothing)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 12))


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    import socket
    import subprocess

    from bimac.engine.run_lock import RunDirectoryLocked, RunLock

    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        path = tmp_path / "run.lock"
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        with pytest.raises(RunDirectoryLocked, match=f"in use by process {live.pid} on "):
            RunLock(tmp_path).acquire()
        path.write_text(json.dumps({"host": "elsewhere", "pid": dead.pid}))
        with pytest.raises(RunDirectoryLocked, match="on elsewhere .*delete .*run.lock"):
            RunLock(tmp_path).acquire()  # another host: cannot tell, refused
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
        lock = RunLock(tmp_path)
        lock.acquire()
        assert f"its process {dead.pid} on" in caplog.text
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirectoryLocked):  # and now we hold it
            RunLock(tmp_path).acquire()
        lock.release()
        assert not path.exists()
    finally:
        live.kill()


def test_watchdog_ends_a_stalled_wait_in_one_line():
    import subprocess
    import sys

    code = (
        "import time\nfrom bimac.engine.watchdog import Watchdog\n"
        "with Watchdog(1.0, rank=1) as w:\n"
        "    with w.waiting('short'): time.sleep(0.2)\n"
        "    with w.waiting('the all_reduce before step 7'): time.sleep(30)\n"
    )
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and time.time() - t0 < 20
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("rank 1: no progress for 1 s while the all_reduce before step 7")
    assert "raise train.watchdog_s" in proc.stderr


class _FailingEngine:
    """Writes part of a checkpoint, then fails as torch's C++ writer does on a full disk."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        os.makedirs(os.path.join(root, tag))
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 123\nmore")


def test_any_failed_save_is_one_line_and_removes_the_partial_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.dist, "get_rank", lambda: 0)
    (tmp_path / "step00000005").mkdir()
    (tmp_path / "latest").write_text("step00000005")
    with pytest.raises(ckpt.CheckpointSaveError) as err:
        ckpt.save_checkpoint(_FailingEngine(), tmp_path, 10, {}, keep_last=2)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"rank 0 could not write checkpoint {tmp_path / 'step00000010'}: ")
    assert "unexpected pos 123 (" in msg and "MiB free there" in msg
    assert "`latest` still names step00000005, which is intact" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000005"]
    # a save cut short by a kill is removed when the next run starts
    (tmp_path / "step00000010").mkdir()
    ckpt.remove_incomplete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000005"]


def test_a_checkpoint_that_cannot_be_converted_is_one_line_and_leaves_no_copy(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(ckpt.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ckpt.dist, "broadcast_object_list", lambda objects, src: None)
    tag = tmp_path / "step00000005"
    tag.mkdir()
    for rank in (0, 1):  # two ranks' optimizer shards, unreadable
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"not a pickle")
    assert ckpt.saved_world_size(tag) == 2
    with pytest.raises(ckpt.CheckpointConversionError) as err:
        ckpt.convert_to_universal(tag, tmp_path, world_size=1)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint {tag} was written by 2 ranks and this run has 1; ")
    assert "DeepSpeed's ds_to_universal could not convert it: " in msg
    assert msg.endswith("Resume it on 2 ranks, or start afresh with train.resume=none or another "
                        "train.output_dir")  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["step00000005"]  # no partial copy left
    # a conversion cut short by a kill is removed at the next start; a copy whose source was
    # pruned goes with it
    (tmp_path / "latest").write_text("step00000005")
    (tmp_path / "step00000005_universal.partial").mkdir()
    (tmp_path / "step00000001_universal").mkdir()
    (tmp_path / "step00000005_universal").mkdir()
    ckpt.remove_incomplete(tmp_path)
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step00000005", "step00000005_universal"
    ]  # fmt: skip


def test_deepspeed_still_needs_the_universal_checkpoint_patches():
    """``checkpoint._zero_dim_params_as_vectors``: ds_to_universal concatenates each ZeRO-1/2
    parameter's slices with ``torch.cat``, which fails on 0-dim tensors.
    ``checkpoint._unshare_step_counts``: ZeRO-3's universal load shares one ``step`` tensor
    between sub-groups. When a DeepSpeed release fixes either, this test fails: drop that patch
    and widen the pin in pyproject.toml."""
    import inspect

    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    with pytest.raises(RuntimeError, match="zero-dimensional tensor"):
        torch.cat([torch.zeros(())], dim=0)  # a 0-dim parameter's only slice
    assert "torch.cat(slices, dim=cat_dim)" in inspect.getsource(ds_to_universal.merge_tp_slices)
    assert "_group_per_tp_shapes(" in inspect.getsource(ds_to_universal.main)
    load = DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3
    assert "['step'] = state_step\n" in inspect.getsource(load)  # one tensor for every sub-group


def test_deepspeed_still_needs_the_scalar_broadcast_patch():
    """``loop._broadcast_handles_scalars`` replaces two DeepSpeed functions that view every
    parameter as bytes, which fails on 0-dim parameters. When a DeepSpeed release stops doing
    that, this test fails: drop the patch and widen the pin in pyproject.toml."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    with pytest.raises(RuntimeError, match="cannot be 0"):
        torch.zeros(()).view(torch.uint8)  # what both do to open_clip's 0-dim logit_scale
    for fn in (DeepSpeedEngine._broadcast_model, Init._zero_init_param):
        assert ".view(torch.uint8)" in inspect.getsource(fn), fn.__qualname__
