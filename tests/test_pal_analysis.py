"""PAL Fig. 3 (bottom) analysis: centroid distance and RBF MMD against hand computation, the
rebuilt initial model against the engine's, and each model's statistics recomputed from its own
descriptors. (The trained captioner's gap after ``python -m finetune.caption_bn``:
``tests/test_pal_captioner.py::test_pal_training_narrows_the_real_synthetic_gap``.)"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from test_pal_captioner import CONFIG, world_batch

from bimac.analysis.pal_projection import centroid_distance, initial_model, mmd_rbf, run
from bimac.config import load_config
from bimac.engine.loop import seed_everything
from bimac.tasks.caption_bn import CaptionBnConfig, CaptionBnTask


def test_centroid_distance_and_mmd_hand_computation():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([[0.0, 3.0], [2.0, 3.0]])
    assert math.isclose(centroid_distance(x, y), 3.0, rel_tol=1e-6)
    # 1-D points a = {0}, b = {1}, sigma = 1: MMD^2 = k(0,0) + k(1,1) - 2 k(0,1) = 2 - 2 e^{-1/2}.
    got = mmd_rbf(torch.tensor([[0.0]]), torch.tensor([[1.0]]), sigma=1.0)
    assert math.isclose(got, 2 - 2 * math.exp(-0.5), rel_tol=1e-6)
    assert abs(mmd_rbf(x, x, sigma=1.0)) < 1e-7


def _gap_by_hand(model, batches, cfg) -> dict[str, float]:
    """Eqs. 8-9 written out: the decoder's cross-attention over the real image's tokens (last
    ``k`` layers and all heads averaged) averaged over the caption steps, sharpened by ``tau``,
    cut to the fewest highest patches holding ``rho`` of the mass; the same weights pool the real
    and the synthetic tokens. Then the centroid gap and the biased RBF MMD^2 (bandwidth: the
    median pairwise distance), in float64."""
    lc = cfg.losses
    real, syn = [], []
    model.eval()
    with torch.no_grad():
        for b in batches:
            memory, memory_syn = model.encode(b["image"]), model.encode(b["image_syn"])
            _, cross = model.decode(memory, b["text_bn"], output_attentions=True)
            att = torch.stack(cross[-lc.k :]).mean((0, 2)).double()  # [B, T, S]
            steps = (b["text_bn"] != model.pad_id).double()
            w = (att * steps[..., None]).sum(1) / steps.sum(1, keepdim=True)  # [B, S]
            w = w ** (1 / lc.tau)
            w = w / w.sum(-1, keepdim=True)
            for row in w:  # top-rho: keep patches while the mass before them is below rho
                order = row.argsort(descending=True)
                before_mass = row[order].cumsum(0) - row[order]
                row[order[before_mass >= lc.rho]] = 0.0
            w = w / w.sum(-1, keepdim=True)
            real.append(torch.einsum("bs,bsd->bd", w, memory.double()))
            syn.append(torch.einsum("bs,bsd->bd", w, memory_syn.double()))
    r = torch.nn.functional.normalize(torch.cat(real), dim=-1).numpy()
    s = torch.nn.functional.normalize(torch.cat(syn), dim=-1).numpy()
    z = np.concatenate([r, s])
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    pairs = np.sort(d[~np.eye(len(z), dtype=bool)])
    sigma = pairs[(len(pairs) - 1) // 2]  # the lower middle value, as torch.median takes

    def k(u, v):
        return np.exp(-((u[:, None] - v[None]) ** 2).sum(-1) / (2 * sigma**2))

    return {
        "centroid_distance": float(np.linalg.norm(r.mean(0) - s.mean(0))),
        "mmd_rbf": float(k(r, r).mean() + k(s, s).mean() - 2 * k(r, s).mean()),
        "sigma": float(sigma),
    }


@pytest.mark.slow
def test_projection_compares_the_initial_model_with_the_trained_one(tmp_path):
    cfg = load_config(CaptionBnConfig, CONFIG)
    seed_everything(cfg.train.seed)  # what bimac.engine.train does before task.build_model()
    after = CaptionBnTask(cfg).build_model()
    at_start = copy.deepcopy(after.state_dict())
    with torch.no_grad():  # a stand-in for training: every trainable weight moves
        for p in after.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    before = initial_model(after, cfg.train.seed)
    # "before" is the model training started from, weight for weight
    assert before.state_dict().keys() == at_start.keys()
    for name, value in before.state_dict().items():
        assert torch.equal(value, at_start[name]), name

    batches = [world_batch(after, range(8)), world_batch(after, range(8, 12))]
    stats = run(after, before, batches, cfg, tmp_path)
    assert (tmp_path / "pal_projection.png").stat().st_size > 0
    assert stats["n"] == 12
    for name, model in (("before", before), ("after", after)):
        want = _gap_by_hand(model, batches, cfg)
        for key, value in want.items():  # float32 descriptors against a float64 recomputation
            assert stats[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
    b, a = stats["before"]["centroid_distance"], stats["after"]["centroid_distance"]
    assert abs(a - b) > 1e-3  # the two models differ, so a swapped or shared model shows
    assert stats["centroid_change_pct"] == pytest.approx(100 * (a - b) / b, rel=1e-9)
