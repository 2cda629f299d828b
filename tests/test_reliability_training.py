"""Fault injection into training on 2 CPU ranks (gloo): a rank killed mid-step, uneven data,
a NaN gradient, a full disk and a signal during a save, a real pretraining run over shards with
1 % of every sample fault, and no secret in anything a run writes.

Two launches only (DeepSpeed's import costs ~10-30 s per process): ``dies`` (rank 1 SIGKILLs
itself in step 6) and ``after`` (resume from that, then every other scenario in the same
processes). Already shown in ``tests/test_engine_distributed.py`` and not repeated: NaN loss
skipped/counted/stopping, exact resume, SIGUSR1 preemption, a save killed midway.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine_distributed import N_SAMPLES, ToyTask, _cfg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-reliability-0123456789abcdef"  # planted in WANDB_API_KEY / HF_TOKEN
KILL_CALL = 11  # global 8 = micro 2 x accumulation 2 x 2 ranks: call 11 opens step 6
ENOSPC_MSG = "could not write checkpoint"


class RecordingTask(ToyTask):
    """ToyTask that appends each micro-batch's sample ids to ``log`` (survives a SIGKILL), can
    die at a call, and can make the gradient (not the loss) non-finite at some calls."""

    def __init__(self, log: Path | None = None, die_call: int = -1, nan_grad_calls=(), **kw):
        super().__init__(micro=2, **kw)
        self.log, self.die_call, self.nan_grad_calls = log, die_call, set(nan_grad_calls)

    def losses(self, model, batch):
        terms, metrics = super().losses(model, batch)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(batch["idx"].tolist()) + "\n")
        if self.calls == self.die_call:
            Path(str(self.log) + ".killed_at").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        if self.calls in self.nan_grad_calls:
            terms["mse"].register_hook(lambda g: g * float("nan"))  # the loss stays finite
        return terms, metrics


class FirstBatches:
    """A loader that ends after ``n`` micro-batches (its cursor is the wrapped loader's)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(self.loader, self.n)

    def state_dict(self):
        return self.loader.state_dict()


class UnevenTask(RecordingTask):
    """Rank 1's data ends early: it has 14 samples (7 micro-batches), rank 0 has 48."""

    def build_train_loader(self, rank, world_size, epoch, cursor):
        loader = super().build_train_loader(rank, world_size, epoch, cursor)
        return FirstBatches(loader, 7) if rank == 1 else loader


def scenario_dies(out: Path) -> dict:
    from bimac.engine import train
    from bimac.engine.distributed import init_distributed

    rank, _ = init_distributed()
    task = RecordingTask(out / f"seen_dies_rank{rank}.jsonl", die_call=KILL_CALL if rank else -1)
    train(task, _cfg(out / "dies", save_every_steps=2, max_steps=8))
    return {"error": "rank 1 did not die"}


def scenario_full_one_rank(out: Path) -> dict:
    """Only rank 0's disk fills up at the step-4 save; rank 1 is left inside DeepSpeed's save."""
    from bimac.engine import train
    from bimac.engine.distributed import init_distributed

    rank, _ = init_distributed()
    task = RecordingTask()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if rank == 0 and task.calls >= 8:
            Path(out / "full_at").write_text(str(time.time()))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    torch.save = full_disk
    train(task, _cfg(out / "full1", save_every_steps=2, max_steps=6))
    return {"error": "the save did not fail"}


def _raises(fn) -> str:
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def scenario_after(out: Path, shards: str) -> dict:
    from bimac.engine import train
    from bimac.engine.checkpoint import latest_tag
    from bimac.engine.distributed import init_distributed

    rank, _ = init_distributed()
    res = {}
    # restart after the death: resume=auto finds `latest` and finishes the 8 steps
    r = train(RecordingTask(out / f"seen_after_rank{rank}.jsonl"), _cfg(out / "dies",
              save_every_steps=2, max_steps=8))  # fmt: skip
    res["resume"] = {"first_step": r.history[0]["step"], "step": r.step, "status": r.status}

    # uneven data in exact mode: the epoch ends on both ranks at rank 1's last full step
    uneven = UnevenTask()
    r = train(uneven, _cfg(out / "uneven", epochs=1, max_steps=100))
    res["uneven"] = {"step": r.step, "epoch": r.summary["epoch"], "calls": uneven.calls}

    # a non-finite gradient on rank 1 only (finite loss): skipped on both ranks, counted
    r = train(RecordingTask(nan_grad_calls=(3, 4) if rank else ()), _cfg(out / "g1", max_steps=4))
    res["nan_grad_once"] = {"applied": [h["applied"] for h in r.history],
                            "skipped": r.summary["skipped"]}  # fmt: skip
    res["nan_grad_always"] = _raises(
        lambda: train(
            RecordingTask(nan_grad_calls=range(100)), _cfg(out / "g2", max_consecutive_nonfinite=3)
        )
    )

    # disk full at the step-4 save, on every rank (a shared filesystem fills up for all)
    task = RecordingTask()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if task.calls >= 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    torch.save = full_disk
    try:
        res["enospc"] = _raises(lambda: train(task, _cfg(out / "full", save_every_steps=2,
                                                          max_steps=6)))  # fmt: skip
    finally:
        torch.save = real_save
    res["enospc_latest"] = latest_tag(out / "full" / "checkpoints")
    torch.distributed.barrier()

    # SIGUSR1 arrives on rank 0 while the step-2 checkpoint is being written
    task = RecordingTask()

    def signalled_save(obj, f, *a, **k):
        if rank == 0 and task.calls == 4 and not res.get("signalled"):
            res["signalled"] = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_save(obj, f, *a, **k)

    torch.save = signalled_save
    try:
        r = train(task, _cfg(out / "sig", save_every_steps=2, max_steps=8))
    finally:
        torch.save = real_save
    ckpts = out / "sig" / "checkpoints"
    res["signal_mid_save"] = {"status": r.status, "step": r.step, "latest": latest_tag(ckpts),
                              "complete": sorted(p.parent.parent.name
                                                 for p in ckpts.glob("*/rng/rank1.pt"))}  # fmt: skip

    # the real pretraining task over shards with 1 % of every sample fault; wandb offline
    from pretrain import run_pretraining

    r = run_pretraining(REPO / "configs/pretrain/tiny.yaml", [
        f"data.train_shards={shards}", f"tokenizer.path={out / 'tok' / 'tokenizer.json'}",
        "data.num_workers=0", "data.shuffle_buffer=0", "train.epochs=1", "train.max_steps=100",
        "train.global_batch_size=16", "train.micro_batch_size=8", "train.log_every=4",
        "train.save_every_steps=4", "train.progress_bar=false", "train.wandb=offline",
        "objectives.rf=false", f"train.output_dir={out / 'faulty'}",
    ])  # fmt: skip
    res["faulty"] = {"status": r.status, "step": r.step}
    return res


def _never_delivers():
    time.sleep(3600)
    yield from ()


class ShardImageTask:
    """A linear probe on the mean colour of the real loader's images (2 workers per rank, from the
    fork server): cheap steps, so the run is mostly epoch boundaries."""

    def __init__(self, world: Path, stall_rank: int = -1) -> None:
        from bimac.data import DataConfig, SkipCounter, TokenizerConfig, build_tokenizer

        self.data = DataConfig(train_shards=f"{world}/{{00000..00001}}.tar", batch_size=32,
                               num_workers=2, shuffle_buffer=100, streams=2)  # fmt: skip
        tok_cfg = TokenizerConfig(kind="world", path=str(world / "tokenizer.json"))
        self.tokenizer, self.counter = build_tokenizer(tok_cfg), SkipCounter()
        self.stall_rank, self.epochs_started = stall_rank, 0

    def build_model(self):
        return torch.nn.Linear(3, 1)

    def build_train_loader(self, rank, world_size, epoch, cursor):
        from bimac.data import make_loader

        self.epochs_started += 1
        if rank == self.stall_rank and epoch == 2:
            return _never_delivers()
        return make_loader(self.data, self.tokenizer, rank=rank, world_size=world_size,
                           epoch=epoch, global_batch_size=64, cursor=cursor,
                           counter=self.counter)  # fmt: skip

    def losses(self, model, batch):
        x = batch["image"].float().mean(dim=(2, 3)) / 255
        return {"mse": (model(x).squeeze(-1) - 0.5).pow(2).mean()}, {}


def scenario_epochs(out: Path, world: str) -> dict:
    """64 short epochs (2 steps each) on 2 ranks with 2 loader workers: a fresh set of workers
    every epoch, never forked from the threaded trainer."""
    from bimac.engine import train

    task = ShardImageTask(Path(world))
    r = train(task, _cfg(out / "epochs", global_batch_size=64, micro_batch_size=32, epochs=64, max_steps=200,
                         watchdog_s=120))  # fmt: skip
    return {"status": r.status, "step": r.step, "epoch": r.summary["epoch"],
            "loaders": task.epochs_started}  # fmt: skip


def scenario_stall(out: Path, world: str) -> dict:
    """Rank 1's loader never delivers its third epoch: the watchdog must end the run."""
    from bimac.engine import train
    from bimac.engine.distributed import init_distributed

    rank, _ = init_distributed()
    Path(out / f"stall_started_rank{rank}").write_text(str(time.time()))
    train(ShardImageTask(Path(world), stall_rank=1),
          _cfg(out / "stall", global_batch_size=64, micro_batch_size=32, epochs=10, max_steps=20, watchdog_s=8))  # fmt: skip
    return {"error": "the stall was not caught"}


SCENARIOS = {
    "dies": scenario_dies,
    "after": scenario_after,
    "full_one_rank": scenario_full_one_rank,
    "epochs": scenario_epochs,
    "stall": scenario_stall,
}


def _launch(out: Path, scenario: str, *args: str, timeout: int = 400):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={port}", __file__, scenario, str(out), *args]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from reliability_faults import write_faulty_shards

    from bimac.data.tokenizer import save_world_tokenizer

    out = tmp_path_factory.mktemp("rel")
    (out / "tok").mkdir()
    save_world_tokenizer(out / "tok" / "tokenizer.json")
    shards, expected, _ = write_faulty_shards(out / "shards", n=200, shard_size=50)
    died, _ = _launch(out, "dies")
    exited_at = time.time()
    latest_after_death = (out / "dies" / "checkpoints" / "latest").read_text()
    full, _ = _launch(out, "full_one_rank")
    full_exited_at = time.time()
    after, _ = _launch(out, "after", shards)
    assert after.returncode == 0, after.stdout[-3000:] + after.stderr[-6000:]
    return {"out": out, "died": died, "exited_at": exited_at, "after": after,
            "latest_after_death": latest_after_death, "expected": expected,
            "full": full, "full_exited_at": full_exited_at,
            "res": json.loads((out / "after.json").read_text())}  # fmt: skip


def _seen(path: Path) -> list[list[int]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from shards.world import build

    root = tmp_path_factory.mktemp("world")
    build(root, "train", n=128, shard_size=64)  # one shard per rank: one worker of each has none
    return root


@pytest.mark.slow
def test_many_short_epochs_with_loader_workers_complete(world, tmp_path):
    proc, _ = _launch(tmp_path, "epochs", str(world), timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.loads((tmp_path / "epochs.json").read_text())
    assert res == {"status": "completed", "step": 128, "epoch": 64, "loaders": 64}


@pytest.mark.slow
def test_a_stalled_rank_trips_the_watchdog_in_one_line(world, tmp_path):
    proc, _ = _launch(tmp_path, "stall", str(world), timeout=600)
    assert proc.returncode != 0
    stalls = [ln for ln in proc.stderr.splitlines() if "no progress for" in ln]
    assert stalls, proc.stderr[-5000:]
    # the stalled rank names its loader; its peer, if it trips first, names the collective
    assert any(
        ln.startswith("rank 1: no progress for")
        and "waiting for the data loader before step 5" in ln
        or ln.startswith("rank 0: no progress for")
        and "all_reduce agreeing on the end of the epoch" in ln
        for ln in stalls
    ), stalls
    assert "raise train.watchdog_s" in stalls[0]


@pytest.mark.slow
def test_killed_rank_stops_the_job_and_restart_resumes_exactly(runs):
    out, died = runs["out"], runs["died"]
    assert died.returncode != 0 and "SIGKILL" in died.stderr  # torchrun names the dead rank
    killed_at = float((out / "seen_dies_rank1.jsonl.killed_at").read_text())
    # the survivor is stopped (gloo sees the peer's socket close; torchrun terminates the rest)
    assert runs["exited_at"] - killed_at < 60
    assert runs["latest_after_death"] == "step00000004"  # the step-6 save never started
    assert runs["res"]["resume"] == {"first_step": 5, "step": 8, "status": "completed"}
    for rank in (0, 1):
        before = _seen(out / f"seen_dies_rank{rank}.jsonl")
        after = _seen(out / f"seen_after_rank{rank}.jsonl")
        # steps 1-4 are in the checkpoint (2 micro-batches a step); step 5+ is redone
        assert len(before) >= 9
        stream = [i for mb in before[:8] + after for i in mb]
        order = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(100)).tolist()
        # global step k is order[8k : 8k + 8]; rank r serves its half (2 micro-batches of 2)
        assert stream == [
            i for k in range(8) for i in order[8 * k + 4 * rank : 8 * k + 4 * rank + 4]
        ]


@pytest.mark.slow
def test_uneven_data_ends_the_epoch_on_every_rank_together(runs):
    # rank 1 has 7 micro-batches: 3 full steps (accumulation 2); its 7th is dropped with the epoch
    assert runs["res"]["uneven"] == {"step": 3, "epoch": 1, "calls": 6}


@pytest.mark.slow
def test_nonfinite_gradient_is_skipped_counted_and_stops_the_run(runs):
    res = runs["res"]
    assert res["nan_grad_once"] == {"applied": [True, False, True, True],
                                    "skipped": {"nonfinite_grad": 1}}  # fmt: skip
    msg = res["nan_grad_always"]
    assert msg.startswith("NonFiniteTrainingError: stopping at step 3: 3 consecutive steps")
    assert "non-finite gradient norm" in msg


@pytest.mark.slow
def test_disk_full_during_save_is_a_clear_error_and_keeps_latest(runs):
    res = runs["res"]
    assert res["enospc"].startswith("CheckpointSaveError: rank ")
    assert "No space left on device" in res["enospc"] and "step00000004" in res["enospc"]
    assert "`latest` still names step00000002, which is intact" in res["enospc"]
    assert res["enospc_latest"] == "step00000002"
    full = runs["out"] / "full" / "checkpoints"
    assert sorted(p.name for p in (full / "step00000002" / "rng").iterdir()) == [
        "rank0.pt", "rank1.pt"]  # fmt: skip


@pytest.mark.slow
def test_disk_full_on_one_rank_stops_the_job_and_keeps_latest(runs):
    out, full = runs["out"], runs["full"]
    assert full.returncode != 0
    assert "CheckpointSaveError: rank 0 could not write checkpoint" in full.stderr
    assert "`latest` still names step00000002, which is intact" in full.stderr
    # rank 1 waits inside DeepSpeed's save until the launcher stops it: bounded, no hang
    assert runs["full_exited_at"] - float((out / "full_at").read_text()) < 60
    assert (out / "full1" / "checkpoints" / "latest").read_text() == "step00000002"


@pytest.mark.slow
def test_signal_during_save_finishes_the_save_then_preempts(runs):
    # the handler only sets a flag: the step-2 save completes, step 3 runs, saves, and leaves
    assert runs["res"]["signal_mid_save"] == {
        "status": "preempted", "step": 3, "latest": "step00000003",
        "complete": ["step00000002", "step00000003"],
    }  # fmt: skip


def _good_samples(out: Path, shard: int) -> int:
    """Good samples of one faulty shard, read once (reference: the one-pass reader)."""
    from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader

    tok = build_tokenizer(TokenizerConfig(kind="world", path=str(out / "tok" / "tokenizer.json")))
    cfg = DataConfig(train_shards=str(out / "shards" / f"{shard:05d}.tar"), batch_size=1)
    return sum(len(b["sample_id"]) for b in make_loader(cfg, tok, rank=0, world_size=1))


@pytest.mark.slow
def test_training_over_faulty_shards_counts_every_skip(runs):
    out, expected = runs["out"] / "faulty", runs["expected"]
    assert runs["res"]["faulty"]["status"] == "completed"
    summary = json.loads((out / "summary.json").read_text())
    # 4 shards of 50, 4 streams (one shard each), chunk 4 of the global 16: the epoch has as many
    # steps as the stream with the fewest good samples fills; the rest is its tail
    good = [_good_samples(runs["out"], i) for i in range(4)]
    assert sum(good) == 200 - sum(expected.values())
    steps = min(good) // 4
    assert summary["step"] == steps and steps >= 11
    tail = sum(good) - 16 * steps
    assert summary["data_skipped"] == dict(expected) | {"epoch_tail": tail}  # both ranks, summed
    assert summary["skipped"] == {}  # every micro-batch is full
    logged = [
        json.loads(line)["skipped"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert any(k.startswith("data/") for rec in logged for k in rec)
    assert "skipped sample (image_too_large)" in runs["after"].stderr


@pytest.mark.slow
def test_no_secret_in_logs_configs_or_checkpoints(runs):
    out = runs["out"]
    files = [p for p in out.rglob("*") if p.is_file() and "shards" not in p.parts]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.yaml" for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []
    for proc in (runs["died"], runs["after"]):
        assert SECRET not in proc.stdout + proc.stderr


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    result = SCENARIOS[scenario](out_dir, *sys.argv[3:])
    if torch.distributed.get_rank() == 0:
        (out_dir / f"{scenario}.json").write_text(json.dumps(result))
