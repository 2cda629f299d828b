"""PAL Fig. 3 analysis: centroid distance and RBF MMD against hand computation, and the plot."""

from __future__ import annotations

import math

import torch
from test_pal_captioner import CONFIG, world_batch

from bimac.analysis.pal_projection import centroid_distance, initial_model, mmd_rbf, run
from bimac.config import load_config
from bimac.tasks.caption_bn import CaptionBnConfig, CaptionBnTask


def test_centroid_distance_and_mmd_hand_computation():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([[0.0, 3.0], [2.0, 3.0]])
    assert math.isclose(centroid_distance(x, y), 3.0, rel_tol=1e-6)
    # 1-D points a = {0}, b = {1}, sigma = 1: MMD^2 = k(0,0) + k(1,1) - 2 k(0,1) = 2 - 2 e^{-1/2}.
    got = mmd_rbf(torch.tensor([[0.0]]), torch.tensor([[1.0]]), sigma=1.0)
    assert math.isclose(got, 2 - 2 * math.exp(-0.5), rel_tol=1e-6)
    assert abs(mmd_rbf(x, x, sigma=1.0)) < 1e-7


def test_projection_run_writes_plot_and_matches_before_when_untrained(tmp_path):
    cfg = load_config(CaptionBnConfig, CONFIG)
    torch.manual_seed(cfg.train.seed)
    after = CaptionBnTask(cfg).build_model()
    before = initial_model(after, cfg.train.seed)  # no training in between: the same model
    batches = [world_batch(after, range(8))]
    stats = run(after, before, batches, cfg, tmp_path)
    assert (tmp_path / "pal_projection.png").stat().st_size > 0
    assert stats["n"] == 8
    for key in ("centroid_distance", "mmd_rbf"):
        assert math.isclose(stats["before"][key], stats["after"][key], rel_tol=1e-5, abs_tol=1e-7)
    assert stats["after"]["centroid_distance"] > 0  # real and synthetic images differ
