"""One-GPU check (``benchmarks/gpu_check.sh``, <= 8 minutes): the paper-size BiMAC step in bf16
(samples/s, MFU against the GPU's bf16 peak) and the loader's images/s on ``photo_1024`` with CPU
decode and with GPU decode (``data.decode_on: cuda``), ``--workers`` DataLoader workers.

``--dry-run`` runs the same code on CPU in seconds (tiny model, 64 images, the GPU decode path
with torchvision's CPU decoder) so the script is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from bimac.data import loader as loader_module
from bimac.models.bimac import load_model_config
from bimac.tasks.pretrain import ObjectiveConfig, PretrainTask
from shards import photos

# dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _batch(cfg, b: int, device) -> dict:
    """A random batch in the loader's contract (uint8 images, token ids, 1-4 noun spans)."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(4, cfg.vocab_size, (b, cfg.context_length), generator=g)
    text[:, 0], text[:, -1] = 1, 2
    nouns = 8
    starts = torch.arange(nouns).repeat(b, 1) % 4 + 1
    batch = {
        "image": torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8),
        "text": text,
        "noun_spans": torch.stack([starts, starts + 1], -1),
        "noun_mask": torch.arange(nouns).unsqueeze(0) < torch.randint(1, 5, (b, 1), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def step_check(model_cfg: str, batch_size: int, steps: int, device: str) -> dict:
    """Median-free throughput of ``steps`` timed bf16 training steps after two warm-ups; FLOPs of
    one step counted by ``torch.utils.flop_counter`` (forward + backward)."""
    cfg = load_model_config(model_cfg)
    task = PretrainTask(cfg, ObjectiveConfig(rf=False))
    model = task.build_model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    batch = _batch(cfg, batch_size, device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = sum(task.losses(model, batch)[0].values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t) / steps
    flops = counter.get_total_flops()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(name)
    return {
        "device": name,
        "model": model_cfg,
        "batch": batch_size,
        "seconds_per_step": seconds,
        "samples_per_s": batch_size / seconds,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / 1e12 / peak if peak else None,
        "peak_tflops": peak,
    }


def loader_check(folder: Path, workers: int, device: str, decode_on: str) -> dict:
    """Images/s (wall) of one epoch of the loader, batches moved to ``device`` (decoded there
    with ``decode_on: cuda``)."""
    tok = build_tokenizer(TokenizerConfig(path=str(folder / "tokenizer.json"), context_length=32))
    cfg = DataConfig(
        train_shards=f"{folder}/*.tar", image_size=224, batch_size=128, shuffle_buffer=1000,
        decode_on=decode_on,
    )  # fmt: skip
    # --dry-run: pass the loader's CUDA check and let its decode_batch run on the CPU
    dry = device == "cpu" and decode_on == "cuda"
    decode_batch = loader_module.decode_batch
    with (
        mock.patch.object(torch.cuda, "is_available", lambda: True) if dry else nullcontext(),
        mock.patch.object(loader_module, "decode_batch", lambda b, s, _: decode_batch(b, s, "cpu")) if dry else nullcontext(),
    ):  # fmt: skip
        loader = make_loader(cfg, tok, rank=0, world_size=1, num_workers=workers)
        n = 0
        t = time.perf_counter()
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            n += image.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return {"decode_on": decode_on, "workers": workers, "images": n,
            "images_per_s": n / (time.perf_counter() - t)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 64 images")
    p.add_argument("--batch", type=int, default=128, help="paper-size step batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--images", type=int, default=2000, help="photo_1024 images for the loader")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--data", default="runs/bench/gpu_check")
    p.add_argument("--json", default="runs/bench/gpu_check.json")
    a = p.parse_args()
    if a.dry_run:
        device, model, batch, steps, images, workers = "cpu", "configs/model/tiny.yaml", 4, 1, 64, 2
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --dry-run to test the script")
    else:
        device, model, batch, steps = "cuda", "configs/model/paper.yaml", a.batch, a.steps
        images, workers = a.images, a.workers
    folder = Path(a.data) / f"photo_1024_{images}"
    if not (folder / "tokenizer.json").is_file():
        photos.build(
            folder, images, 1024, 768, shard_size=max(1, images // (2 * workers)), processes=workers
        )
    result = {"step": step_check(model, batch, steps, device)}
    print(json.dumps(result["step"]), flush=True)
    result["loader"] = []
    for decode_on in ("cpu", "cuda"):
        result["loader"].append(loader_check(folder, workers, device, decode_on))
        print(json.dumps(result["loader"][-1]), flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
