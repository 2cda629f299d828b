"""``make tables``: the papers' ablation tables on the embedded world, with seeds and error bars.

    python -m cli.tables [--config configs/tables.yaml] [--out runs/tables] [--seeds 3] [--jobs 2]

1. data: renders the world's pretraining and triplet shards under ``<out>/world`` (as the demo);
2. runs every cell of BiMAC Tables 5 and 6 (``python -m pretrain``, then
   ``python -m bimac.eval.world`` on its export) and PAL Tables 3 and 1
   (``python -m finetune.caption_bn``) ``seeds`` times as local one-process jobs, ``jobs`` at a
   time; a run that finished is not run again, so an interrupted ``make tables`` continues, and a
   cell whose config equals another table's (Table 6's λ = 0.7 is Table 5's full row) runs once;
3. writes the tables (mean ± std over seeds, Welch's t-test against each table's baseline row,
   the papers' numbers beside them, one sentence per component) between the ``tables`` markers
   of ``RESULTS.md``, and one bar chart per table (``docs/results/<table>.png``).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from bimac.config import ConfigError, parse_cli, run_main
from bimac.tools import grid as grids
from bimac.tools.grid import Cell

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- make tables: begin -->", "<!-- make tables: end -->"


@dataclass(frozen=True)
class Table:
    """One table: the grid that makes its rows, their labels, its baseline row, the metric
    columns (run metric key -> header), the paper's rows, and the components it measures."""

    grid: str
    title: str
    rows: dict[str, str]  # cell -> row label, in the paper's order
    baseline: str
    columns: dict[str, str]
    paper_title: str
    paper_columns: list[str]
    paper: dict[str, list[float]]  # cell -> the paper's numbers for paper_columns
    # (run metric, paper column) pairs each component's sentence compares
    headline: list[tuple[str, str]] = field(default_factory=list)
    # (component, cell without it, cell with it)
    components: list[tuple[str, str, str]] = field(default_factory=list)
    note: str = ""  # a sentence under the table (what it does not measure, and why)


