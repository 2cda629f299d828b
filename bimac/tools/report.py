"""One markdown page of results: ``bimac report RUN_DIR [RUN_DIR ...] [--out report.md]``.

Walks each run directory for ``summary.json`` (written by the engine at the end of every
training run) and evaluation JSON files (``eval_*.json`` of the fine-tuning stages,
``--out`` files of ``bimac.eval.*``, ``eval_bn.json`` of the PAL captioner), and lays the numbers
out as the papers do: retrieval as BiMAC Table 1 (Flickr / COCO, I->T and T->I R@1/5/10),
captioning as Table 2 (BLEU@4, METEOR, CIDEr, SPICE on COCO and NoCaps), classification as
Table 3 (top-1 per dataset), compositional probes as Table 4 (Winoground text/image/group), PAL's
Bengali scores as its BLEU-1..4 / METEOR / BERTScore table, and any other numbers as they are.
Training curves (``bimac.tools.plots``) of every run with a ``metrics.jsonl`` are embedded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SKIP_DIRS = {"checkpoints", "export", "wandb", "plots", "tokenizer"}
RETRIEVAL = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
CAPTION = [("BLEU-4", "BLEU@4"), ("METEOR", "METEOR"), ("CIDEr-D", "CIDEr"), ("SPICE", "SPICE")]
PROBE = ["text_score", "image_score", "group_score"]
BENGALI = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "BERTScore-F1"]


class NothingToReport(ValueError):
    """The run directories hold no summary, training log or evaluation numbers."""


def find_files(run_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """``(summary.json files, evaluation JSON files, metrics.jsonl files)`` under ``run_dir``."""
    summaries, evals, logs = [], [], []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(files):
            p = Path(root) / f
            if f == "summary.json":
                summaries.append(p)
            elif f == "metrics.jsonl":
                logs.append(p)
            elif f.endswith(".json") and f not in ("grounding.json", "stats.json"):
                evals.append(p)
    return summaries, evals, logs


def records(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Every dict inside ``node`` with its key path (lists of dicts are not descended)."""
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for k, v in node.items():
            out += records(v, (*path, str(k)))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _label(file: Path, base: Path, path: tuple[str, ...]) -> str:
    rel = file.relative_to(base) if file.is_relative_to(base) else file
    return "/".join([str(rel.parent / rel.stem), *path]).lstrip("./")


def _dataset(rec: dict, parents: list[dict]) -> str:
    for d in [rec, *parents[::-1]]:
        for key in ("data", "annotations", "test_data"):
            if isinstance(d.get(key), str):
                return Path(d[key]).name if "/" in d[key] else d[key]
    return "-"


def gather(run_dirs: list[Path]) -> dict[str, list]:
    """Rows of every table, from every run directory."""
    out: dict[str, list] = {
        k: []
        for k in (
            "train",
            "retrieval",
            "caption",
            "classification",
            "probe",
            "bengali",
            "other",
            "plots",
        )
    }
    for run in run_dirs:
        summaries, evals, logs = find_files(run)
        for s in summaries:
            d = json.loads(s.read_text())
            wall, samples = d.get("wall_s"), d.get("samples")
            rate = samples / wall if wall and samples else None
            losses = ", ".join(f"{k} {v:.3f}" for k, v in (d.get("final_losses") or {}).items())
            out["train"].append(
                [
                    _label(s.parent, run.parent, ()),
                    d.get("status"),
                    d.get("step"),
                    samples,
                    d.get("final_loss"),
                    losses or "-",
                    wall,
                    rate,
                ]
            )
        for f in evals:
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError:
                logger.warning("%s: not JSON, skipped", f)
                continue
            _classify(out, f, run.parent, data)
        out["plots"] += [log.parent for log in logs]
    return out


