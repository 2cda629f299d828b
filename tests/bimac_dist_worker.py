"""Rank body for tests/test_losses_bimac.py's 2-process gloo test (a small module, so spawned
children import only torch and bimac.losses, not the test module's reference libraries)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bimac.losses.contrastive import contrastive_loss


def unit(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def rank_worker(rank: int, world: int, port: int, out_path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    img, txt = unit(8, 6, dtype=torch.float64, seed=3), unit(8, 6, dtype=torch.float64, seed=4)
    rows = slice(4 * rank, 4 * rank + 4)
    li, lt = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
    loss = contrastive_loss(li, lt, 3.0)
    loss.backward()
    torch.save({"loss": loss.detach(), "gi": li.grad, "gt": lt.grad}, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
