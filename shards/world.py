"""Build embedded-world shards: ``python -m shards.world --out DIR --split train --n N``.

Writes ``DIR/00000.tar``... in img2dataset's layout (``--triplets`` adds the synthetic companion
and the EN/BN caption files) and the world tokenizer ``DIR/tokenizer.json``. With ``--format``,
writes the split in a benchmark's published layout instead (``bimac.eval.benchmarks`` reads
them all; ``bimac eval ... --format F --data DIR``):

- ``clip_benchmark``: the retrieval split (``.txt``, one caption per line, ``dataset_type.txt``
  = retrieval) or a classification split (``.cls``, ``classnames.txt``,
  ``zeroshot_classification_templates.txt``) as ``DIR/test/{0..}.tar`` + ``nshards.txt``.
- ``sugarcrepe``, ``winoground``, ``valse``, ``spec``: the probe split (``--n`` images, 2 per
  pair). Each pair's two captions are each other's negative; the
  probe's kinds become sub-tasks (attribute: ``swap_att`` / ``attributes`` / ``attribute``,
  relation: ``replace_rel`` / ``relations`` / ``relative_position``).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import webdataset as wds
from PIL import Image

from bimac.config import ConfigError, parse_cli, run_main
from bimac.data.tokenizer import save_world_tokenizer
from bimac.data.world import SPLITS, VARIANTS, class_names, make_sample
from bimac.data.writer import TAR_MTIME, write_shards

FORMATS = ("shards", "clip_benchmark", "sugarcrepe", "winoground", "valse", "spec")
# the probe's kinds as each benchmark's sub-task names
SUBTASKS = {
    "sugarcrepe": {"attribute": "swap_att", "relation": "replace_rel"},
    "valse": {"attribute": "attributes", "relation": "relations"},
    "spec": {"attribute": "attribute", "relation": "relative_position"},
}


def build(
    out: str | Path,
    split: str = "train",
    n: int = 1000,
    size: int = 64,
    seed: int = 0,
    triplets: bool = False,
    shard_size: int = 1000,
    variant: str = "default",
) -> list[Path]:
    """Render ``n`` samples of ``split`` into shards under ``out``; returns the tar paths."""
    if split == "probe" and n % 2:
        raise ValueError("the probe split comes in pairs: --n must be even")
    samples = (make_sample(seed, split, i, size, triplets, variant) for i in range(n))
    tars = write_shards(samples, out, shard_size=shard_size, total=n)
    save_world_tokenizer(Path(out) / "tokenizer.json")
    return tars


def build_clip_benchmark(
    out: str | Path, split: str, n: int, size: int = 64, seed: int = 0, shard_size: int = 1000
) -> Path:
    """``split`` in CLIP_benchmark's webdataset layout under ``out`` (see the module docstring)."""
    from bimac.eval.classification import world_templates

    if split == "probe":
        raise ValueError("the probe split is written with --format sugarcrepe|winoground|...")
    out = Path(out)
    (out / "test").mkdir(parents=True, exist_ok=True)
    classification = split.startswith("cls_")
    writer = wds.ShardWriter(
        str(out / "test" / "%d.tar"), maxcount=shard_size, verbose=0, mtime=TAR_MTIME
    )
    try:
        for i in range(n):
            s = make_sample(seed, split, i, size)
            label = {"cls": str(s["json"]["label_index"])} if classification else {}
            text = {} if classification else {"txt": "\n".join(s["json"]["captions_en"])}
            writer.write({"__key__": s["__key__"], "jpg": s["jpg"], **label, **text})
        shards = writer.shard
    finally:
        writer.close()
    (out / "test" / "nshards.txt").write_text(f"{shards}\n")
    (out / "dataset_type.txt").write_text("classification\n" if classification else "retrieval\n")
    if classification:
        (out / "classnames.txt").write_text("\n".join(class_names(split)) + "\n")
        (out / "zeroshot_classification_templates.txt").write_text(
            "\n".join(t.replace("{}", "{c}") for t in world_templates(split)) + "\n"
        )
    return out


