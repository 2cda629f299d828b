"""slurm/submit.py: grid cells, the markdown table, and a 2-cell grid on submitit's local executor."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory) -> list[str]:
    from test_engine_pretrain import world_overrides

    return world_overrides(tmp_path_factory.mktemp("world"))


def _submit_module():
    spec = importlib.util.spec_from_file_location(
        "bimac_slurm_submit", REPO / "slurm" / "submit.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_table6_cells_are_the_paper_lambdas():
    sub = _submit_module()
    cells = sub.grid_cells("table6", "configs/pretrain/tiny.yaml")
    assert [c.overrides for c in cells] == [
        [f"objectives.lambda_git={v}"] for v in (0.1, 0.4, 0.7, 1.0, 1.5)
    ]
    assert cells[0].name == "lambda_git=0.1"


def test_table5_cells_follow_the_paper_rows():
    sub = _submit_module()
    cells = sub.grid_cells("table5", "configs/pretrain/paper.yaml")
    assert [c.name for c in cells] == ["mcl", "mcl_cg", "mcl_cg_rf", "mcl_cg_rf_git",
                                       "mcl_cg_git_grounding", "full"]  # fmt: skip
    assert all(c.config == "configs/pretrain/paper.yaml" for c in cells)
    assert (
        "objectives.cg=false" in cells[0].overrides and "objectives.mcl=true" in cells[0].overrides
    )


def test_pal_grids_run_the_captioner_with_each_rows_losses():
    sub = _submit_module()
    config = "configs/finetune/caption_bn/tiny.yaml"
    table3 = sub.grid_cells("pal_table3", config)
    assert [c.name for c in table3] == ["ce_real", "ce_real_syn", "ce_infonce", "ce_infonce_ot",
                                        "pal", "pal_infonce", "pal_infonce_ot"]  # fmt: skip
    assert {c.entry for c in table3} == {"caption_bn"} and {c.config for c in table3} == {config}
    assert "losses.ce_syn=false" in table3[0].overrides  # real images only
    table4 = sub.grid_cells("pal_table4", config)
    assert len(table4) == 4 and all(c.overrides for c in table4)
    with pytest.raises(ValueError, match="unknown grid"):
        sub.grid_cells("table7", config)


def test_collect_makes_one_row_per_summary(tmp_path):
    sub = _submit_module()
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
    table = sub.collect(tmp_path).splitlines()
    assert (
        table[0]
        == "| cell | status | steps | samples | loss | mcl | pointing_game | skipped | wall s |"
    )
    assert table[2] == "| a | completed | 4 | 64 | 1.5000 | 1.5000 | 0.2500 | 1 | 3.0000 |"
    assert table[3] == "| b | completed | 4 | 64 | 2.0000 | 2.0000 |  | 1 | 3.0000 |"
    assert (tmp_path / "results.md").read_text().splitlines() == table


@pytest.mark.slow
def test_local_executor_runs_a_two_cell_grid(tmp_path, world_shards, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two cells share the cores
    sub = _submit_module()
    cells = sub.grid_cells("table6", str(REPO / "configs/pretrain/tiny.yaml"), [0.1, 0.7])
    for cell in cells:
        cell.overrides += [
            *world_shards,
            "train.max_steps=2",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "objectives.rf=false",
            "train.wandb=disabled",
            "train.progress_bar=false",
            "train.export_at_end=false",
        ]
    executor = sub.make_executor(tmp_path / "submitit", "local", 1, 1, 10, None)
    jobs = sub.submit(cells, tmp_path, executor)
    summaries = [job.result() for job in jobs]
    assert [s["step"] for s in summaries] == [2, 2]
    table = sub.collect(tmp_path).splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| lambda_git=0.1", "| lambda_git=0.7"]
