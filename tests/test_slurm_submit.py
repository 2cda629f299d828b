"""Grids (``bimac.tools.grid``): cells, the markdown table, and a 2-cell grid through
``slurm/submit.py`` on submitit's local executor."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bimac.tools import grid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory) -> list[str]:
    from test_engine_pretrain import world_overrides

    return world_overrides(tmp_path_factory.mktemp("world"))


def test_table6_cells_are_the_paper_lambdas():
    cells = grid.grid_cells("table6", "configs/pretrain/tiny.yaml")
    assert [c.overrides for c in cells] == [
        [f"objectives.lambda_git={v}"] for v in (0.1, 0.4, 0.7, 1.0, 1.5)
    ]
    assert cells[0].name == "lambda_git=0.1"


def test_table5_cells_follow_the_paper_rows():
    cells = grid.grid_cells("table5", "configs/pretrain/paper.yaml")
    assert [c.name for c in cells] == ["mcl", "mcl_cg", "mcl_cg_rf", "mcl_cg_rf_git",
                                       "mcl_cg_git_grounding", "full"]  # fmt: skip
    assert all(c.config == "configs/pretrain/paper.yaml" for c in cells)
    assert (
        "objectives.cg=false" in cells[0].overrides and "objectives.mcl=true" in cells[0].overrides
    )


def test_pal_grids_run_the_captioner_with_each_rows_losses():
    config = "configs/finetune/caption_bn/tiny.yaml"
    table3 = grid.grid_cells("pal_table3", config)
    assert [c.name for c in table3] == ["ce_real", "ce_real_syn", "ce_infonce", "ce_infonce_ot",
                                        "pal", "pal_infonce", "pal_infonce_ot"]  # fmt: skip
    assert {c.entry for c in table3} == {"caption_bn"} and {c.config for c in table3} == {config}
    assert "losses.ce_syn=false" in table3[0].overrides  # real images only
    table4 = grid.grid_cells("pal_table4", config)
    assert len(table4) == 4 and all(c.overrides for c in table4)
    with pytest.raises(ValueError, match="unknown grid"):
        grid.grid_cells("table7", config)


def test_pal_table1_is_the_full_pal_row_and_the_two_baselines():
    """PAL Table 1: PAL + InfoNCE + OT (Table 3's last preset, as PAL) and the ViT + GPT-2 and
    CNN + LSTM captioners, each a caption_bn cell whose config loads (check_cells)."""
    config = "configs/finetune/caption_bn/tiny.yaml"
    cells = grid.grid_cells("pal_table1", config)
    assert [c.name for c in cells] == ["pal_infonce_ot", "vit_gpt2", "cnn_lstm"]
    assert {c.entry for c in cells} == {"caption_bn"} and {c.config for c in cells} == {config}
    (pal_row,) = [c for c in grid.grid_cells("pal_table3", config) if c.name == "pal_infonce_ot"]
    assert cells[0].overrides == [*pal_row.overrides, "model.architecture=pal"]
    assert cells[1].overrides == ["model.architecture=vit_gpt2"]
    assert cells[2].overrides == ["model.architecture=cnn_lstm"]
    grid.check_cells(cells)


def test_collect_makes_one_row_per_summary(tmp_path):
    for name, loss, pg in (("a", 1.5, 0.25), ("b", 2.0, None)):
        (tmp_path / name).mkdir()
        summary = {
            "status": "completed",
            "step": 4,
            "samples": 64,
            "final_loss": loss,
            "final_losses": {"mcl": loss},
            "final_metrics": {} if pg is None else {"pointing_game": pg},
            "skipped": {"nonfinite_loss": 1},
            "wall_s": 3.0,
        }
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    table = grid.collect(tmp_path).splitlines()
    assert (
        table[0]
        == "| cell | status | steps | samples | loss | mcl | pointing_game | skipped | wall s |"
    )
    assert table[2] == "| a | completed | 4 | 64 | 1.5000 | 1.5000 | 0.2500 | 1 | 3.0000 |"
    assert table[3] == "| b | completed | 4 | 64 | 2.0000 | 2.0000 |  | 1 | 3.0000 |"
    assert (tmp_path / "results.md").read_text().splitlines() == table


def _write_summary(run_dir: Path, loss: float, pg: float) -> None:
    run_dir.mkdir(parents=True)
    summary = {"status": "completed", "step": 4, "samples": 64, "final_loss": loss,
               "final_losses": {"mcl": loss}, "final_metrics": {"pointing_game": pg},
               "skipped": {}, "wall_s": 3.0}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_collect_writes_mean_and_std_over_seeds_and_marks_only_beyond_the_spread(tmp_path):
    """Two seeds per cell: mean ± sample std by hand; ``*`` where Welch's t-test against the
    baseline (the first cell of grid.json, not the alphabetical first) gives p < 0.05."""
    # base: loss 1.0/1.2, pg 0.50/0.52; far: loss 3.0/3.01 (beyond), pg 0.40/0.64 (within)
    for cell, losses, pgs in (
        ("z_base", (1.0, 1.2), (0.5, 0.52)),
        ("a_far", (3.0, 3.01), (0.4, 0.64)),
    ):
        for seed, (loss, pg) in enumerate(zip(losses, pgs)):
            _write_summary(tmp_path / f"{cell}-seed{seed}", loss, pg)
    (tmp_path / "grid.json").write_text(json.dumps({"runs": ["z_base-seed0", "z_base-seed1",
                                                             "a_far-seed0", "a_far-seed1"]}))  # fmt: skip
    table = grid.collect(tmp_path).splitlines()
    assert table[0] == (
        "| cell | seeds | status | steps | samples | loss | mcl | pointing_game | skipped | wall s |"
    )
    # std of (1.0, 1.2) = 0.1414; of (3.0, 3.01) = 0.0071; of (0.4, 0.64) = 0.1697
    assert table[2] == ("| z_base | 2 | completed | 4 | 64 | 1.1000 ± 0.1414 | 1.1000 ± 0.1414 | "
                        "0.5100 ± 0.0141 | 0 | 3.0000 |")  # fmt: skip
    assert table[3] == ("| a_far | 2 | completed | 4 | 64 | 3.0050 ± 0.0071 * | "
                        "3.0050 ± 0.0071 * | 0.5200 ± 0.1697 | 0 | 3.0000 |")  # fmt: skip
    assert "Welch's t-test" in table[-1] and "`z_base`" in table[-1]
    other = grid.collect(tmp_path, baseline="a_far").splitlines()
    assert other[2].endswith(
        "| 1.1000 ± 0.1414 * | 1.1000 ± 0.1414 * | 0.5100 ± 0.0141 | 0 | 3.0000 |"
    )


def test_collect_names_an_unknown_baseline_in_one_line(tmp_path):
    _write_summary(tmp_path / "mcl", 1.0, 0.5)
    proc = subprocess.run(
        [sys.executable, "slurm/submit.py", "collect", "--out", str(tmp_path), "--baseline", "nope"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"python slurm/submit.py: error: --baseline 'nope' is not a cell under {tmp_path}: mcl"
    ]


def _final(summary: dict, column: str) -> float:
    return summary["final_loss"] if column == "loss" else summary["final_losses"][column]


@pytest.mark.slow
def test_grid_with_two_seeds_runs_and_collects_mean_and_std(tmp_path, world_shards):
    """``submit.py grid --seeds 2 --wait`` on the local executor: 2 cells x 2 seeds of tiny
    pretraining, each seed in its run name; the table's mean ± std of each cell's final
    losses equals the one computed here from the four summaries."""
    out = tmp_path / "grid"
    cmd = [sys.executable, "slurm/submit.py", "grid", "--grid", "table6", "--lambdas", "0.1", "0.7",
           "--config", "configs/pretrain/tiny.yaml", "--seeds", "2", "--cluster", "local",
           "--nodes", "1", "--gpus-per-node", "1", "--timeout-min", "20", "--out", str(out),
           "--wait", *world_shards, "train.max_steps=2", "train.global_batch_size=4",
           "train.micro_batch_size=4", "objectives.rf=false", "train.export_at_end=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # four runs share the cores
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = ["lambda_git=0.1-seed0", "lambda_git=0.1-seed1", "lambda_git=0.7-seed0",
            "lambda_git=0.7-seed1"]  # fmt: skip
    summaries = {r: json.loads((out / r / "summary.json").read_text()) for r in runs}
    assert [s["step"] for s in summaries.values()] == [2, 2, 2, 2]
    assert [s["run_name"] for s in summaries.values()] == runs
    # train.seed reached the runs: same cell, other seed, other initial weights and batches
    assert summaries[runs[0]]["final_loss"] != summaries[runs[1]]["final_loss"]
    table = (out / "results.md").read_text().splitlines()
    assert proc.stdout.rstrip().splitlines()[-len(table) :] == table
    head = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {r.split(" | ")[0].lstrip("| "): [c.strip() for c in r.strip("|").split("|")]
            for r in table[2:4]}  # fmt: skip
    assert list(rows) == ["lambda_git=0.1", "lambda_git=0.7"]
    for cell, row in rows.items():
        assert row[head.index("seeds")] == "2"
        for col in ["loss", *summaries[runs[0]]["final_losses"]]:
            values = [_final(summaries[f"{cell}-seed{k}"], col) for k in (0, 1)]
            mean, std = row[head.index(col)].rstrip(" *").split(" ± ")
            assert float(mean) == pytest.approx(statistics.fmean(values), abs=1e-4), col
            assert float(std) == pytest.approx(statistics.stdev(values), abs=1e-4), col