def _probe_pairs(n: int, size: int, seed: int):
    """(pair, kind, [image bytes of member 0, 1], [caption of member 0, 1]) of ``n // 2`` pairs."""
    if n % 2:
        raise ValueError("the probe split comes in pairs: --n must be even")
    for p in range(n // 2):
        members = [make_sample(seed, "probe", 2 * p + m, size) for m in (0, 1)]
        kind = members[0]["json"]["probe"]["kind"]
        yield (
            p,
            kind,
            [s["jpg"] for s in members],
            [s["json"]["captions_en"][0] for s in members],
        )


def build_probe_benchmark(out: str | Path, fmt: str, n: int, size: int = 64, seed: int = 0) -> Path:
    """The probe split as SugarCrepe, Winoground, VALSE or SPEC files under ``out``."""
    out = Path(out)
    tests: dict[str, list] = {}
    for p, kind, images, caps in _probe_pairs(n, size, seed):
        sub = "examples" if fmt == "winoground" else SUBTASKS[fmt][kind]  # one Winoground file
        folder = out / sub if fmt == "spec" else out
        names = []
        for m in (0, 1):
            name = f"ex_{p}_img_{m}" if fmt == "winoground" else f"probe_{p}_{m}.jpg"
            images_dir = folder / ("val2017" if fmt == "sugarcrepe" else "images")  # as published
            path = images_dir / (f"{name}.png" if fmt == "winoground" else name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "winoground":  # Winoground ships PNGs (the same pixels)
                Image.open(io.BytesIO(images[m])).save(path)
            else:
                path.write_bytes(images[m])
            names.append(name)
        rows = tests.setdefault(sub, [])
        if fmt == "winoground":
            rows.append(
                {"id": p, "image_0": names[0], "image_1": names[1], "caption_0": caps[0],
                 "caption_1": caps[1], "tag": kind, "collapsed_tag": kind}
            )  # fmt: skip
        elif fmt == "spec":
            rel = [f"images/{x}" for x in names]
            rows += [({"query": rel[m], "keys": caps, "label": m}, {"query": caps[m], "keys": rel, "label": m}) for m in (0, 1)]  # fmt: skip
        else:
            for m in (0, 1):
                rows.append(
                    {"filename": names[m], "caption": caps[m], "negative_caption": caps[1 - m]}
                    if fmt == "sugarcrepe"
                    else {"dataset": "bimac-world", "linguistic_phenomena": sub,
                          "image_file": names[m], "caption": caps[m],
                          "foil": caps[1 - m], "mturk": {"caption": 3, "foil": 0, "other": 0}}
                )  # fmt: skip
    for sub, rows in tests.items():
        if fmt == "winoground":
            lines = "".join(json.dumps(r) + "\n" for r in rows)
            (out / "examples.jsonl").write_text(lines)
        elif fmt == "spec":
            (out / sub / "image2text.json").write_text(json.dumps([r[0] for r in rows], indent=1))
            (out / sub / "text2image.json").write_text(json.dumps([r[1] for r in rows], indent=1))
        else:
            by_id = {str(i): r for i, r in enumerate(rows)}
            (out / f"{sub}.json").write_text(json.dumps(by_id, indent=1))
    return out


@dataclass
class WorldShardsConfig:
    """What ``python -m shards.world`` writes (``--key value`` or ``key=value``)."""

    out: str = ""  # output folder (required)
    split: Literal[SPLITS] = "train"
    n: int = 1000  # samples (probe: 2 per pair)
    size: int = 64  # image side in pixels
    seed: int = 0
    triplets: bool = False  # add KEY.syn.jpg, KEY.en.txt, KEY.bn.txt
    shard_size: int = 1000  # samples per tar
    # default, or binding: two-group scenes in clusters of 4 that share colours, shapes and
    # counts (bimac.data.world.VARIANTS; the eval reads it as world:SPLIT:N:binding)
    variant: Literal[VARIANTS] = "default"
    # shards (img2dataset layout), clip_benchmark (retrieval / cls_* splits), or a fine-grained
    # benchmark's layout (probe split)
    format: Literal[FORMATS] = "shards"

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out: give the output folder, e.g. --out runs/world/train")
        if self.format != "shards" and self.triplets:
            raise ConfigError("triplets: only with format=shards")
        if self.format != "shards" and self.variant != "default":
            raise ConfigError(
                "variant: only with format=shards (benchmark layouts use the default)"
            )
        if self.format == "clip_benchmark" and self.split == "probe":
            raise ConfigError("format=clip_benchmark writes retrieval or cls_* splits, not probe")
        if self.format not in ("shards", "clip_benchmark") and self.split != "probe":
            raise ConfigError(f"format={self.format} writes the probe split: add --split probe")


PROG = "python -m shards.world"


def main(argv: list[str] | None = None) -> None:
    a = parse_cli(WorldShardsConfig, PROG, __doc__, argv)
    logging.basicConfig(level=logging.INFO)
    try:
        if a.format == "shards":
            build(a.out, a.split, a.n, a.size, a.seed, a.triplets, a.shard_size, a.variant)
        elif a.format == "clip_benchmark":
            build_clip_benchmark(a.out, a.split, a.n, a.size, a.seed, a.shard_size)
        else:
            build_probe_benchmark(a.out, a.format, a.n, a.size, a.seed)
    except ValueError as exn:
        raise ConfigError(str(exn)) from None


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
