"""``make demo``'s pipeline run whole (``python -m cli.demo``: world, 200 steps of tiny on 2
ranks, evaluation) and its table checked against tests/golden/demo_table.json, the run the
README's demo table and pointing-game figures come from; and ``make demo-bn``'s (the PAL
Bengali captioner), checked against the issue's BLEU-4 target.

Tolerances: the pretraining is exact on the same machine (fp32, one thread per rank), but the
evaluation's matrix products use the default thread count, so a ranking may flip on another
CPU: 1.5 points on every percentage, 0.02 on the pointing game and the final L_MCL. Regenerate
the golden only on purpose, after an intended change of the numerics:
``BIMAC_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_demo.py`` (then update README's table).
The dependencies are lower bounds, so a fresh install can move the numbers with no change here:
on 2026-12-06 the commit that had matched the golden in CI gave CIDEr-D 84.8 against 87.0 (and
the same in CI); the golden was regenerated from that install (README says so).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "demo_table.json"


def demo_numbers(out: Path) -> dict[str, float]:
    """The demo's table (eval.json rows) plus the pretraining figures the README quotes."""
    rows = json.loads((out / "eval.json").read_text())["rows"]
    numbers = {f"{r['task']}/{r['metric']}": r["value"] for r in rows}
    log = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    pointing = [r["metrics"]["pointing_game"] for r in log]
    summary = json.loads((out / "pretrain" / "summary.json").read_text())
    numbers["pretrain/pointing_game_first10"] = statistics.mean(pointing[:10])
    numbers["pretrain/pointing_game_last10"] = statistics.mean(pointing[-10:])
    numbers["pretrain/final_mcl"] = summary["final_losses"]["mcl"]
    return numbers


def loss_ratios(out: Path) -> dict[str, float]:
    """Each pretraining loss: mean of its last 10 steps / mean of its first 10."""
    log = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return {
        name: statistics.mean(r["losses"][name] for r in log[-10:])
        / statistics.mean(r["losses"][name] for r in log[:10])
        for name in log[0]["losses"]
    }


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_reproduces_its_golden_table(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cli.demo", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1700)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "### Embedded-world evaluation" in proc.stdout  # the table the user sees
    got = demo_numbers(out)
    if os.environ.get("BIMAC_UPDATE_GOLDEN"):
        rounded = {k: round(v, 4) for k, v in got.items()}
        GOLDEN.write_text(json.dumps(rounded, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got.keys() == want.keys()
    for key, value in want.items():
        tolerance = 0.02 if key.startswith("pretrain/") or key.endswith("pointing_game") else 1.5
        assert got[key] == pytest.approx(value, abs=tolerance), key
    # the learning the README describes: grounding improves, retrieval is far above chance
    assert got["pretrain/pointing_game_last10"] > got["pretrain/pointing_game_first10"] + 0.05
    # every objective learns through the engine: each of the four losses ends below 0.7 of where
    # it started (the golden run: cg 0.18, grounding 0.46, mcl 0.17, reconstruction 0.54); a term
    # whose gradient never arrives stays near 1
    ratios = loss_ratios(out)
    assert set(ratios) == {"mcl", "cg", "grounding", "reconstruction"}
    assert all(r < 0.7 for r in ratios.values()), ratios
    assert got["retrieval/i2t_R@1"] > 10 * 0.5


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_bn_captioner_reaches_bleu4_15_on_200_held_out_images(tmp_path):
    """``make demo-bn``'s pipeline (``python -m cli.demo --bengali``: 4000 + 200 world triplets,
    2000 steps of PAL + InfoNCE + OT) reaches the issue's BLEU-4 >= 15 (five references per
    image) on all 200 held-out images, with captions made of several words (this command gave
    20.2; the same training on one thread 20.5 / 18.7 / 19.7 for seeds 0 / 1 / 2, RESULTS.md)."""
    out = tmp_path / "demo-bn"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cli.demo", "--out", str(out), "--bengali"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "| n | references | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |" in proc.stdout
    result = json.loads((out / "caption_bn" / "eval_bn.json").read_text())
    scores, captions = result["scores"], result["captions"]
    assert scores["images"] == len(captions) == 200 and scores["references"] == 5
    assert scores["BLEU-4"] >= 15, scores
    assert statistics.mean(len(c.split()) for _, c, _ in captions) >= 3
    summary = json.loads((out / "caption_bn" / "summary.json").read_text())
    assert summary["step"] == 2000 and summary["status"] == "completed"
