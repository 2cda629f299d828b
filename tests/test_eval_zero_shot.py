"""Zero-shot classification through the CLI on a tiny BiMAC trained for a few contrastive steps on
the embedded world's shape split (its captions: "A green ellipse."), then classified zero-shot
into the 100 colour-shape classes of held-out scenes: far above chance (1 % top-1, 5 % top-5).

At this size (32 px, 16 patches, one layer, 80 steps) the model learns colour before shape: the
10-way shape-only task stays near chance, so the 100-way task is the one asserted here."""

from __future__ import annotations

import numpy as np
import torch

from bimac.data.synthetic import class_names, make_sample
from bimac.data.tokenizer import HFTokenizer, train_world_tokenizer
from bimac.eval import classification
from bimac.eval.classification import world_templates
from bimac.eval.common import decode_image
from bimac.losses.contrastive import contrastive_loss
from bimac.models.bimac import BiMAC, BiMACConfig

TINY = dict(
    vocab_size=200,
    image_size=32,
    patch_size=8,
    vision_width=64,
    vision_layers=1,
    vision_head_width=32,
    text_width=64,
    text_layers=1,
    text_heads=2,
    decoder_layers=1,
    context_length=16,
    grounding_dim=32,
    patch_decoder_width=32,
    patch_decoder_layers=1,
    patch_decoder_heads=2,
)


def test_zero_shot_on_world_shapes_beats_chance(tmp_path):
    torch.manual_seed(0)
    # training scenes are disjoint from the evaluated ones (indices 0..199 of the split)
    train = [make_sample(0, "cls_shape", 1000 + i) for i in range(256)]
    captions = [s["json"]["captions_en"][0] for s in train]
    split = "cls_colour_shape"
    prompts = [t.format(c) for c in class_names(split) for t in world_templates(split)]
    raw_tok = train_world_tokenizer(captions + prompts, TINY["vocab_size"])
    tok = HFTokenizer(raw_tok, TINY["context_length"])
    images = torch.from_numpy(np.stack([decode_image(s["jpg"], TINY["image_size"]) for s in train]))
    texts = tok.encode(captions)
    model = BiMAC(BiMACConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for _ in range(80):
        idx = torch.randperm(len(train))[:64]
        out = model(
            images[idx],
            texts[idx],
            caption=False,
            grounding=False,
            reconstruction=False,
            grounded_reconstruction=False,
        )
        loss = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "ckpt", tokenizer=raw_tok)

    result = classification.main(
        [
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--data",
            f"world:{split}:200",
            "--out",
            str(tmp_path / "cls.json"),
        ]
    )
    assert result["chance_top1"] == 1.0 and result["images"] == 200
    assert result["top1"] >= 4.0, result  # chance: 1 %
    assert result["top5"] >= 25.0, result  # chance: 5 %
