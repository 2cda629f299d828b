"""Step-time cost of the feature cache (GradCache, issue 14): a pretraining step of a fixed global
batch split into 1, 2 and 4 micro-batches, with the cache (the engine's path:
``PretrainTask.step_context`` runs an extra forward without gradient over every micro-batch, then
each is re-forwarded with gradient) against plain accumulation without it (the per-micro-batch
losses of ``PretrainTask.losses(model, micro_batch)``: contrastive and grounding negatives and
every mean within the micro-batch, what the engine did before issue 14).

At accumulation 1 the cache needs no extra pass (the one forward keeps its graph and the global
loss is computed from its features), so both paths cost the same there.

Run: ``.venv/bin/python benchmarks/feature_cache.py [--batch 32] [--steps 5] [--json out.json]``.
Tiny BiMAC (configs/model/tiny.yaml), every objective but RF (RF's greedy captions cost the same
in both paths: the cache computes them in its first pass instead of the re-forward), one torch
thread, AdamW. Both paths are interleaved step by step so load changes hit both alike; the
figures are medians of wall time and of process CPU time (the fairer measure on a shared
machine) over the timed steps after one warm-up step each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from step import TOK, make_batch

from bimac.models.bimac import load_model_config
from bimac.tasks.pretrain import ObjectiveConfig, PretrainTask


def split(batch: dict, parts: int) -> list[dict]:
    n = batch["text"].shape[0] // parts
    return [{k: v[i * n : (i + 1) * n] for k, v in batch.items()} for i in range(parts)]


def step_with_cache(task, model, opt, micro) -> None:
    context = task.step_context(model, micro, lambda i: torch.manual_seed(i))
    for i, mb in enumerate(micro):
        torch.manual_seed(i)
        terms, _ = task.losses(model, mb, context.micro[i])
        torch.stack(list(terms.values())).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_without_cache(task, model, opt, micro) -> None:
    for i, mb in enumerate(micro):
        torch.manual_seed(i)
        terms, _ = task.losses(model, mb)
        (torch.stack(list(terms.values())).sum() / len(micro)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="configs/model/tiny.yaml")
    p.add_argument("--batch", type=int, default=32, help="the global batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path and accumulation")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_model_config(a.model)
    task = PretrainTask(cfg, ObjectiveConfig(rf=False, temperature=None), tokenizer=TOK)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    batch = make_batch(cfg, a.batch)
    paths = {"cache": step_with_cache, "no_cache": step_without_cache}
    results: dict[str, dict] = {}
    for accumulation in (1, 2, 4):
        micro = split(batch, accumulation)
        wall: dict[str, list[float]] = {k: [] for k in paths}
        cpu: dict[str, list[float]] = {k: [] for k in paths}
        for fn in paths.values():
            fn(task, model, opt, micro)  # warm-up
        for _ in range(a.steps):
            for name, fn in paths.items():
                t, c = time.perf_counter(), time.process_time()
                fn(task, model, opt, micro)
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        row = {f"{k}_wall_s": statistics.median(v) for k, v in wall.items()}
        row.update({f"{k}_cpu_s": statistics.median(v) for k, v in cpu.items()})
        row["cpu_ratio"] = row["cache_cpu_s"] / row["no_cache_cpu_s"]
        row["wall_ratio"] = row["cache_wall_s"] / row["no_cache_wall_s"]
        results[str(accumulation)] = row
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}",
        "torch": torch.__version__,
        "threads": 1,
        "global_batch": a.batch,
        "steps": a.steps,
        "load_average_end": os.getloadavg(),
    }
    print(f"global batch {a.batch}, {a.steps} timed steps, load average {os.getloadavg()}")
    print("| accumulation | micro-batch | cache s/step (CPU) | no cache s/step (CPU) | × (CPU) "
          "| cache s/step (wall) | no cache s/step (wall) | × (wall) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for acc, r in results.items():
        print(f"| {acc} | {a.batch // int(acc)} | {r['cache_cpu_s']:.3f} | {r['no_cache_cpu_s']:.3f} "
              f"| {r['cpu_ratio']:.2f} | {r['cache_wall_s']:.3f} | {r['no_cache_wall_s']:.3f} "
              f"| {r['wall_ratio']:.2f} |")  # fmt: skip
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"meta": meta, "accumulation": results}, indent=2))


if __name__ == "__main__":
    main()
