"""Exact resume, one run per directory, a real full disk and ZeRO-3 with every objective, on the
shipped ``configs/pretrain/tiny.yaml`` (all four objectives, RF, random captions, 2 loader
workers, shuffle buffer 1000) launched as a user does: ``NPROC=2 bash slurm/pretrain.sh``.

Every process of a run (the launcher, torchrun, its workers, their loader workers) is SIGKILLed
the moment rank 0 points ``latest`` at the step-10 save (``crash_after_save/sitecustomize.py``); the same command then resumes, and its
``metrics.jsonl`` must equal an uninterrupted run's step by step, exactly (fp32 on CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from process_tree import crash_after_save_env  # noqa: E402
from test_engine_pretrain import world_overrides  # noqa: E402

STEPS, SAVE_EVERY, KILL_AFTER = 20, 5, "step00000010"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> list[str]:
    # 128 samples in 2 shards, 2 streams: each rank serves one stream (its 2 workers lowered to
    # 1), an epoch is 8 steps of 16, so the 20 steps cross 2 epoch boundaries and resume mid-epoch
    overrides = world_overrides(tmp_path_factory.mktemp("world"))
    return [o for o in overrides if o != "data.num_workers=0"]  # the shipped 2 workers


def _launch(
    out: Path, world: list[str], *extra: str, kill_after: str | None = None, nproc: int = 2
):
    """``bash slurm/pretrain.sh`` with ``nproc`` ranks; with ``kill_after``, SIGKILL every process
    of the run the moment ``checkpoints/latest`` names that tag. Returns (exit status, stderr)."""
    overrides = [*world, "train.global_batch_size=16", "train.micro_batch_size=8",
                 f"train.max_steps={STEPS}", f"train.save_every_steps={SAVE_EVERY}",
                 "train.warmup_steps=2", f"train.output_dir={out}", *extra]  # fmt: skip
    env = {**os.environ, "CONFIG": "configs/pretrain/tiny.yaml", "PYTHON": sys.executable,
           "NPROC": str(nproc), "OVERRIDES": " ".join(overrides), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    if kill_after:
        env |= crash_after_save_env(out / "checkpoints" / kill_after, str(REPO))
    out.mkdir(parents=True, exist_ok=True)
    err_path = out.parent / f"{out.name}.{time.time():.0f}.stderr"
    with open(err_path, "w") as err:
        rc = subprocess.run(["bash", "slurm/pretrain.sh"], cwd=REPO, env=env, timeout=900,
                            stdout=subprocess.DEVNULL, stderr=err).returncode  # fmt: skip
    return rc, err_path.read_text()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_crashed_after(rc: int, checkpoint: Path) -> None:
    """The launched run died of SIGKILL right after saving ``checkpoint``: ``latest`` names it
    and the run's log ends at its step."""
    assert rc == -signal.SIGKILL, rc
    assert (checkpoint.parent / "latest").read_text() == checkpoint.name
    logged = [r["step"] for r in _metrics(checkpoint.parents[1])]
    assert logged == list(range(1, int(checkpoint.name.removeprefix("step")) + 1)), logged


REFERENCE: dict[int, list[dict]] = {}


def _reference(tmp: Path, world: list[str], stage: int) -> list[dict]:
    if stage not in REFERENCE:
        rc, err = _launch(tmp / f"straight{stage}", world, f"train.zero_stage={stage}")
        assert rc == 0, err[-5000:]
        REFERENCE[stage] = _metrics(tmp / f"straight{stage}")
    return REFERENCE[stage]


