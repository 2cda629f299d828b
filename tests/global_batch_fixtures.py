"""Shared by tests/test_global_batch_losses.py and its spawned gloo ranks: the tiny BiMAC
(configs/model/tiny.yaml) with every objective, a hand-built global batch, and one step's
losses and gradients computed as the engine does (``step_context``, then ``losses`` per
micro-batch) or in one piece. A small module, so spawned ranks import only torch and bimac."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from bimac.models.bimac import load_model_config
from bimac.tasks.pretrain import ObjectiveConfig, PretrainTask

REPO = Path(__file__).resolve().parents[1]
TOK = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2, vocab_size=1000)
GLOBAL_BATCH = 8


class LengthScorer:
    """A per-sample reward that differs between samples (so the global mean matters): the
    reference caption's length plus the greedy caption's length, over 10."""

    def score(self, candidates, references):
        return [(len(refs[0]) + len(c)) / 10 for c, refs in zip(candidates, references)]


def model_config():
    return load_model_config(REPO / "configs/model/tiny.yaml")


def objectives(**changes) -> ObjectiveConfig:
    # learnable logit scale (the shipped tiny pretraining config): its gradient is checked too
    return dataclasses.replace(ObjectiveConfig(temperature=None, rf_max_new_tokens=4), **changes)


def make_task(objective_config: ObjectiveConfig) -> PretrainTask:
    task = PretrainTask(model_config(), objective_config, tokenizer=TOK)
    task._scorer = LengthScorer()
    return task


def global_batch(b: int = GLOBAL_BATCH) -> dict:
    """``b`` captions of different lengths (5..12 tokens), 3 noun slots, some nouns missing."""
    cfg = model_config()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, cfg.vocab_size, (b, cfg.context_length), generator=g)
    text[:, 0] = TOK.bos_id
    for i in range(b):
        n = 5 + (3 * i) % 8
        text[i, n] = TOK.eos_id
        text[i, n + 1 :] = TOK.pad_id
    spans = torch.tensor([[[1, 3], [3, 4], [4, 5]]] * b)
    mask = torch.rand(b, 3, generator=g) < 0.7
    mask[1] = False  # a caption without nouns
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0, 0, 1, 1]]] * b)
    image = torch.randint(
        0, 256, (b, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8
    )
    return {
        "image": image,
        "text": text,
        "noun_spans": spans,
        "noun_mask": mask,
        "noun_boxes": boxes,
        "noun_has_box": mask.clone(),
        "sample_id": [f"s#{i}" for i in range(b)],
    }


def rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def build_model(task: PretrainTask):
    torch.manual_seed(0)
    return task.build_model()


def one_piece(objective_config: ObjectiveConfig, batch: dict) -> tuple[dict, dict, dict]:
    """The reference: ``losses(model, batch)`` of the whole global batch in one piece, its
    gradients (name -> grad), terms and metrics."""
    task = make_task(objective_config)
    model = build_model(task)
    torch.manual_seed(1)
    terms, metrics = task.losses(model, batch)
    torch.stack(list(terms.values())).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {k: v.item() for k, v in terms.items()}, metrics


def engine_step(objective_config: ObjectiveConfig, micro: list[dict]) -> tuple[dict, dict, dict]:
    """This rank's share of one step as the engine computes it: ``step_context`` over the
    micro-batches, then ``losses(model, batch, share)`` and a backward per micro-batch (the
    engine's DeepSpeed backward scaled by world x accumulation and averaged over accumulation
    and ranks is this plain sum). Returns this rank's gradients, summed terms and step metrics."""
    task = make_task(objective_config)
    model = build_model(task)
    context = task.step_context(model, micro, lambda i: torch.manual_seed(1 + i))
    terms_sum: dict[str, float] = {}
    for i, batch in enumerate(micro):
        torch.manual_seed(1 + i)
        terms, metrics = task.losses(model, batch, context.micro[i])
        torch.stack(list(terms.values())).sum().backward()
        for k, v in {**terms, **metrics}.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, terms_sum, context.metrics


def rank_worker(rank: int, world: int, port: int, accumulation: int, out_path: str) -> None:
    """Rank ``rank`` of ``world`` takes its contiguous block of the global batch, cut into
    ``accumulation`` micro-batches (the global order: rank-major, micro-batch, row)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    batch = global_batch()
    per_rank = GLOBAL_BATCH // world
    per_micro = per_rank // accumulation
    start = rank * per_rank
    micro = [
        rows(batch, start + i * per_micro, start + (i + 1) * per_micro) for i in range(accumulation)
    ]
    torch.save(engine_step(objectives(), micro), f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