WORLD_COLUMNS = {
    "retrieval/mTR": "mTR",
    "retrieval/mIR": "mIR",
    "cls_shape/top1": "shape top-1",
    "cls_colour_shape/top1": "colour-shape top-1",
    "probe/text_score": "probe text",
    "probe/image_score": "probe image",
    "probe/group_score": "probe group",
    "pointing_game": "pointing game",  # a fraction in training's metrics: shown in %
}
PERCENT_OF_FRACTION = {"pointing_game"}
BENGALI_COLUMNS = {k: k for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR")}
BIMAC_PAPER = ["Flickr mTR", "Flickr mIR", "COCO mTR", "COCO mIR", "ImageNet", "CIFAR10", "Caltech"]
BIMAC_HEADLINE = [("retrieval/mTR", "Flickr mTR"), ("retrieval/mIR", "Flickr mIR")]
PAL_PAPER = ["B1", "B2", "B3", "B4", "METEOR", "BERT-F1"]
NO_BERTSCORE = (
    "No BERTScore column: it needs a pretrained multilingual BERT (bert_score's default for "
    "Bengali, `bert-base-multilingual-cased`), which is not on this machine and is not downloaded "
    "at run time, and a random-weight one would score nothing. With such a model at hand, "
    "`eval.bertscore_model=<hub name or local path>` in `caption_overrides` adds BERTScore-F1 to "
    "each PAL run's `eval_bn.json` (not yet a column here)."
)

TABLES = {
    "table5": Table(
        grid="table5",
        title="BiMAC Table 5: training objectives",
        rows={
            "mcl": "MCL (CoCa)",
            "mcl_cg": "MCL + CG",
            "mcl_cg_rf": "MCL + CG + RF",
            "mcl_cg_rf_git": "MCL + CG + RF + GIT",
            "mcl_cg_git_grounding": "MCL + CG + GIT + grounding",
            "full": "MCL + CG + RF + GIT + grounding (BiMAC)",
        },
        baseline="mcl",
        columns=WORLD_COLUMNS,
        headline=BIMAC_HEADLINE,
        paper_title="BiMAC paper, Table 5 (pretrained on CC15M; zero-shot)",
        paper_columns=BIMAC_PAPER,
        paper={
            "mcl": [60.7, 51.4, 31.7, 30.5, 29.1, 67.4, 64.8],
            "mcl_cg": [65.9, 54.7, 34.5, 33.2, 28.2, 66.3, 65.1],
            "mcl_cg_rf": [67.6, 56.8, 36.1, 35.4, 29.7, 67.2, 66.5],
            "mcl_cg_rf_git": [68.7, 58.6, 37.5, 35.8, 30.6, 67.9, 67.4],
            "mcl_cg_git_grounding": [68.9, 59.1, 37.8, 36.3, 31.2, 68.4, 67.5],
            "full": [69.4, 59.5, 38.4, 36.9, 31.6, 68.5, 67.5],
        },
        components=[
            ("CG (caption generation)", "mcl", "mcl_cg"),
            ("RF (CIDEr reward)", "mcl_cg", "mcl_cg_rf"),
            ("GIT (text-guided reconstruction)", "mcl_cg_rf", "mcl_cg_rf_git"),
            ("grounding", "mcl_cg_rf_git", "full"),
            ("RF, with grounding", "mcl_cg_git_grounding", "full"),
            ("all four over MCL alone", "mcl", "full"),
        ],
    ),
    "table6": Table(
        grid="table6",
        title="BiMAC Table 6: λ_GIT",
        rows={f"lambda_git={v:g}": f"λ_GIT = {v:g}" for v in grids.TABLE6_LAMBDAS},
        baseline="lambda_git=0.7",
        columns=WORLD_COLUMNS,
        headline=BIMAC_HEADLINE,
        paper_title="BiMAC paper, Table 6 (pretrained on CC15M; zero-shot)",
        paper_columns=BIMAC_PAPER,
        paper={
            "lambda_git=0.1": [69.1, 59.1, 37.9, 35.8, 30.5, 65.7, 67.4],
            "lambda_git=0.4": [69.5, 59.4, 38.2, 36.5, 31.4, 66.9, 67.8],
            "lambda_git=0.7": [69.4, 59.5, 38.4, 36.9, 31.6, 68.5, 67.5],
            "lambda_git=1": [69.2, 59.5, 38.1, 36.7, 31.8, 68.9, 67.1],
            "lambda_git=1.5": [68.7, 58.2, 37.3, 35.4, 30.7, 67.1, 66.5],
        },
        components=[
            ("λ_GIT = 0.1 instead of 0.7", "lambda_git=0.7", "lambda_git=0.1"),
            ("λ_GIT = 1.5 instead of 0.7", "lambda_git=0.7", "lambda_git=1.5"),
        ],
    ),
    "pal_table3": Table(
        grid="pal_table3",
        title="PAL Table 3: training variants of the Bengali captioner",
        rows={
            "ce_real": "CE (real only)",
            "ce_real_syn": "CE (real + synthetic)",
            "ce_infonce": "CE + InfoNCE",
            "ce_infonce_ot": "CE + InfoNCE + OT",
            "pal": "PAL",
            "pal_infonce": "PAL + InfoNCE",
            "pal_infonce_ot": "PAL + InfoNCE + OT",
        },
        baseline="ce_real",
        columns=BENGALI_COLUMNS,
        headline=[("BLEU-4", "B4")],
        paper_title="PAL paper, Table 3 (Flickr30k-1k, out-of-domain)",
        paper_columns=PAL_PAPER,
        note=NO_BERTSCORE,
        paper={
            "ce_real": [36.57, 23.81, 12.37, 5.80, 24.96, 68.38],
            "ce_real_syn": [40.34, 24.46, 12.93, 5.91, 24.51, 68.69],
            "ce_infonce": [43.60, 25.67, 11.98, 7.50, 24.99, 69.70],
            "ce_infonce_ot": [42.56, 24.00, 11.85, 7.52, 26.22, 70.21],
            "pal": [46.53, 27.80, 16.30, 10.19, 27.29, 70.97],
            "pal_infonce": [46.86, 27.96, 16.57, 10.34, 27.49, 70.69],
            "pal_infonce_ot": [49.14, 29.64, 18.11, 12.29, 27.98, 71.20],
        },
        components=[
            ("synthetic images", "ce_real", "ce_real_syn"),
            ("InfoNCE on CE", "ce_real_syn", "ce_infonce"),
            ("OT on CE + InfoNCE", "ce_infonce", "ce_infonce_ot"),
            ("PAL instead of CE + InfoNCE + OT", "ce_infonce_ot", "pal"),
            ("InfoNCE on PAL", "pal", "pal_infonce"),
            ("OT on PAL + InfoNCE", "pal_infonce", "pal_infonce_ot"),
        ],
    ),
    "pal_table1": Table(
        grid="pal_table1",
        title="PAL Table 1: PAL + InfoNCE + OT against re-implemented captioners",
        rows={
            "pal_infonce_ot": "PAL + InfoNCE + OT",
            "vit_gpt2": "ViT + GPT-2-style decoder",
            "cnn_lstm": "CNN + LSTM",
        },
        baseline="pal_infonce_ot",
        columns=BENGALI_COLUMNS,
        headline=[("BLEU-4", "B4")],
        paper_title="PAL paper, Table 1 (Flickr30k-1k, out-of-domain)",
        paper_columns=PAL_PAPER,
        note=NO_BERTSCORE,
        paper={
            "pal_infonce_ot": [48.01, 28.59, 17.19, 10.85, 27.64, 71.20],
            "vit_gpt2": [26.84, 12.32, 4.68, 3.21, 26.62, 57.34],
            "cnn_lstm": [28.03, 15.45, 6.51, 3.98, 22.57, 70.98],
        },
        components=[
            ("PAL + InfoNCE + OT over ViT + GPT-2", "vit_gpt2", "pal_infonce_ot"),
            ("PAL + InfoNCE + OT over CNN + LSTM", "cnn_lstm", "pal_infonce_ot"),
        ],
    ),
}


@dataclass
class TablesConfig:
    """What ``make tables`` runs (``configs/tables.yaml``; ``--key value`` or ``key=value``)."""

    out: str = "runs/tables"  # shards, runs and per-grid tables
    tables: list[str] = field(default_factory=lambda: list(TABLES))
    seeds: int = 3
    jobs: int = 2  # runs at a time, one process each
    pretrain_config: str = "configs/pretrain/tiny.yaml"
    caption_config: str = "configs/finetune/caption_bn/tiny.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)  # applied to every BiMAC cell
    caption_overrides: list[str] = field(default_factory=list)  # applied to every PAL cell
    world_size: int = 64  # image side of the rendered world
    world_seed: int = 0
    world_variant: str = "default"  # of the pretraining world (bimac.data.world.VARIANTS)
    world_train: int = 2000  # pretraining samples rendered
    world_shard_size: int = 500  # samples per shard (data.streams needs as many shards)
    bengali_train: int = 2000  # PAL training triplets rendered (held-out: the demo's 200)
    rows: dict[str, list[str]] = field(default_factory=dict)  # table -> only these rows
    eval_args: list[str] = field(default_factory=list)  # extra `python -m bimac.eval.world` args
    results: str = "RESULTS.md"
    figures: str = "docs/results"
    collect_only: bool = False  # run nothing: write the tables from the runs that finished


def table_cells(cfg: TablesConfig, table: Table, data: dict[str, str]) -> list[Cell]:
    """The table's cells on the tables' configs and world data, before seeds."""
    pretrain = table.grid in ("table5", "table6")
    config = cfg.pretrain_config if pretrain else cfg.caption_config
    overrides = [
        *(cfg.pretrain_overrides if pretrain else cfg.caption_overrides),
        *(
            [f"data.train_shards={data['train']}", f"tokenizer.path={data['tokenizer']}"]
            if pretrain
            else [f"data.train_shards={data['bn_train']}", f"data.val_shards={data['bn_val']}"]
        ),
        "train.resume=auto",
    ]
    cells = grids.grid_cells(table.grid, config)
    only = cfg.rows.get(table.grid)
    if only:
        unknown = sorted(set(only) - set(table.rows))
        if unknown:
            raise ConfigError(f"rows.{table.grid}: unknown rows {unknown}: of {list(table.rows)}")
        cells = [c for c in cells if c.name in only]
    for cell in cells:
        cell.overrides += overrides
    return cells


def build_data(out: Path, cfg: TablesConfig) -> dict[str, str]:
    """The world's shards the tables need: the pretraining train split and its tokenizer for
    BiMAC's tables, the PAL triplets (train, held-out) for PAL's; rendered once under
    ``<out>/world``."""
    from cli.demo import BENGALI_SPLITS, build_world, check_world

    world = out / "world"
    done = world / "patterns.json"
    data = json.loads(done.read_text()) if done.is_file() else {}
    if any(t in ("table5", "table6") for t in cfg.tables) and "train" not in data:
        from shards.world import build

        shards = world / "bimac" / "train"
        tars = build(shards, "train", cfg.world_train, cfg.world_size, cfg.world_seed,
                     shard_size=cfg.world_shard_size, variant=cfg.world_variant)  # fmt: skip
        data["train"] = str(shards / f"{{00000..{len(tars) - 1:05d}}}.tar")
        check_world(world / "bimac", {"train": data["train"]})
        data["tokenizer"] = str(shards / "tokenizer.json")
    if any(t.startswith("pal_") for t in cfg.tables) and "bn_train" not in data:
        bn = build_world(world / "bengali", cfg.world_size, cfg.world_seed, bengali=True,
                         splits={"train": cfg.bengali_train, "val": BENGALI_SPLITS["val"]})  # fmt: skip
        check_world(world / "bengali", bn, triplets=True)
        data["bn_train"], data["bn_val"] = bn["train"], bn["val"]
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(data, indent=1))
    return data


