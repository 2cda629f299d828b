"""``make demo``: the main job on the embedded world, ``python -m cli.demo --out DIR``.

1. data: render the world's shards for every split (+ the world tokenizer), validate them through
   the trainer's pipeline (``shards.check``), and write a PNG preview grid of images with their
   English and Bengali captions;
2. pretrain: BiMAC ``tiny`` with 2 CPU processes under DeepSpeed ZeRO-2 (gloo), checkpoint and
   safetensors export (``configs/pretrain/tiny.yaml``);
3. evaluate: retrieval, zero-shot classification, captioning and the compositional probe on the
   export, printed as one table.

``--bengali`` (``make demo-bn``) instead builds the world's triplet shards (real image, synthetic
companion, EN and BN captions) and fine-tunes the PAL Bengali captioner on them (PAL + InfoNCE +
OT, ``configs/finetune/caption_bn/tiny.yaml``), ending with its metric table and captions.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from bimac.config import parse_cli, run_main

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]  # the demo reads the repository's configs/

# split -> number of samples in the demo (the retrieval test split is Flickr30k-1k sized)
DEMO_SPLITS = {
    "train": 2000,
    "val": 500,
    "retrieval": 1000,
    "cls_shape": 500,
    "cls_colour_shape": 500,
    "probe": 200,
}
# the PAL demo: 4000 scenes and 2000 steps (BLEU-4 18.7-20.5 over 3 seeds; at 1200 steps
# 12.4-17.4: RESULTS.md, "Reaching BLEU-4 15")
BENGALI_SPLITS = {"train": 4000, "val": 200}
# an OFL font that pip installs (fontpkg-hind-siliguri): the preview needs no system font
BENGALI_FONT = "Hind Siliguri"


def build_world(
    out: Path, size: int = 64, seed: int = 0, bengali: bool = False, splits: dict | None = None
) -> dict[str, str]:
    """Shards of every split (``splits``: name -> samples; default the demo's) under
    ``out/shards/<split>``; returns split -> URL pattern.

    ``bengali``: the PAL captioner's triplet splits (train and val, with synthetic companions).
    """
    from shards.world import build

    splits = splits or (BENGALI_SPLITS if bengali else DEMO_SPLITS)
    patterns = {}
    for split, n in splits.items():
        tars = build(out / "shards" / split, split, n, size, seed, triplets=bengali, shard_size=500)
        patterns[split] = str(out / "shards" / split / f"{{00000..{len(tars) - 1:05d}}}.tar")
    return patterns


def check_world(out: Path, patterns: dict[str, str], triplets: bool = False) -> dict[str, dict]:
    """``shards.check`` on every split; writes ``out/check.json`` and fails on any skipped sample."""
    from shards.check import check

    report = {s: check(p, triplets=triplets) for s, p in patterns.items()}
    (out / "check.json").write_text(json.dumps(report, indent=2))
    bad = {s: r["skipped"] for s, r in report.items() if r["skipped_total"] or not r["samples"]}
    if bad:
        raise RuntimeError(f"the world's shards failed their check: {bad}")
    for split, r in report.items():
        log.info("%s: %d samples in %d shards, ok", split, r["samples"], r["shards"])
    return report


def _first_samples(tar: Path, n: int) -> list[dict]:
    out: dict[str, dict] = {}
    with tarfile.open(tar) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            if key not in out and len(out) == n:
                break
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return list(out.values())


def preview_grid(shard: Path, png: Path, n: int = 12, cols: int = 4) -> Path:
    """A grid of ``n`` images from ``shard`` with their first English and Bengali captions."""
    import matplotlib

    matplotlib.use("Agg")
    import fontpkg.mpl
    import matplotlib.pyplot as plt
    from PIL import Image

    bn_font = fontpkg.mpl.use(BENGALI_FONT)  # matplotlib >= 3.11 shapes it with libraqm
    samples = _first_samples(shard, n)
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 4.2))
    lines = []
    for ax, s in zip(axes.flat, samples):
        meta = json.loads(s["json"])
        en, bn = meta["captions_en"][0], meta["captions_bn"][0]
        lines.append(f"{meta['index']:09d}\t{en}\t{bn}")
        ax.imshow(Image.open(io.BytesIO(s["jpg"])))
        ax.set_title("\n".join(textwrap.wrap(en, 34)), fontsize=7)
        ax.set_xlabel("\n".join(textwrap.wrap(bn, 34)), fontsize=9, fontproperties=bn_font)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(samples) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    png.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return png


@dataclass
class DemoConfig:
    """What ``make demo`` / ``make demo-bn`` run (``--key value`` or ``key=value``)."""

    out: str = "runs/demo"  # the demo's folder: shards, runs, preview, evaluation
    bengali: bool = False  # the PAL Bengali captioner demo (triplet shards)
    size: int = 64  # image side of the world
    seed: int = 0
    # training steps; null: 200 pretraining, 2000 PAL fine-tuning; 0: data stage only
    steps: int | None = None
    nproc: int = 2  # pretraining processes


PROG = "python -m cli.demo"


def main(argv: list[str] | None = None) -> None:
    a = parse_cli(DemoConfig, PROG, __doc__, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(a.out).resolve()  # the pretraining processes run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    patterns = build_world(out, a.size, a.seed, a.bengali)
    check_world(out, patterns, triplets=a.bengali)
    png = preview_grid(out / "shards" / "train" / "00000.tar", out / "preview.png")
    log.info("data stage done: shards in %s, preview %s", out / "shards", png)
    if a.steps == 0:
        return
    if a.bengali:
        finetune_bengali(out, patterns, a.steps or 2000)
        return
    export = pretrain(out, patterns["train"], a.steps or 200, a.nproc)
    evaluate(export, out / "eval.json")


def pretrain(out: Path, train_pattern: str, steps: int, nproc: int) -> Path:
    """Pretrain ``tiny`` on the world's train split; returns the export directory."""
    from pretrain import launch_local

    run = out / "pretrain"
    overrides = [
        f"data.train_shards={train_pattern}",
        f"tokenizer.path={out / 'shards' / 'train' / 'tokenizer.json'}",
        f"train.output_dir={run}",
        f"train.max_steps={steps}",
        "train.resume=none",  # the demo renders its data anew: never continue an old run
    ]
    log.info("pretraining tiny BiMAC: %d steps, %d processes, ZeRO-2 on the CPU", steps, nproc)
    code = launch_local("configs/pretrain/tiny.yaml", overrides, nproc=nproc)
    if code != 0:
        raise SystemExit(f"pretraining failed with exit code {code}; its log is above")
    log.info("checkpoints in %s, export in %s", run / "checkpoints", run / "export")
    return run / "export"


def finetune_bengali(out: Path, patterns: dict[str, str], steps: int) -> None:
    """PAL + InfoNCE + OT on the triplets (``configs/finetune/caption_bn/tiny.yaml``), then
    BLEU / METEOR (Bengali mode) on the held-out split and a few captioned images."""
    from finetune import caption_bn

    caption_bn.main(
        [
            "--config",
            str(REPO / "configs/finetune/caption_bn/tiny.yaml"),
            f"data.train_shards={patterns['train']}",
            f"data.val_shards={patterns['val']}",
            f"train.output_dir={out / 'caption_bn'}",
            f"train.max_steps={steps}",
            "train.epochs=1000",  # bounded by max_steps
            "train.resume=none",  # the demo renders its data anew: never continue an old run
        ]
    )
    log.info("PAL captioner export and metrics in %s", out / "caption_bn")


def evaluate(export: Path, out_json: Path) -> None:
    """Retrieval, zero-shot classification, captioning and probe of ``export``, as one table."""
    from bimac.eval import world

    world.main(["--checkpoint", str(export), "--out", str(out_json)])
    log.info("evaluation numbers in %s", out_json)


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
