"""Fine-tuned image classification: linear probe or full fine-tuning of BiMAC's image tower.

    python -m finetune.classification --config configs/finetune/classification/tiny.yaml [k=v ...]

Trains a linear head on the L2-normalised image embedding (``mode: linear_probe``: BiMAC frozen;
``mode: full``: the image tower trains too) on `data.train` (ImageFolder, shards with ``cls``, or
``world:cls_shape:N[:SEED]``) on the shared engine, exports BiMAC + ``classifier.safetensors`` +
``classnames.txt`` to ``train.output_dir/export``, and writes ``eval_classification.json``: the
zero-shot accuracy of the starting model (prompt ensemble) and the trained classifier's top-1 /
top-5 / mean per-class recall on `data.test`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bimac.config import load_config
from bimac.tasks.classification import (
    ClassificationConfig,
    ClassificationTask,
    ImageClassifier,
    accuracy,
    load_items,
)
from finetune.common import (
    bimac_encoder_of,
    fresh_model,
    parser,
    setup_logging,
    write_results,
)


def zero_shot(encoder, images, labels, classnames, spec: str, batch_size: int) -> dict:
    """Prompt-ensemble zero-shot accuracy (``bimac.eval.classification``) of the start model."""
    from bimac.data.samples import parse_world
    from bimac.eval.classification import CLIP_TEMPLATES, evaluate, world_templates

    world = parse_world(spec)
    templates = world_templates(world[0]) if world else CLIP_TEMPLATES
    return evaluate(encoder, images, labels, classnames, templates, batch_size)


def run(cfg: ClassificationConfig, eval_only: bool = False) -> dict:
    """Zero-shot numbers of the start, training, trained-classifier numbers."""
    from bimac.engine import train
    from bimac.engine.distributed import init_distributed
    from bimac.eval.common import bimac_encoder

    rank, _ = init_distributed()
    task = ClassificationTask(cfg)
    d = cfg.data
    results: dict = {
        "stage": "classification",
        "mode": cfg.mode,
        "init": cfg.init or "random",
        "train_data": d.train,
        "test_data": d.test,
    }
    test = load_items(d.test, d.classnames) if rank == 0 else None
    if test is not None:
        images, labels, names = test
        start = (
            bimac_encoder(cfg.init)
            if cfg.init
            else bimac_encoder_of(fresh_model(task, cfg.train.seed).bimac, task.tokenizer, "init")
        )
        results["zero_shot"] = zero_shot(start, images, labels, names, d.test, cfg.eval_batch_size)
    if not eval_only:
        train_cfg = cfg.train
        if not (train_cfg.max_steps or train_cfg.samples_per_epoch):  # a list: its length is known
            train_cfg = dataclasses.replace(train_cfg, samples_per_epoch=len(task.images))
        result = train(task, train_cfg, cfg)
        results.update(status=result.status, step=result.step, export=str(result.export_dir))
        if test is not None and result.export_dir is not None:
            model, _ = ImageClassifier.from_pretrained(result.export_dir)
            results["fine_tuned"] = accuracy(
                model, images, labels, d.image_size, cfg.eval_batch_size
            )
    if rank == 0:
        write_results(Path(cfg.train.output_dir), "classification", results)
        for key in ("zero_shot", "fine_tuned"):
            if key in results:
                print(f"{key}: top1={results[key]['top1']:.2f}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parser("python -m finetune.classification", __doc__).parse_args(argv)
    setup_logging()
    return run(load_config(ClassificationConfig, args.config, args.overrides), args.eval_only)


if __name__ == "__main__":
    main()