def _config_key(cell: Cell) -> str:
    """What a run computes: its config without the output directory and run name."""
    cfg = grids.cell_config(cell)
    train = replace(cfg.train, output_dir="", run_name="")
    return repr(replace(cfg, train=train))


def plan(cfg: TablesConfig, data: dict[str, str]) -> dict[str, dict[str, list[Cell]]]:
    """Table -> row -> the row's seeded runs; a run is named ``<table>.<row>-seed<k>`` after the
    first table whose row has its config (one run serves every table that has that row)."""
    seen: dict[str, str] = {}
    planned: dict[str, dict[str, list[Cell]]] = {}
    for name in cfg.tables:
        if name not in TABLES:
            raise ConfigError(f"tables: unknown table {name!r}: one of {', '.join(TABLES)}")
        cells = table_cells(cfg, TABLES[name], data)
        grids.check_cells(cells)
        planned[name] = {}
        for cell in cells:
            shared = seen.setdefault(_config_key(cell), f"{name}.{cell.name}")
            planned[name][cell.name] = grids.with_seeds([replace(cell, name=shared)], cfg.seeds)
    return planned


# the module each cell's entry runs (one process locally)
ENTRY_MODULES = {"pretrain": "pretrain", "caption_bn": "finetune.caption_bn"}


