"""Batched Sinkhorn OT (bimac.losses.sinkhorn_ot) against POT, forward + backward.

Compares, at the PAL settings (eps = 0.05, 30 iterations, cosine cost between D = 512 patch
tokens, top-rho masses with dropped patches):
  - ours, gradient through the iterations ("unrolled") and detached plan ("envelope");
  - POT's per-sample loop: ``ot.sinkhorn2(method="sinkhorn_log")`` on torch tensors (autograd);
  - POT's batched API: ``ot.batch.solve_batch(method="log_sinkhorn", grad="autodiff")``.
Every case runs in its own process; times are the best of ``--repeats`` runs, as process CPU time
(robust on a shared machine; with one thread it is the compute time) and wall time; "peak MiB" is
the rise of the process's peak RSS while solving over its peak after building the inputs. Values are checked against POT's loop
(max absolute difference). Run: ``.venv/bin/python benchmarks/transport.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

EPS, ITERS, D = 0.05, 30, 512
METHODS = ("ours-unrolled", "ours-envelope", "pot-loop", "pot-batch")
SIZES = ((64, 49), (256, 49), (64, 196), (256, 196))


def _inputs(b: int, s: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, D, generator=g)
    y = torch.randn(b, s, D, generator=g)
    w = torch.softmax(torch.randn(b, s, generator=g) * 2, -1)
    # Top-half masses: drop the lower-weight patches, as top-rho does.
    w = torch.where(w >= w.median(-1, keepdim=True).values, w, torch.zeros_like(w))
    w = w / w.sum(-1, keepdim=True)
    return x, y, w


def _run(method: str, x, y, w):
    """One forward + backward; returns the per-sample values."""
    import ot
    import torch

    from bimac.losses import cosine_cost, sinkhorn_ot

    x = x.detach().requires_grad_(True)
    cost = cosine_cost(x, y)
    if method.startswith("ours"):
        values = sinkhorn_ot(cost, w, w, EPS, ITERS, grad_mode=method.split("-")[1])
    elif method == "pot-loop":
        values = []
        for i in range(cost.shape[0]):
            keep = w[i] > 0  # POT's log-domain solver needs strictly positive masses
            c = cost[i][keep][:, keep]
            values.append(
                ot.sinkhorn2(
                    w[i][keep], w[i][keep], c, EPS, method="sinkhorn_log",
                    numItermax=ITERS, stopThr=0.0, warn=False,
                )
            )  # fmt: skip
        values = torch.stack(values)
    else:
        # ot.batch takes zero masses (log 0 = -inf rows); tol = 0 runs all iterations.
        res = ot.batch.solve_batch(
            cost, EPS, w, w, max_iter=ITERS, tol=0.0, method="log_sinkhorn", grad="autodiff"
        )
        values = res.value_linear
    values.sum().backward()
    return values.detach()


def _child(method: str, b: int, s: int, threads: int, repeats: int) -> None:
    import torch

    torch.set_num_threads(threads)
    x, y, w = _inputs(b, s)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # inputs built, nothing solved
    values = _run(method, x, y, w)  # warm-up (its peak counts: same work as a timed run)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        values = _run(method, x, y, w)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ms": 1e3 * min(wall), "cpu_ms": 1e3 * min(cpu), "mib": (peak - base) / 1024,
                      "values": values.tolist()}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "B", "S"))
    args = ap.parse_args()
    if args.child:
        m, b, s = args.child
        _child(m, int(b), int(s), args.threads, args.repeats)
        return
    rows = []
    for b, s in SIZES:
        res = {}
        for m in METHODS:
            cmd = [sys.executable, __file__, "--child", m, str(b), str(s),
                   "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[m] = json.loads(out.stdout.strip().splitlines()[-1])
        ref = res["pot-loop"]
        for m in METHODS:
            r = res[m]
            diff = max(abs(p - q) for p, q in zip(r["values"], ref["values"]))
            rows.append(
                f"| {b} | {s} | {m} | {r['cpu_ms']:.1f} | {r['ms']:.1f} | "
                f"{ref['cpu_ms'] / r['cpu_ms']:.1f}x | {res['pot-batch']['cpu_ms'] / r['cpu_ms']:.2f}x | "
                f"{r['mib']:.0f} | {diff:.1e} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"eps={EPS}, iterations={ITERS}, D={D}, torch threads={args.threads}, "
          f"best of {args.repeats} forward+backward runs\n")  # fmt: skip
    print(
        "| B | S | method | CPU ms | wall ms | speed-up vs POT loop (CPU) | vs ot.batch (CPU) "
        "| peak MiB | max abs diff vs POT loop |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