def _same(rec: dict) -> dict:
    return {k: rec[k] for k in ("step", "epoch", "loss", "losses", "lr", "samples", "metrics")}


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three launches of 20 steps
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sigkill_after_a_save_then_the_same_command_resumes_exactly(stage, world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"resume{stage}")
    straight = _reference(tmp, world, stage)
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    out = tmp / "killed"
    rc, _ = _launch(out, world, f"train.zero_stage={stage}", kill_after=KILL_AFTER)
    _assert_crashed_after(rc, out / "checkpoints" / KILL_AFTER)
    assert (out / "run.lock").is_file()  # left behind by the killed rank 0
    rc, err = _launch(out, world, f"train.zero_stage={stage}")
    assert rc == 0, err[-5000:]
    assert "taking over" in err and "no longer runs" in err  # the stale lock, one log line
    resumed = _metrics(out)
    # every step exactly once, the saved step included, and each equal to the uninterrupted run
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for got, want in zip(resumed, straight):
        assert _same(got) == _same(want), got["step"]
    assert not (out / "run.lock").exists()  # released at the end


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_zero3_runs_every_objective_and_matches_zero2(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("z3")
    z2, z3 = _reference(tmp, world, 2), _reference(tmp, world, 3)
    assert "rf_cider" in z3[0]["metrics"]  # RF's greedy captions ran under ZeRO-3
    for a, b in zip(z2[:10], z3[:10]):
        assert (
            a["losses"].keys() == b["losses"].keys() == {"mcl", "cg", "grounding", "reconstruction"}
        )
        for k in a["losses"]:
            # reference: the ZeRO-2 run, fp32 on CPU, rel 1e-5. Step 1 agrees exactly (the same
            # torch ops: zero3.json keeps DeepSpeed's replacement of F.linear off); after it only
            # the clipping norm's partial sums differ (grouped by partition), measured <= 2e-7
            # over 20 steps. With the replacement on, step 6's reconstruction term was 1.6e-5 off.
            assert b["losses"][k] == pytest.approx(a["losses"][k], rel=1e-5), (a["step"], k)


@pytest.mark.slow
def test_a_directory_held_by_a_live_run_is_refused_in_one_line(world, tmp_path):
    import socket

    holder = subprocess.Popen(["sleep", "600"])  # stands for a live run's rank 0
    try:
        out = tmp_path / "held"
        out.mkdir()
        lock = {"host": socket.gethostname(), "pid": holder.pid, "since": "2026-01-01 00:00:00"}
        (out / "run.lock").write_text(json.dumps(lock))
        rc, err = _launch(out, world)
    finally:
        holder.kill()
    assert rc != 0
    lines = [ln for ln in err.splitlines() if "is in use by process" in ln]
    assert len(lines) == 2, err[-3000:]  # one per rank
    assert f"process {holder.pid} on {socket.gethostname()}" in lines[0]
    assert "choose another train.output_dir" in lines[0]
    # no traceback from the ranks (torchrun still prints its own ChildFailedError report)
    assert not [ln for ln in err.splitlines() if ln.strip().startswith('File "') and "bimac" in ln]
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_a_real_full_disk_ends_the_run_in_one_line_and_keeps_latest(world, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {mount.stderr}")
    try:
        out = mnt / "run"
        # one checkpoint (weights + Adam state) is ~35 MB: the step-5 save fits, step 10's does not
        rc, err = _launch(out, world, "train.max_steps=12", "train.zero_stage=2")
        ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
        latest = (out / "checkpoints" / "latest").read_text()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert rc != 0
    lines = [ln for ln in err.splitlines() if "could not write checkpoint" in ln]
    assert lines, err[-5000:]
    assert "MiB free there" in lines[0] and "the partial checkpoint was removed" in lines[0]
    assert "`latest` still names step00000005, which is intact" in lines[0]
    assert latest == "step00000005"
    assert "step00000010" not in ckpts  # removed, not left to fill the disk


# -- another world size: a 2-rank checkpoint resumed by 1 rank through DeepSpeed's universal
# checkpoint. The data each rank draws depends on the world size until the loader's order is
# global, so the losses differ; what must carry over exactly is the model, optimizer and schedule.
WS_STEPS, WS_SAVED = 6, "step00000003"


def _universal_state(tag_dir: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each parameter's fp32 weight and Adam moments in ``tag_dir`` (any world size and ZeRO
    stage), through DeepSpeed's ``ds_to_universal`` as the engine runs it; flat, float64."""
    from bimac.engine.checkpoint import convert_universal

    convert_universal(tag_dir, out)
    state = {}
    for param_dir in (out / "zero").iterdir():
        if param_dir.is_dir():
            files = {k: torch.load(param_dir / f"{k}.pt", weights_only=False)
                     for k in ("fp32", "exp_avg", "exp_avg_sq")}  # fmt: skip
            # ZeRO-1/2 files hold {"param": tensor, ...}, ZeRO-3 files the tensor itself
            state[param_dir.name] = {k: (v["param"] if isinstance(v, dict) else v).detach()
                                     .double().flatten() for k, v in files.items()}  # fmt: skip
    return state


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("stage", [2, 3])
def test_a_2_rank_checkpoint_resumes_on_1_rank_with_its_weights_moments_and_schedule(
    stage, world, tmp_path
):
    """The step-3 checkpoint of a 2-rank run (ZeRO-2 with the learnable 0-dim logit scales that
    ``ds_to_universal`` cannot convert as they are; ZeRO-3), resumed by the same command with
    NPROC=1 and train.resume=auto, is converted once and continues at step 4 with the 2-rank
    run's learning rates and sample count. The converted weights equal DeepSpeed's zero_to_fp32
    consolidation exactly, and the resumed run's step-4 checkpoint is one Adam step (recomputed
    here in float64) from the saved weights and moments at step count 4."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from bimac.engine.checkpoint import convert_universal
    from bimac.tasks.pretrain import load_pretrain_config

    run = [f"train.zero_stage={stage}", f"train.max_steps={WS_STEPS}"]
    straight = tmp_path / "straight"
    rc, err = _launch(straight, world, *run, "train.save_every_steps=3")
    assert rc == 0, err[-5000:]
    # what a 2-rank job preempted right after its step-3 save leaves behind
    out = tmp_path / "resumed"
    saved = shutil.copytree(straight / "checkpoints" / WS_SAVED, out / "checkpoints" / WS_SAVED)
    (out / "checkpoints" / "latest").write_text(WS_SAVED)
    more = ["train.save_every_steps=1", "train.keep_last=10"]
    rc, err = _launch(out, world, *run, *more, nproc=1)
    assert rc == 0, err[-5000:]

    universal = out / "checkpoints" / f"{WS_SAVED}_universal"
    assert (
        f"converted checkpoint {saved} written by 2 ranks as a universal checkpoint "
        f"{universal} for 1 ranks"
    ) in err
    assert convert_universal(saved, universal) is False  # complete: a later resume reuses it
    assert (out / "checkpoints" / "latest").read_text() == f"step{WS_STEPS:08d}"  # its own saves
    assert not list((out / "checkpoints").glob("*latest_universal*"))
    assert not list((out / "checkpoints").glob("*.partial"))
    want, got = _metrics(straight), _metrics(out)
    assert [r["step"] for r in got] == list(range(4, WS_STEPS + 1))
    for g, w in zip(got, want[3:]):
        assert (g["lr"], g["samples"]) == (w["lr"], w["samples"]), g["step"]
    # the 0-dim parameters stay 0-dim for everything that reads the export
    exported = load_file(out / "export" / "model.safetensors")
    assert exported["coca.logit_scale"].shape == exported["grounding_logit_scale"].shape == ()

    # the weights it loaded: DeepSpeed's consolidation of the 2-rank shards, bit for bit
    before = _universal_state(saved, tmp_path / "u3")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(saved.parent), tag=WS_SAVED)
    assert before.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(before[name]["fp32"], tensor.double().flatten()), name

    # step 4 on 1 rank: Adam (torch.optim.Adam, no decoupled decay) from the step-3 moments
    train = load_pretrain_config(REPO / "configs/pretrain/tiny.yaml").train
    (b1, b2), eps, t = train.betas, train.eps, 4
    lr = want[2]["lr"]  # the rate set after step 3 is the one step 4 uses
    after = _universal_state(out / "checkpoints" / "step00000004", tmp_path / "u4")
    for name, s3 in before.items():
        s4 = after[name]
        grad = (s4["exp_avg"] - b1 * s3["exp_avg"]) / (1 - b1)  # as Adam's first moment saw it
        # fp32 rounding: measured 3.5e-7 relative on the second moment, <= 3 ulp on the weights
        v_want = b2 * s3["exp_avg_sq"] + (1 - b2) * grad**2
        torch.testing.assert_close(s4["exp_avg_sq"], v_want, rtol=1e-5, atol=1e-20, msg=name)
        denom = s4["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t) + eps
        w_want = s3["fp32"] - lr / (1 - b1**t) * s4["exp_avg"] / denom
        bound = 1e-6 * (s3["fp32"].abs() + (s4["fp32"] - s3["fp32"]).abs())
        assert ((s4["fp32"] - w_want).abs() <= bound).all(), name


# -- fine-tuning stages: one rank, the small model of the fine-tuning tests, 6 steps, killed
# after the step-2 save (for captioning, inside its SCST phase)
def _finetune_args(stage: str, world: tuple[Path, Path], out: Path) -> list[str]:
    from finetune_fixtures import SMALL

    tar, tok = world
    args = ["--config", f"configs/finetune/{stage}/tiny.yaml", "train.max_steps=6",
            "train.micro_batch_size=8", "train.global_batch_size=8", "train.save_every_steps=2",
            "train.progress_bar=false", "train.wandb=disabled", "train.log_every=1",
            f"tokenizer.path={tok}", f"train.output_dir={out}", "data.image_size=32",
            *(f"model.{o}" for o in SMALL)]  # fmt: skip
    if stage == "classification":
        return [*args, "data.train=world:cls_shape:64:1", "data.test=world:cls_shape:8"]
    args += [f"data.train_shards={tar}", "data.streams=1", "data.num_workers=2"]
    if stage == "retrieval":
        return [*args, "eval.data=world:retrieval:8"]
    return [*args, "scst.max_steps=4", "scst.samples=2", "scst.max_new_tokens=6",
            "eval.annotations=world:val:4", "eval.metrics=[cider]", "eval.max_new_tokens=6",
            "eval.num_beams=1"]  # fmt: skip


def _finetune(
    stage: str, args: list[str], crash_after: Path | None = None, nproc: int = 1
) -> tuple[int, str]:
    """``python -m finetune.<stage>`` (under torchrun for ``nproc`` > 1); with ``crash_after``,
    SIGKILL every process of the run the moment ``latest`` points at that checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if crash_after:
        env |= crash_after_save_env(crash_after, str(REPO))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", f"finetune.{stage}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=900)  # fmt: skip
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def finetune_world(tmp_path_factory) -> tuple[Path, Path]:
    from finetune_fixtures import world_shards

    return world_shards(tmp_path_factory.mktemp("ftworld"), n=64)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("stage", ["retrieval", "classification", "caption"])
def test_finetuning_stage_resumes_exactly_after_sigkill(stage, finetune_world, tmp_path):
    phases = ["xe", "scst"] if stage == "caption" else [""]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rc, err = _finetune(stage, _finetune_args(stage, finetune_world, straight))
    assert rc == 0, err[-5000:]
    save2 = killed / phases[-1] / "checkpoints" / "step00000002"
    rc, _ = _finetune(stage, _finetune_args(stage, finetune_world, killed), crash_after=save2)
    _assert_crashed_after(rc, save2)
    rc, err = _finetune(stage, _finetune_args(stage, finetune_world, killed))
    assert rc == 0, err[-5000:]
    for phase in phases:
        want, got = _metrics(straight / phase), _metrics(killed / phase)
        assert [r["step"] for r in got] == [r["step"] for r in want] != []
        for g, w in zip(got, want):
            assert _same(g) == _same(w), (phase, g["step"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scst_under_zero3_resumes_exactly_after_sigkill_and_matches_zero2(tmp_path):
    """`finetune.caption` on 2 ranks (torchrun) with train.zero_stage=3, cross-entropy then SCST,
    SIGKILLed after the SCST phase's step-2 save and rerun: every step equals the uninterrupted
    ZeRO-3 run's exactly; and the ZeRO-3 run's rewards equal a ZeRO-2 run's (same seed), its losses
    to 1e-5 (see below).
    The shipped zero3.json with its persistence threshold at 0: the small test model's parameters
    all lie under the shipped 1e5 elements, so without it nothing would be partitioned; at paper
    scale nearly everything is. 2 cross-entropy steps (the SCST phase starts from their export),
    4 SCST steps, no evaluation."""
    from shards.world import build

    build(tmp_path / "world", "train", 64, 64, seed=0, shard_size=32)  # a shard per rank
    shards = (tmp_path / "world" / "{00000..00001}.tar", tmp_path / "world" / "tokenizer.json")
    zero3 = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))

    def args(out: Path, stage: int) -> list[str]:
        ds = [f"train.deepspeed_config={tmp_path / 'zero3.json'}"] if stage == 3 else []
        return [*_finetune_args("caption", shards, out), "train.global_batch_size=16",
                "train.max_steps=2", "eval.enabled=false", f"train.zero_stage={stage}",
                "data.streams=2", *ds]  # fmt: skip

    runs = {name: tmp_path / name for name in ("zero2", "zero3", "killed")}
    rc, err = _finetune("caption", args(runs["zero2"], 2), nproc=2)
    assert rc == 0, err[-5000:]
    rc, err = _finetune("caption", args(runs["zero3"], 3), nproc=2)
    assert rc == 0, err[-5000:]
    save2 = runs["killed"] / "scst" / "checkpoints" / "step00000002"
    rc, _ = _finetune("caption", args(runs["killed"], 3), crash_after=save2, nproc=2)
    _assert_crashed_after(rc, save2)
    rc, err = _finetune("caption", args(runs["killed"], 3), nproc=2)
    assert rc == 0, err[-5000:]
    for phase in ("xe", "scst"):
        want, got = _metrics(runs["zero3"] / phase), _metrics(runs["killed"] / phase)
        assert [r["step"] for r in got] == [r["step"] for r in want] != []
        for g, w in zip(got, want):
            assert _same(g) == _same(w), (phase, g["step"])
    for phase, steps in (("xe", [1, 2]), ("scst", [1, 2, 3, 4])):
        zero2, zero3 = _metrics(runs["zero2"] / phase), _metrics(runs["zero3"] / phase)
        assert [r["step"] for r in zero3] == [r["step"] for r in zero2] == steps
        for a, b in zip(zero2, zero3):
            # the same sampled captions (the same CIDEr-D rewards); losses: reference ZeRO-2,
            # rel 1e-5, or abs 1e-7 for SCST's mean of (reward - baseline) x sum(log p), whose
            # terms (~1e-2 x 10) cancel to ~5e-3 (measured 2026-11-27: rewards equal, XE 1e-7
            # relative, SCST 1.6e-8 absolute = 3e-6 relative)
            assert b["metrics"] == a["metrics"], (phase, a["step"])
            for k in a["losses"]:
                assert b["losses"][k] == pytest.approx(a["losses"][k], rel=1e-5, abs=1e-7), (
                    phase,
                    k,
                )


@pytest.mark.slow
def test_a_checkpoint_without_deepspeed_files_is_refused_in_one_line(finetune_world, tmp_path):
    """A checkpoint directory without DeepSpeed's optimizer shards (here: only RNG files, as a
    copy cut short leaves it): one line that names it and the fix, before DeepSpeed starts."""
    out = tmp_path / "cls"
    tag = out / "checkpoints" / "step00000002"
    (tag / "rng").mkdir(parents=True)
    for rank in (0, 1):
        (tag / "rng" / f"rank{rank}.pt").write_bytes(b"")
    (out / "checkpoints" / "latest").write_text("step00000002")
    rc, err = _finetune("classification", _finetune_args("classification", finetune_world, out))
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert f"checkpoint {tag} holds no DeepSpeed optimizer shards" in line
    assert "train.resume=none" in line


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_caption_bn_resumes_exactly_after_sigkill(tmp_path):
    """`python -m finetune.caption_bn` (the shipped tiny PAL config: triplet loader, PAL +
    InfoNCE + Sinkhorn OT, progressive unfreezing) SIGKILLed after its step-2 save and rerun:
    every step of metrics.jsonl equals the uninterrupted run's, exactly."""
    from shards.world import build

    for split, n in (("train", 48), ("val", 8)):
        build(tmp_path / split, split, n, 64, triplets=True, shard_size=48)

    def args(out: Path) -> list[str]:
        return ["--config", "configs/finetune/caption_bn/tiny.yaml",
                f"data.train_shards={tmp_path}/train/00000.tar",
                f"data.val_shards={tmp_path}/val/00000.tar", f"train.output_dir={out}",
                "train.max_steps=6", "train.save_every_steps=2", "train.epochs=100",
                "train.progress_bar=false", "train.wandb=disabled", "train.log_every=1",
                "eval.max_samples=4", "eval.meteor=false"]  # fmt: skip

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rc, err = _finetune("caption_bn", args(straight))
    assert rc == 0, err[-5000:]
    save2 = killed / "checkpoints" / "step00000002"
    rc, _ = _finetune("caption_bn", args(killed), crash_after=save2)
    _assert_crashed_after(rc, save2)
    rc, err = _finetune("caption_bn", args(killed))
    assert rc == 0, err[-5000:]
    want, got = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for g, w in zip(got, want):
        assert _same(g) == _same(w), g["step"]