def commands(cell: Cell, runs_dir: Path, cfg: TablesConfig) -> list[list[str]]:
    """A run's commands: its training, then, for BiMAC, its evaluation on the world."""
    train = [sys.executable, "-m", ENTRY_MODULES[cell.entry], "--config", cell.config,
             *cell.run_overrides(runs_dir)]  # fmt: skip
    if cell.entry != "pretrain":
        return [train]
    run_dir = runs_dir / cell.name
    return [
        train,
        [sys.executable, "-m", "bimac.eval.world", "--checkpoint", str(run_dir / "export"),
         "--out", str(run_dir / "eval_world.json"), *cfg.eval_args],
    ]  # fmt: skip


EVALUATIONS = {"pretrain": ["eval_world.json"], "caption_bn": ["eval_bn.json"]}


def run_all(cfg: TablesConfig, planned: dict[str, dict[str, list[Cell]]], runs_dir: Path) -> float:
    """Every planned run once (finished ones are skipped); returns the wall time in seconds."""
    unique: dict[str, Cell] = {}
    for rows in planned.values():
        for cells in rows.values():
            for cell in cells:
                unique.setdefault(cell.name, cell)
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "grid.json").write_text(json.dumps({"runs": list(unique)}, indent=1))
    jobs = [(c, commands(c, runs_dir, cfg)) for c in unique.values()]
    t0 = time.time()
    codes = grids.run_local(jobs, runs_dir, cfg.jobs, EVALUATIONS)
    failed = {name: code for name, code in codes.items() if code}
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {failed}; see <run>/run.log under {runs_dir}")
    return time.time() - t0


