"""Winoground-style compositional probe: text, image and group scores (Thrush et al. 2022), and
the fine-grained benchmarks in their published formats (``bimac.eval.benchmarks``).

    python -m bimac.eval.probe --checkpoint CKPT --data world:probe:N [--out p.json]
    python -m bimac.eval.probe --checkpoint CKPT --format sugarcrepe|winoground|valse|spec \
        --data DIR [--images DIR] [--out 'results/{dataset}.json']

Each example has two images and two captions, caption i describing image i. With ``s(c, i)``:
text score: ``s(c0,i0) > s(c1,i0)`` and ``s(c1,i1) > s(c0,i1)``; image score:
``s(c0,i0) > s(c0,i1)`` and ``s(c1,i1) > s(c1,i0)``; group: both. Ties fail (strict ``>``).

``--data``: the embedded world's probe split (``world:probe:N``, N pairs) or shards in the same
format (``json.probe = {pair, member, kind}``, caption ``json.captions_en[0]`` or ``txt``), or
with ``--format`` a benchmark folder; then every sub-task is scored and ``--out`` writes one
CLIP_benchmark result JSON per sub-task (``{dataset}`` in the name is replaced).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from bimac.data.loader import SkipCounter
from bimac.data.samples import iter_samples
from bimac.eval import benchmarks
from bimac.eval.common import (
    Encoder,
    add_model_args,
    embed_images,
    embed_texts,
    encoder_from_args,
    markdown_table,
    note_skips,
    report,
)


def winoground_scores(sim: torch.Tensor) -> dict[str, float]:
    """``sim [N, 2, 2]`` with ``sim[n, c, i] = s(caption c, image i)`` -> scores in %."""
    if sim.ndim != 3 or sim.shape[1:] != (2, 2):
        raise ValueError(f"expected similarities [N, 2, 2], got {tuple(sim.shape)}")
    s = benchmarks.selection_scores(list(sim.transpose(1, 2)))  # [image, caption] per test
    return {"text_score": s["text_acc"], "image_score": s["image_acc"], "group_score": s["acc"]}


def shard_examples(
    spec: str, counter: SkipCounter | None = None
) -> tuple[list, list[str], list[str]]:
    """Images, captions (index 2n + member) and kinds of complete pairs."""
    pairs: dict[int, dict[int, tuple[bytes, str]]] = defaultdict(dict)
    kinds: dict[int, str] = {}
    for s in iter_samples(spec, counter=counter):
        meta = s.get("json") or {}
        probe = meta.get("probe")
        if not probe:
            raise ValueError(f"sample {s.get('__key__')} has no json.probe {{pair, member}}")
        caption = (meta.get("captions_en") or [s.get("txt")])[0]
        pairs[probe["pair"]][probe["member"]] = (s["jpg"], caption)
        kinds[probe["pair"]] = probe.get("kind", "all")
    images, captions, kind_list = [], [], []
    for p in sorted(pairs):
        if set(pairs[p]) != {0, 1}:
            raise ValueError(f"probe pair {p} is incomplete (members {sorted(pairs[p])})")
        for m in (0, 1):
            images.append(pairs[p][m][0])
            captions.append(pairs[p][m][1])
        kind_list.append(kinds[p])
    return images, captions, kind_list


def evaluate(encoder: Encoder, images, captions, kinds, batch_size: int = 256) -> dict:
    img = embed_images(encoder, images, batch_size, total=len(images))
    img = img.view(len(kinds), 2, -1)
    txt = embed_texts(encoder, captions, batch_size).view(len(kinds), 2, -1)
    sim = torch.einsum("ncd,nid->nci", txt, img)  # sim[n, c, i] = <caption c, image i>
    out = winoground_scores(sim)
    for kind in sorted(set(kinds)):
        mask = torch.tensor([k == kind for k in kinds])
        for name, value in winoground_scores(sim[mask]).items():
            out[f"{kind}_{name}"] = value
    out.update(examples=len(kinds), model=encoder.name)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="bimac eval probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(ap)
    ap.add_argument("--data", required=True, help="world:probe:N, shards, or a benchmark folder")
    ap.add_argument(
        "--format", choices=sorted(benchmarks.READERS), help="--data is this benchmark's layout"
    )
    ap.add_argument("--images", help="image folder, where the format's default is not it")
    args = ap.parse_args(argv)
    if args.format:
        return run_benchmark(args)
    counter = SkipCounter()
    try:
        images, captions, kinds = shard_examples(args.data, counter)
    except (OSError, ValueError) as exn:
        raise SystemExit(f"bimac eval probe: {exn}") from None
    results = evaluate(encoder_from_args(args), images, captions, kinds, args.batch_size)
    results["data"] = args.data
    note_skips(results, counter)
    report(results, args.out, "Compositional probe (Winoground-style)")
    return results


def run_benchmark(args: argparse.Namespace) -> dict:
    """``--format``: score every sub-task, print one table, write CLIP_benchmark result JSONs."""
    try:
        subsets = benchmarks.READERS[args.format](args.data, args.images)
        scores = benchmarks.evaluate_selection(encoder_from_args(args), subsets, args.batch_size)
    except (OSError, ValueError) as exn:
        raise SystemExit(f"bimac eval probe: {exn}") from None
    print(f"### {args.format} ({args.data})\n")
    print(markdown_table([{"subset": k, **v} for k, v in scores.items()]))
    model = benchmarks.model_names(args)
    results = [
        benchmarks.clip_benchmark_result(
            s.dataset,
            "image_caption_selection",
            {k: v / 100.0 for k, v in scores[s.name].items() if k.endswith("acc")},
            model,
        )
        for s in subsets
    ]
    if args.out:
        try:
            benchmarks.write_results(args.out, results)
        except ValueError as exn:
            raise SystemExit(f"bimac eval probe: {exn}") from None
    return scores


if __name__ == "__main__":
    main()
