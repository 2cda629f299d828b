"""50 CPU steps of the tiny BiMAC on embedded-world batches in the loader's format."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bimac.data import DataConfig, ShardDataset, TokenizerConfig, build_tokenizer
from bimac.data.tokenizer import save_world_tokenizer
from bimac.data.world import make_sample
from bimac.losses import pointing_game
from bimac.models.bimac import load_model_config
from bimac.tasks.pretrain import ObjectiveConfig, PretrainTask

STEPS = 50


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Batches of embedded-world samples made by the loader's own decode + collate (the tar
    reading itself is the data tests' business; skipping it keeps this test fast)."""
    out = tmp_path_factory.mktemp("world")
    tok = build_tokenizer(
        TokenizerConfig(
            kind="world", path=str(save_world_tokenizer(out / "tokenizer.json")), context_length=32
        )
    )
    (out / "world.tar").touch()  # never opened: only decode + collate run
    cfg = DataConfig(train_shards=str(out / "world.tar"), image_size=64, batch_size=16)
    ds = ShardDataset(cfg, tok, rank=0, world_size=1)
    items = []
    for i in range(224):  # 10 training batches + 4 held out for the pointing game
        s = make_sample(0, "train", i, size=64)
        raw = {
            "__key__": s["__key__"],
            "__url__": "world.tar",
            "jpg": s["jpg"],
            "txt": s["txt"].encode(),
            "json": json.dumps(s["json"]).encode(),
        }
        items.append(ds.decode(raw))
    assert ds.counter.as_dict() == {} or not any(ds.counter.as_dict().values())
    return tok, [ds.collate(items[i : i + 16]) for i in range(0, len(items), 16)]


@pytest.mark.slow
def test_tiny_training_lowers_every_loss_and_raises_pointing_game(world):
    tok, batches = world
    train, held_out = batches[:10], batches[10:]
    torch.manual_seed(0)
    model_cfg = load_model_config(
        Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml",
        [f"vocab_size={tok.vocab_size}"],
    )
    corpus = [
        [[t for t in row if t not in (tok.bos_id, tok.eos_id, tok.pad_id)]]
        for b in train
        for row in b["text"].tolist()
    ]
    objectives = ObjectiveConfig(rf_every=10)  # every objective of Table 5's last row, RF included
    task = PretrainTask(model_cfg, objectives, tokenizer=tok, reward_corpus=corpus)
    model = task.build_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def pointing() -> float:
        """Pointing game pooled over the held-out nouns (~100 boxes)."""
        hits = total = 0
        with torch.no_grad():
            for b in held_out:
                out = model(b["image"], b["text"], b["noun_spans"], b["noun_mask"], caption=False)
                score, count = pointing_game(
                    out["noun_emb"],
                    out["patch_emb"],
                    b["noun_boxes"],
                    b["noun_has_box"],
                    b["noun_mask"],
                    model_cfg.grid,
                )
                hits, total = hits + score * count, total + count
        return hits / total

    before = pointing()
    history: dict[str, list[float]] = {}
    start = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(train), STEPS):
        terms, metrics = task.losses(model, batch)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        for name, value in terms.items():
            history.setdefault(name, []).append(value.item())
        assert all(np.isfinite(v) for v in metrics.values())
    elapsed = time.perf_counter() - start
    after = pointing()
    assert set(history) == {"mcl", "cg", "grounding", "reconstruction"}
    summary = {k: (np.mean(v[:5]), np.mean(v[-5:])) for k, v in history.items()}
    print(
        f"{STEPS} steps in {elapsed:.1f}s; loss first5 -> last5: {summary}; "
        f"pointing game {before:.3f} -> {after:.3f}"
    )
    for name, (first, last) in summary.items():
        assert last < first, f"{name} did not fall: {first:.4f} -> {last:.4f}"
    assert after > before