def row_values(
    rows: dict[str, list[Cell]], runs: dict[str, dict], key: str
) -> dict[str, list[float]]:
    """Row -> the per-seed values of one metric (loss terms and evaluation scores alike)."""
    out = {}
    for row, cells in rows.items():
        values = []
        for cell in cells:
            summary = runs.get(cell.name, {})
            merged = {**summary.get("final_losses", {}), **summary.get("final_metrics", {})}
            values.append(merged.get(key))
        scale = 100.0 if key in PERCENT_OF_FRACTION else 1.0
        out[row] = [scale * v for v in grids.numbers(values)]
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(paper_delta: float, world: list[float], base: list[float]) -> str:
    """Does the world reproduce the paper's direction, and how sure is it (Welch's t-test)."""
    if not world or not base:
        return "not measured"
    delta = statistics.fmean(world) - statistics.fmean(base)
    p = grids.welch_p(world, base) if len(world) > 1 and len(base) > 1 else float("nan")
    sure = f"p = {p:.2g}"
    if paper_delta == 0:
        return f"paper: no change; world {delta:+.2f} ({sure})"
    same = (delta > 0) == (paper_delta > 0) and delta != 0
    beyond = p < grids.SIGNIFICANCE
    if same:
        return ("reproduced" if beyond else "same direction, within seed noise") + f" ({sure})"
    return ("opposite direction, beyond seed noise" if beyond else
            "not reproduced (opposite direction, within seed noise)") + f" ({sure})"  # fmt: skip


def render_table(name: str, table: Table, rows: dict[str, list[Cell]], runs: dict[str, dict],
                 figure: str | None) -> str:  # fmt: skip
    """One table's markdown: the world's numbers, the paper's, and a sentence per component."""
    values = {key: row_values(rows, runs, key) for key in table.columns}
    labels = {row: label for row, label in table.rows.items() if row in rows}
    lines = [f"### {table.title}", ""]
    head = ["row", "seeds", *table.columns.values()]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, label in labels.items():
        done = sum(1 for c in rows[row] if runs.get(c.name, {}).get("status") == "completed")
        cells = [label, str(done)]
        for key in table.columns:
            v, base = values[key].get(row, []), values[key].get(table.baseline, [])
            if not v:
                cells.append("")
                continue
            mean, std = _mean_std(v)
            mark = (
                " *"
                if row != table.baseline and len(v) > 1 and len(base) > 1 and grids.differs(v, base)
                else ""
            )
            cells.append(f"{mean:.2f} ± {std:.2f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"mean ± sample standard deviation over seeds; `*`: differs from the "
        f"`{table.rows[table.baseline]}` row by Welch's t-test (SciPy "
        f"`ttest_ind(equal_var=False)`) at p < {grids.SIGNIFICANCE}.",
        *(["", table.note] if table.note else []),
        "",
        f"{table.paper_title}, for comparison (the paper's numbers, not measured here):",
        "",
        "| row | " + " | ".join(table.paper_columns) + " |",
        "|" + "---|" * (len(table.paper_columns) + 1),
    ]
    for row, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(f"{v:g}" for v in table.paper[row]) + " |")
    lines += ["", "Per component (the world's change against the paper's):", ""]
    for component, without, with_ in table.components:
        if without not in rows or with_ not in rows:
            continue
        parts = []
        for key, paper_col in table.headline:
            i = table.paper_columns.index(paper_col)
            paper_delta = table.paper[with_][i] - table.paper[without][i]
            w, b = values[key].get(with_, []), values[key].get(without, [])
            world = f"{statistics.fmean(w) - statistics.fmean(b):+.2f}" if w and b else "n/a"
            parts.append(f"{table.columns[key]}: paper {paper_delta:+.2f} ({paper_col}), world "
                         f"{world}, {verdict(paper_delta, w, b)}")  # fmt: skip
        lines.append(f"- **{component}** ({table.rows[with_]} vs {table.rows[without]}): "
                     + "; ".join(parts) + ".")  # fmt: skip
    if figure:
        lines += ["", f"![{table.title}]({figure})"]
    return "\n".join(lines) + "\n"


