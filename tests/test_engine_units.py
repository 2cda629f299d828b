"""Engine pieces that need no process group: batch arithmetic, LR schedule, DeepSpeed config,
RNG round trip, checkpoint bookkeeping, SLURM variable mapping, preemption signals."""

from __future__ import annotations

import json
import math
import os
import random
import signal

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
