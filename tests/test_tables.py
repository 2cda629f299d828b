"""``make tables`` (``python -m cli.tables``): the tables' statistics, RESULTS.md's section, and the
whole recipe through its entry point on 2 rows x 2 seeds x 3 steps."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import ttest_ind

from bimac.tools.grid import Cell
from cli import tables

REPO = Path(__file__).resolve().parents[1]


def _runs(values: dict[str, list[float]]) -> tuple[dict[str, list[Cell]], dict[str, dict]]:
    """Rows -> seeded cells and their summaries with the given BLEU-4 per seed."""
    rows, runs = {}, {}
    for row, bleu4 in values.items():
        rows[row] = [
            Cell(f"{row}-seed{k}", "c.yaml", entry="caption_bn") for k in range(len(bleu4))
        ]
        for cell, v in zip(rows[row], bleu4):
            runs[cell.name] = {
                "status": "completed",
                "final_metrics": {"BLEU-4": v, "BLEU-1": 2 * v},
            }
    return rows, runs


def test_table_rows_are_mean_and_std_over_seeds_with_welch_marks():
    """Mean ± sample std by hand; ``*`` only where SciPy's Welch test gives p < 0.05."""
    rows, runs = _runs({"ce_real": [10.0, 10.2, 9.8], "pal": [14.0, 14.1, 13.9],
                        "pal_infonce": [10.5, 9.0, 11.5]})  # fmt: skip
    text = tables.render_table("pal_table3", tables.TABLES["pal_table3"], rows, runs, None)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "±" in line}
    assert "| CE (real only) | 3 | 20.00 ± 0.40 |" in lines["CE (real only)"]
    assert "10.00 ± 0.20 |" in lines["CE (real only)"]
    assert "14.00 ± 0.10 * |" in lines["PAL"]  # p = 2e-5
    # 10.33 ± 1.26 vs 10.00 ± 0.20: within the spread
    assert statistics.stdev([10.5, 9.0, 11.5]) == pytest.approx(1.2583, abs=1e-4)
    assert "10.33 ± 1.26 |" in lines["PAL + InfoNCE"]
    assert ttest_ind([10.5, 9.0, 11.5], [10.0, 10.2, 9.8], equal_var=False).pvalue > 0.05
    # the paper's rows beside the world's, and one sentence per component both rows have:
    # InfoNCE on PAL = pal_infonce - pal: paper 10.34 - 10.19, world 10.33 - 14.00
    assert "| PAL | 46.53 | 27.8 | 16.3 | 10.19 | 27.29 | 70.97 |" in text
    sentence = next(line for line in text.splitlines() if line.startswith("- **InfoNCE on PAL**"))
    assert "paper +0.15 (B4), world -3.67" in sentence
    p = ttest_ind([10.5, 9.0, 11.5], [14.0, 14.1, 13.9], equal_var=False).pvalue
    assert p < 0.05 and f"opposite direction, beyond seed noise (p = {p:.2g})" in sentence
    assert not any(line.startswith("- **synthetic images**") for line in text.splitlines())
    # the paper's BERT-F1 column has no world counterpart: the table says so, and why
    assert "No BERTScore column: it needs a pretrained multilingual BERT" in text
    bimac = tables.render_table(
        "table5", tables.TABLES["table5"], *_runs({"mcl": [1.0, 2.0]}), None
    )
    assert "BERTScore" not in bimac


def test_verdict_says_direction_and_certainty():
    assert tables.verdict(+1.0, [2.0, 2.1, 2.2], [1.0, 1.1, 1.2]).startswith("reproduced")
    assert tables.verdict(-1.0, [2.0, 2.1, 2.2], [1.0, 1.1, 1.2]).startswith(
        "opposite direction, beyond seed noise"
    )
    assert tables.verdict(+1.0, [1.0, 2.0, 0.5], [1.0, 1.1, 1.2]).startswith(
        "same direction, within seed noise"
    )
    assert tables.verdict(+1.0, [], [1.0]) == "not measured"


def test_results_section_replaces_only_its_markers(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nhand-written\n\n{tables.BEGIN}\nold\n{tables.END}\nafter\n")
    cfg = tables.TablesConfig(tables=["pal_table1"], seeds=2, results=str(results),
                              figures=str(tmp_path / "fig"))  # fmt: skip
    rows, runs = _runs({"pal_infonce_ot": [15.0, 16.0], "vit_gpt2": [5.0, 6.0]})
    runs_dir = tmp_path / "runs"
    for name, summary in runs.items():
        (runs_dir / name).mkdir(parents=True)
        (runs_dir / name / "summary.json").write_text(json.dumps(summary))
    tables.write_results(cfg, {"pal_table1": rows}, runs_dir, 60.0)
    text = results.read_text()
    assert text.startswith("# Results\n\nhand-written\n\n" + tables.BEGIN)
    assert text.endswith(tables.END + "\nafter\n") and "\nold\n" not in text
    assert "| PAL + InfoNCE + OT | 2 | 31.00 ± 1.41 |" in text
    assert (tmp_path / "fig" / "pal_table1.png").stat().st_size > 5000


@pytest.mark.slow
def test_make_tables_runs_two_rows_two_seeds_and_writes_their_mean_and_std(tmp_path):
    """``python -m cli.tables`` on Table 6's λ = 0.1 and 0.7 rows x 2 seeds x 3 steps: every run
    trains and is evaluated, the section's mean ± std equal the per-seed summaries', the figure
    exists, and a second invocation reruns nothing."""
    out, results = tmp_path / "tables", tmp_path / "RESULTS.md"
    cmd = [sys.executable, "-m", "cli.tables", "--out", str(out), "--tables", "[table6]",
           "--seeds", "2", "--rows", '{table6: ["lambda_git=0.1", "lambda_git=0.7"]}',
           "--pretrain_overrides", "[train.max_steps=3, train.global_batch_size=8, "
           "train.micro_batch_size=8, objectives.rf=false, data.streams=1, train.wandb=disabled]",
           "--world_train", "64", "--eval_args", '[--n, "20", --caption-n, "0"]', "--results", str(results),
           "--figures", str(tmp_path / "fig")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    for row in ("0.1", "0.7"):
        summaries = [json.loads((out / "runs" / f"table6.lambda_git={row}-seed{k}" /
                                 "summary.json").read_text()) for k in (0, 1)]  # fmt: skip
        assert [s["step"] for s in summaries] == [3, 3]
        pg = [100 * s["final_metrics"]["pointing_game"] for s in summaries]
        line = next(x for x in text.splitlines() if x.startswith(f"| λ_GIT = {row} |"))
        mean, std = re.findall(r"([\d.]+) ± ([\d.]+)", line)[-1]  # the last column
        assert float(mean) == pytest.approx(statistics.fmean(pg), abs=0.006)
        assert float(std) == pytest.approx(statistics.stdev(pg), abs=0.006)
    assert (tmp_path / "fig" / "table6.png").is_file()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done already, skipped") == 4