def plot_table(table: Table, rows: dict[str, list[Cell]], runs: dict[str, dict], png: Path) -> None:
    """Grouped bars (one group per metric, one bar per row) with the seeds' std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(table.columns)
    labels = {row: label for row, label in table.rows.items() if row in rows}
    fig, ax = plt.subplots(figsize=(min(12, max(6, 1.4 * len(keys) * len(labels) / 4)), 3.8))
    width = 0.8 / len(labels)
    for j, (row, label) in enumerate(labels.items()):
        stats = [_mean_std(row_values(rows, runs, k)[row] or [float("nan")]) for k in keys]
        x = np.arange(len(keys)) + (j - (len(labels) - 1) / 2) * width
        ax.bar(x, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, label=label)
    ax.set_xticks(np.arange(len(keys)), [table.columns[k] for k in keys], rotation=20, ha="right")
    ax.set_title(table.title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_results(cfg: TablesConfig, planned, runs_dir: Path, wall_s: float) -> str:
    """The tables section of RESULTS.md (between the markers) and the figures."""
    runs = grids.load_runs(runs_dir)
    names = {c.name for rows in planned.values() for cs in rows.values() for c in cs}
    times = [runs_dir / n / "run_time.json" for n in names]
    run_s = sum(json.loads(t.read_text())["wall_s"] for t in times if t.is_file())
    done = sum(1 for n in names if runs.get(n, {}).get("status") == "completed")
    load = os.getloadavg()
    invocation = (
        f"; this invocation took {wall_s / 60:.0f} min of wall time (runs finished earlier are "
        f"not rerun)" if wall_s else ""
    )  # fmt: skip
    lines = [
        BEGIN,
        "## The papers' tables on the embedded world (`make tables`)",
        "",
        f"Made by `make tables` (`python -m cli.tables --config configs/tables.yaml`), "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, on this machine ({os.cpu_count()} CPU "
        f"cores, no GPU): {cfg.seeds} seeds per row, {done} of the {len(names)} runs finished (a "
        f"row's `seeds` column counts its finished runs), {cfg.jobs} at a time, one process "
        f"each; the finished runs took {run_s / 60:.0f} min of wall time summed over runs "
        f"(training and evaluation){invocation}; load average at the end {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f}.",
        "",
    ]
    for name, rows in planned.items():
        table = TABLES[name]
        png = Path(cfg.figures) / f"{name}.png"
        plot_table(table, rows, runs, REPO / png if not png.is_absolute() else png)
        lines.append(render_table(name, table, rows, runs, png.as_posix()))
    lines.append(END)
    section = "\n".join(lines) + "\n"
    results = Path(cfg.results)
    text = results.read_text() if results.is_file() else "# Results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)
    return section


PROG = "python -m cli.tables"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(TablesConfig, PROG, __doc__, argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    out = Path(cfg.out).resolve()
    data = build_data(out, cfg)
    planned = plan(cfg, data)
    n = len({c.name for rows in planned.values() for cs in rows.values() for c in cs})
    log.info("%d runs for %s (%d seeds each row)", n, ", ".join(planned), cfg.seeds)
    wall_s = 0.0 if cfg.collect_only else run_all(cfg, planned, out / "runs")
    write_results(cfg, planned, out / "runs", wall_s)
    log.info("tables written to %s, figures to %s (%.0f s)", cfg.results, cfg.figures, wall_s)


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
