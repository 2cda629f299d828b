"""Contrastive fine-tuning for image-text retrieval, with R@1/5/10 before and after.

    python -m finetune.retrieval --config configs/finetune/retrieval/tiny.yaml [key=value ...]

Trains the `init` BiMAC export (or a fresh `model`) on the `data` shards with the contrastive
objective on the shared engine (DeepSpeed; torchrun / srun for several processes), exports to
``train.output_dir/export``, and writes ``train.output_dir/eval_retrieval.json`` with
image->text and text->image R@1/5/10 on `eval.data` (shards, ``world:retrieval:N``, or a Karpathy
JSON such as ``dataset_coco.json`` / ``dataset_flickr30k.json`` with `eval.images`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bimac.config import run_main
from bimac.tasks.retrieval import RetrievalConfig, RetrievalTask
from finetune.common import (
    bimac_encoder_of,
    fresh_model,
    stage_main,
    write_results,
)

PROG = "python -m finetune.retrieval"


def eval_pairs(cfg: RetrievalConfig) -> tuple[list, list[list[str]]]:
    from bimac.eval.retrieval import karpathy_pairs, shard_pairs

    e = cfg.eval
    if e.data.endswith(".json"):
        images, captions = karpathy_pairs(e.data, e.images, e.split)
        return (images[: e.limit], captions[: e.limit]) if e.limit else (images, captions)
    return shard_pairs(e.data, "en", e.limit or None)


def run(cfg: RetrievalConfig, eval_only: bool = False) -> dict:
    """Evaluate, fine-tune, evaluate again; returns what ``eval_retrieval.json`` holds."""
    from bimac.engine import train
    from bimac.engine.distributed import init_distributed
    from bimac.eval.common import bimac_encoder
    from bimac.eval.retrieval import evaluate

    rank, _ = init_distributed()
    task = RetrievalTask(cfg)
    pairs = eval_pairs(cfg) if rank == 0 and cfg.eval.enabled else None
    results: dict = {"stage": "retrieval", "init": cfg.init or "random", "data": cfg.eval.data}
    if pairs:
        start = (
            bimac_encoder(cfg.init)
            if cfg.init
            else bimac_encoder_of(fresh_model(task, cfg.train.seed), task.tokenizer, "init")
        )
        results["before"] = evaluate(start, *pairs, cfg.eval.batch_size)
    if eval_only:
        return _finish(cfg, rank, results)
    result = train(task, cfg.train, cfg)
    results.update(status=result.status, step=result.step, export=str(result.export_dir))
    if pairs and result.export_dir is not None:
        results["after"] = evaluate(bimac_encoder(result.export_dir), *pairs, cfg.eval.batch_size)
    return _finish(cfg, rank, results)


def _finish(cfg: RetrievalConfig, rank: int, results: dict) -> dict:
    if rank == 0:
        write_results(Path(cfg.train.output_dir), "retrieval", results)
        for when in ("before", "after"):
            if when in results:
                r = results[when]
                print(
                    f"{when}: " + ", ".join(f"{k}={r[k]:.2f}" for k in r if isinstance(r[k], float))
                )
    return results


def main(argv: list[str] | None = None) -> dict:
    return stage_main(RetrievalConfig, PROG, __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
