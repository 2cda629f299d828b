"""open_clip interchange: exported towers embed exactly as BiMAC; open_clip weights import."""

from __future__ import annotations

import io
import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from bimac.config import ConfigError
from bimac.data.samples import image_chw
from bimac.interchange import (
    bimac_config_from_open_clip,
    export_open_clip,
    import_open_clip,
    register_open_clip,
)
from bimac.models.bimac import BiMAC, load_model_config

ATTN_POOL = [
    "attentional_pool=true",
    "embed_dim=128",
    "attn_pooler_queries=16",
    "attn_pooler_heads=4",
]


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(
        0, 256, (4, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g
    )
    ids = torch.randint(4, cfg.vocab_size, (4, cfg.context_length), generator=g)
    ids[:, 0] = 1
    for i, n in enumerate((5, 9, 17, cfg.context_length - 1)):  # BOS .. EOS then pad
        ids[i, n] = 2
        ids[i, n + 1 :] = cfg.pad_id
    return images, ids


@pytest.mark.parametrize("overrides", [[], ATTN_POOL], ids=["cls-pool", "attentional-pool"])
def test_exported_towers_embed_like_bimac(tmp_path, overrides):
    torch.manual_seed(0)
    model = BiMAC(load_model_config("configs/model/tiny.yaml", overrides)).eval()
    files = export_open_clip(model, tmp_path / "oc")
    assert register_open_clip(files.directory) == [files.name]
    oc, _, preprocess = open_clip.create_model_and_transforms(
        files.name, pretrained=str(files.weights)
    )
    oc_local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{files.directory}")
    assert type(oc).__name__ == "CoCa"
    images, ids = _inputs(model.config)
    pp = oc_local.visual.preprocess_cfg
    mean, std = (torch.tensor(pp[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        ours_img, ours_txt = model.encode_image(images), model.encode_text(ids)
        for net in (oc.eval(), oc_local.eval()):
            theirs = net.encode_image((images.float() / 255 - mean) / std, normalize=True)
            # the tolerance; identical weights and code give identical numbers here
            torch.testing.assert_close(theirs, ours_img, atol=1e-5, rtol=0)
            torch.testing.assert_close(
                net.encode_text(ids, normalize=True), ours_txt, atol=1e-5, rtol=0
            )
    # open_clip's own val transform gives BiMAC's input pixels (square image: no rounding)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(images[0].permute(1, 2, 0))).resize((96, 96)).save(buf, "PNG")
    ours = model.normalize(torch.from_numpy(image_chw(buf.getvalue(), 64).copy())[None])
    theirs = preprocess(Image.open(io.BytesIO(buf.getvalue())))[None]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_import_puts_open_clip_weights_into_bimac(tmp_path):
    torch.manual_seed(0)
    model = BiMAC(load_model_config("configs/model/tiny.yaml"))
    files = export_open_clip(model, tmp_path / "oc")
    (files.directory / "tokenizer.json").write_text("{}")  # copied along with the weights
    imported = import_open_clip(
        str(files.directory),
        str(files.weights),
        tmp_path / "bimac",
        grounding_dim=64,
        patch_decoder_width=128,
    )
    theirs = imported.coca.state_dict()
    for name, tensor in model.coca.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    assert (tmp_path / "bimac" / "tokenizer.json").is_file()
    again = BiMAC.from_pretrained(tmp_path / "bimac")  # a start for python -m pretrain
    assert torch.equal(again.coca.visual.conv1.weight, model.coca.visual.conv1.weight)
    assert load_model_config(tmp_path / "bimac" / "model.yaml").pretrained == str(files.weights)


def test_config_of_open_clip_coca_base_matches_the_paper_model():
    cfg = bimac_config_from_open_clip("coca_ViT-B-32")
    paper = load_model_config("configs/model/paper.yaml")
    for field in (
        "embed_dim",
        "patch_size",
        "vision_width",
        "vision_layers",
        "vision_head_width",
        "attentional_pool",
        "attn_pooler_queries",
        "attn_pooler_heads",
        "text_width",
        "text_layers",
        "text_heads",
        "decoder_layers",
        "context_length",
        "vocab_size",
    ):
        assert getattr(cfg, field) == getattr(paper, field), field
    assert cfg.image_size == 224 and cfg.pretrained_arch == "coca_ViT-B-32"


def test_unsupported_open_clip_configs_are_refused():
    with pytest.raises(ConfigError, match="not a CoCa"):
        bimac_config_from_open_clip("ViT-B-32")
    timm = open_clip.get_model_config("coca_roberta-ViT-B-32")
    with pytest.raises(ConfigError):
        bimac_config_from_open_clip(timm)


class _Payload:
    """Stands for code a pickle would run."""


def test_pickled_code_is_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"visual.proj": _Payload()}, f)
    cfg = load_model_config("configs/model/tiny.yaml", [f"pretrained={path}"])
    with pytest.raises(pickle.UnpicklingError):  # torch.load(weights_only=True) refuses it
        BiMAC(cfg)
