"""English caption fine-tuning: cross-entropy, then self-critical training (SCST, CIDEr-D reward).

    python -m finetune.caption --config configs/finetune/caption/tiny.yaml [key=value ...]

Phase 1 (``train``) trains the caption decoder with cross-entropy on the `data` shards (COCO
Karpathy train written as img2dataset shards, or the embedded world) and exports to
``train.output_dir/xe/export``; phase 2 (``scst``, skipped with ``scst.max_steps=0``) starts from
that export and maximises CIDEr-D (document frequencies from the training references) with a
greedy or leave-one-out baseline, exporting to ``train.output_dir/scst/export``. Each export is
captioned (`eval.strategy`, beam by default) and scored with BLEU-1..4, METEOR, CIDEr-D and SPICE
(when its Stanford models are installed) on `eval.annotations` (COCO-format Karpathy test JSON or
``world:val:N``) and zero-shot on `eval.nocaps_annotations`; everything goes to
``train.output_dir/eval_caption.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from bimac.config import run_main
from bimac.tasks.caption import CaptionConfig, CaptionTask
from finetune.common import stage_main, write_results

PROG = "python -m finetune.caption"


def score_export(export: str | Path, cfg: CaptionConfig, annotations: str, images: str) -> dict:
    """Caption ``annotations``' images with the export and score them (COCO toolkit metrics)."""
    from bimac.eval.captioning import generate_captions, load_annotations, score_captions

    e = cfg.eval
    refs, sources = load_annotations(annotations, "en")
    beams = e.num_beams if e.strategy == "beam" else 1
    results = generate_captions(
        export, sources, images or None, e.strategy, beams, e.max_new_tokens, e.batch_size
    )
    scores = score_captions(results, refs, "en", tuple(e.metrics))
    scores["examples"] = [
        {"image_id": k, "caption": v, "references": refs[k][:2]}
        for k, v in list(results.items())[:5]
    ]
    # every generated caption, in COCO's results format, so the scores can be recomputed
    scores["captions"] = [{"image_id": k, "caption": v} for k, v in results.items()]
    return scores


def evaluate_phase(export: Path, cfg: CaptionConfig) -> dict:
    out = {"test": score_export(export, cfg, cfg.eval.annotations, cfg.eval.images)}
    if cfg.eval.nocaps_annotations:
        out["nocaps"] = score_export(
            export, cfg, cfg.eval.nocaps_annotations, cfg.eval.nocaps_images
        )
    return out


def run(cfg: CaptionConfig, eval_only: bool = False) -> dict:
    """Cross-entropy phase, SCST phase, evaluation of each; returns ``eval_caption.json``'s dict."""
    from bimac.engine import train
    from bimac.engine.distributed import init_distributed

    out = Path(cfg.train.output_dir)
    results: dict = {
        "stage": "caption",
        "init": cfg.init or "random",
        "annotations": cfg.eval.annotations,
    }
    if eval_only:
        if not cfg.init:
            raise ValueError("--eval-only needs `init` (a BiMAC export to caption with)")
        results["init_eval"] = evaluate_phase(Path(cfg.init), cfg)
        write_results(out, "caption", results)
        return results
    rank, _ = init_distributed()
    xe_train = dataclasses.replace(cfg.train, output_dir=out / "xe")
    xe = train(CaptionTask(cfg, "xe"), xe_train, cfg)
    results["xe"] = {"status": xe.status, "step": xe.step, "export": str(xe.export_dir)}
    exports = {"xe": xe.export_dir}
    if cfg.scst.max_steps and xe.status == "completed":
        s = cfg.scst
        scst_cfg = dataclasses.replace(cfg, init=str(xe.export_dir))
        scst_train = dataclasses.replace(
            cfg.train, output_dir=out / "scst", max_steps=s.max_steps, lr=s.lr, warmup_steps=0
        )
        task = CaptionTask(scst_cfg, "scst")
        scst = train(task, scst_train, scst_cfg)
        rewards = [r["metrics"]["scst_reward"] for r in scst.history]
        results["scst"] = {
            "status": scst.status,
            "step": scst.step,
            "export": str(scst.export_dir),
            "reward_first": rewards[0] if rewards else None,
            "reward_last": rewards[-1] if rewards else None,
        }
        exports["scst"] = scst.export_dir
    if rank == 0 and cfg.eval.enabled:
        for phase, export in exports.items():
            if export is not None:
                results[phase]["eval"] = evaluate_phase(export, cfg)
    if rank == 0:
        write_results(out, "caption", results)
        for phase in exports:
            test = results[phase].get("eval", {}).get("test", {})
            print(
                phase
                + ": "
                + ", ".join(f"{k}={v:.2f}" for k, v in test.items() if isinstance(v, float))
            )
    return results


def main(argv: list[str] | None = None) -> dict:
    return stage_main(CaptionConfig, PROG, __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