def _classify(out: dict, file: Path, base: Path, data: Any) -> None:
    seen_caption_parents = set()
    for path, rec in records(data):
        parents = [r for p, r in records(data) if p == path[: len(p)] and len(p) < len(path)]
        label = _label(file, base, path)
        if all(k in rec for k in RETRIEVAL):
            out["retrieval"].append([label, _dataset(rec, parents), *(rec[k] for k in RETRIEVAL)])
        elif "CIDEr-D" in rec:
            parent = path[:-1] if path and path[-1] in ("test", "nocaps") else path
            if parent in seen_caption_parents:
                continue
            seen_caption_parents.add(parent)
            holder = dict(records(data))[parent] if parent != path else {}
            coco = holder.get("test", rec) if holder else rec
            nocaps = holder.get("nocaps", {}) if holder else {}
            row = [_label(file, base, parent), _dataset(coco, parents)]
            row += [coco.get(k) for k, _ in CAPTION] + [nocaps.get(k) for k, _ in CAPTION]
            out["caption"].append(row)
        elif "top1" in rec:
            out["classification"].append(
                [
                    label,
                    _dataset(rec, parents),
                    rec["top1"],
                    rec.get("top5"),
                    rec.get("mean_per_class_recall"),
                ]
            )
        elif all(k in rec for k in PROBE):
            out["probe"].append([label, _dataset(rec, parents), *(rec[k] for k in PROBE)])
        elif "BLEU-1" in rec and "CIDEr-D" not in rec:
            out["bengali"].append([label, *(rec.get(k) for k in BENGALI)])
        elif not path and not any(isinstance(v, dict) for v in rec.values()):
            nums = {
                k: v
                for k, v in rec.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if nums:
                out["other"].append([label, ", ".join(f"{k} {_fmt(v)}" for k, v in nums.items())])


def render(run_dirs: list[Path], out_file: Path) -> str:
    """The markdown page (plots written beside ``out_file`` in ``<stem>_plots/``)."""
    from bimac.tools.plots import plot_run

    rows = gather(run_dirs)
    if not any(rows.values()):
        raise NothingToReport(
            f"nothing to report under {', '.join(map(str, run_dirs))}: no summary.json, "
            "metrics.jsonl or evaluation JSON; give a run's train.output_dir or the --out folder "
            "of bimac eval"
        )
    parts = ["# Results", "", "Runs: " + ", ".join(f"`{r}`" for r in run_dirs), ""]
    sections = [
        (
            "Training runs",
            [
                "run",
                "status",
                "steps",
                "samples",
                "final loss",
                "final loss terms",
                "wall s",
                "samples/s",
            ],
            "train",
        ),
        (
            "Image-text retrieval (as BiMAC Table 1)",
            ["run", "data", "I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10"],
            "retrieval",
        ),
        (
            "Captioning (as BiMAC Table 2)",
            [
                "run",
                "data",
                *(f"COCO {n}" for _, n in CAPTION),
                *(f"NoCaps {n}" for _, n in CAPTION),
            ],
            "caption",
        ),
        (
            "Classification (as BiMAC Table 3; top-1 %)",
            ["run", "data", "top-1", "top-5", "mean per-class recall"],
            "classification",
        ),
        (
            "Compositional probe (as BiMAC Table 4, Winoground scores)",
            ["run", "data", "text", "image", "group"],
            "probe",
        ),
        ("Bengali captioning (as PAL's table)", ["run", *BENGALI], "bengali"),
        ("Other numbers", ["file", "values"], "other"),
    ]
    for title, header, key in sections:
        if rows[key]:
            parts += [f"## {title}", "", table(header, rows[key]), ""]
    if rows["plots"]:
        plot_dir = out_file.parent / f"{out_file.stem}_plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        parts += ["## Training curves", ""]
        for i, run in enumerate(rows["plots"]):
            png = plot_run(run, plot_dir / f"{i:02d}_{run.name}.png")
            if png is not None:
                rel = os.path.relpath(png, out_file.parent)
                parts += [f"### {run}", "", f"![training curves of {run.name}]({rel})", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(
        prog="bimac report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("run_dirs", nargs="+", help="run directories (train.output_dir of any stage)")
    ap.add_argument(
        "--out",
        default="report.md",
        help="markdown file; plots go to <stem>_plots/ beside it (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    dirs = [Path(d) for d in args.run_dirs]
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise SystemExit(f"bimac report: {missing[0]} is not a directory")
    try:
        page = render(dirs, Path(args.out))
    except NothingToReport as exn:
        raise SystemExit(f"bimac report: {exn}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
