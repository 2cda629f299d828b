"""Bytes per rank of parameters, gradients and optimizer state under ZeRO 0/1/2/3 (2 CPU ranks).

    .venv/bin/python benchmarks/zero_memory.py [--scale 4]

Measured, not computed: each stage runs DeepSpeed on 2 gloo ranks with a stack of 1024x1024
linear layers holding the paper BiMAC parameter count divided by ``--scale``; after the backward
(gradients) and after the Adam step (optimizer state) every live tensor storage of the process is
found through the garbage collector, de-duplicated by address, and attributed to
parameters (the module's parameter storages, ZeRO-3 partitions included), optimizer state (the
inner optimizer's state and its fp32 master partitions) or gradients (
``.grad`` of parameters and the ZeRO optimizer's gradient partitions/buffers); other storages of
at least 1 MiB are communication buckets etc., listed apart (fixed size, set by the bucket
sizes in ``configs/deepspeed/zero*.json``, which the runs use). Per-parameter
bytes scale linearly, so the table also shows them at the paper count. The communication
volume per step is the expected one (ZeRO paper, Rajbhandari et al. 2020, Sec. 7): stages 0-2
all-reduce the gradients (2 x params x (n-1)/n elements sent per GPU), stage 3 adds one
parameter all-gather in the forward and one in the backward (3 x params x (n-1)/n).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

WIDTH = 1024
MIB = 2**20


def paper_param_count() -> int:
    """Parameters of BiMAC at the paper config (built on the meta device: no memory)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bimac.models.bimac import BiMAC
    from pretrain import load_pretrain_config

    cfg = load_pretrain_config(Path(__file__).resolve().parents[1] / "configs/pretrain/paper.yaml")
    with torch.device("meta"):
        return sum(p.numel() for p in BiMAC(cfg.model).parameters())


def _storages() -> dict[int, tuple[int, torch.Tensor]]:
    seen: dict[int, tuple[int, torch.Tensor]] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            st = obj.untyped_storage()
            if st.nbytes():
                seen[st.data_ptr()] = (st.nbytes(), obj)
    return seen


def worker(stage: int, n_params: int, out: Path) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    layers = max(1, n_params // (WIDTH * WIDTH + WIDTH))
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    zero = {"stage": 0}
    if stage:  # the settings we train with
        repo = Path(__file__).resolve().parents[1]
        zero = json.loads((repo / f"configs/deepspeed/zero{stage}.json").read_text())[
            "zero_optimization"
        ]
    cfg = {
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1, "zero_optimization": zero,
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    x = torch.randn(2, WIDTH)
    engine.backward(engine(x).pow(2).mean())

    def param_ptrs() -> set[int]:
        ptrs = set()
        for p in engine.module.parameters():
            t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            ptrs.add(t.untyped_storage().data_ptr())
        return ptrs

    def optimizer_ptrs() -> set[int]:
        inner = engine.optimizer
        inner = getattr(inner, "optimizer", inner)  # ZeRO wrappers hold the torch optimizer
        ptrs = set()
        for state in inner.state.values():
            ptrs |= {v.untyped_storage().data_ptr() for v in state.values() if torch.is_tensor(v)}
        for group in inner.param_groups:  # fp32 master partitions (ZeRO) or the params (stage 0)
            ptrs |= {p.untyped_storage().data_ptr() for p in group["params"]}
        return ptrs

    def grad_ptrs() -> set[int]:
        """``.grad`` of module and master parameters, and every tensor the ZeRO optimizer keeps
        under an attribute named like ``*grad*`` (its gradient partitions and flat buffers)."""
        found = [p.grad for p in engine.module.parameters()]
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        found += [p.grad for g in inner.param_groups for p in g["params"]]
        stack = [v for k, v in vars(engine.optimizer).items() if "grad" in k.lower()]
        while stack:
            v = stack.pop()
            if isinstance(v, (list, tuple)):
                stack += list(v)
            elif isinstance(v, dict):
                stack += list(v.values())
            else:
                found.append(v)
        return {t.untyped_storage().data_ptr() for t in found if torch.is_tensor(t)}

    def split() -> dict[str, int]:
        live, p_ptrs, o_ptrs, g_ptrs = _storages(), param_ptrs(), optimizer_ptrs(), grad_ptrs()
        out = {"params": 0, "optimizer": 0, "gradients": 0, "buffers": 0}
        for ptr, (nbytes, _) in live.items():
            if ptr in p_ptrs:
                out["params"] += nbytes
            elif ptr in o_ptrs:
                out["optimizer"] += nbytes
            elif ptr in g_ptrs:
                out["gradients"] += nbytes
            elif nbytes >= MIB:
                out["buffers"] += nbytes
        return out

    after_backward = split()
    engine.step()
    after_step = split()
    result = {
        "stage": stage, "params_count": sum(
            getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
        "params": after_step["params"], "gradients": after_backward["gradients"],
        "optimizer": after_step["optimizer"], "buffers": after_backward["buffers"],
    }  # fmt: skip
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(gathered))


def comm_bytes_per_gpu(stage: int, n_params: int, gpus: int, bytes_per_elem: int = 2) -> float:
    factor = 3 if stage == 3 else 2
    return factor * n_params * bytes_per_elem * (gpus - 1) / gpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", type=int, default=4, help="measure paper_count / scale params")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--stage", type=int)
    p.add_argument("--params", type=int)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.worker:
        worker(a.stage, a.params, a.out)
        return
    paper = paper_param_count()
    n = paper // a.scale
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (0, 1, 2, 3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = Path(tmp) / f"z{stage}.json"
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
            subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                 f"--master_port={port}", __file__, "--worker", "--stage", str(stage),
                 "--params", str(n), "--out", str(out)],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            rows[stage] = json.loads(out.read_text())
    measured = rows[0][0]["params_count"]
    print(
        f"BiMAC paper config: {paper:,} parameters; measured with {measured:,} "
        f"(1/{a.scale}), fp32 weights and Adam, 2 ranks, rank 0 shown (rank 1 agrees within "
        "a partition's rounding)\n"
    )
    print(
        "| ZeRO stage | params MiB/rank | grads MiB/rank | optimizer MiB/rank | total MiB/rank "
        "| bytes/param | at paper count GiB/rank | vs stage 0 | buckets MiB/rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for stage, ranks in rows.items():
        r = ranks[0]
        total = r["params"] + r["gradients"] + r["optimizer"]
        base = base or total
        print(
            f"| {stage} | {r['params'] / MIB:.1f} | {r['gradients'] / MIB:.1f} | "
            f"{r['optimizer'] / MIB:.1f} | {total / MIB:.1f} | {total / measured:.2f} | "
            f"{total / measured * paper / 2**30:.2f} | {total / base:.2f} | "
            f"{r['buffers'] / MIB:.1f} |"
        )
    print(
        "\nExpected communication sent per GPU per optimizer step at the paper count "
        "(bf16 gradients/parameters on the wire):\n"
    )
    print("| ZeRO stage | 8 GPUs GiB | 64 GPUs GiB | 512 GPUs GiB |")
    print("|---|---|---|---|")
    for stage in (0, 1, 2, 3):
        vals = [comm_bytes_per_gpu(stage, paper, g) / 2**30 for g in (8, 64, 512)]
        print(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
