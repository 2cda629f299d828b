"""open_clip interchange: exported towers embed exactly as BiMAC; open_clip weights import."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from bimac.config import ConfigError
from bimac.data.samples import image_chw
from bimac.data.tokenizer import save_world_tokenizer
from bimac.eval.common import bimac_encoder
from bimac.interchange import (
    bimac_config_from_open_clip,
    export_open_clip,
    import_open_clip,
    register_open_clip,
)
from bimac.models.bimac import BiMAC, load_model_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

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


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    return save_world_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.mark.parametrize("overrides", [[], ATTN_POOL], ids=["cls-pool", "attentional-pool"])
def test_exported_towers_embed_like_bimac(tmp_path, overrides, world_tokenizer):
    torch.manual_seed(0)
    model = BiMAC(load_model_config("configs/model/tiny.yaml", overrides)).eval()
    files = export_open_clip(model, tmp_path / "oc", tokenizer=world_tokenizer)
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
    # open_clip's own val transform (PIL bicubic) gives BiMAC's input pixels (the shared decoder's
    # antialiased bicubic in torch) to one grey level: rounding, on under 1 % of the values
    buf = io.BytesIO()
    Image.fromarray(np.asarray(images[0].permute(1, 2, 0))).resize((96, 96)).save(buf, "PNG")
    ours = model.normalize(torch.from_numpy(image_chw(buf.getvalue(), 64).copy())[None])
    theirs = preprocess(Image.open(io.BytesIO(buf.getvalue())))[None]
    levels = ((theirs - ours) * std * 255).abs()  # back to 0..255 units
    assert levels.max() <= 1 + 1e-4 and (levels > 0.5).float().mean() < 0.01  # measured 0.2 %


def test_import_puts_open_clip_weights_into_bimac(tmp_path, world_tokenizer):
    torch.manual_seed(0)
    model = BiMAC(load_model_config("configs/model/tiny.yaml"))
    files = export_open_clip(model, tmp_path / "oc", tokenizer=world_tokenizer)
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
    assert (tmp_path / "bimac" / "tokenizer.json").read_bytes() == world_tokenizer.read_bytes()
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


def _export_dir(tmp_path, tokenizer_file=None, tokenizer_name=None) -> Path:
    torch.manual_seed(0)
    out = tmp_path / "export"
    BiMAC(load_model_config("configs/model/tiny.yaml")).save_pretrained(
        out, tokenizer=tokenizer_name
    )
    if tokenizer_file:
        (out / "tokenizer.json").write_bytes(Path(tokenizer_file).read_bytes())
    return out


def test_export_loads_in_open_clip_with_its_own_tokenizer(tmp_path, world_tokenizer):
    """local-dir: model AND tokenizer give BiMAC's image and text embeddings (cosine 1 to 1e-5)."""
    from bimac.data.world import make_sample

    export = _export_dir(tmp_path, world_tokenizer)
    files = export_open_clip(export, tmp_path / "oc")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{files.directory}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{files.directory}")
    assert type(tokenizer).__name__ == "HFTokenizer"  # not CLIP's BPE
    ours = bimac_encoder(export)
    samples = [make_sample(0, "val", i, 64) for i in range(4)]
    texts = [c for s in samples for c in s["json"]["captions_en"][:2]] + ["word " * 40]
    images = [Image.open(io.BytesIO(s["jpg"])) for s in samples]
    with torch.no_grad():
        theirs_txt = model.eval().encode_text(tokenizer(texts), normalize=True)
        theirs_img = model.encode_image(
            torch.stack([preprocess(i) for i in images]), normalize=True
        )
    ours_txt = ours.texts(texts)
    ours_img = ours.images(
        torch.stack([torch.from_numpy(image_chw(s["jpg"], 64)) for s in samples])
    )
    assert torch.equal(tokenizer(texts), ours.tokenizer.encode(texts))
    for a, b in ((theirs_txt, ours_txt), (theirs_img, ours_img)):
        cos = torch.nn.functional.cosine_similarity(a, b)
        torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-5, rtol=0)


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, argv)],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_eval_with_open_clip_local_dir_equals_eval_of_the_export(tmp_path, world_tokenizer):
    export = _export_dir(tmp_path, world_tokenizer)
    assert _cli("export", "--checkpoint", export, "--to-open-clip", tmp_path / "oc").returncode == 0
    numbers = []
    for model in (["--checkpoint", export], ["--open-clip", f"local-dir:{tmp_path / 'oc'}"]):
        out = tmp_path / f"r{len(numbers)}.json"
        p = _cli("eval", "retrieval", *model, "--data", "world:retrieval:30", "--out", out)
        assert p.returncode == 0, p.stderr
        numbers.append(json.loads(out.read_text()))
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "mTR", "mIR"):
        assert numbers[0][key] == pytest.approx(numbers[1][key], abs=1e-6), key


@pytest.mark.parametrize(
    "tokenizer_name, message",
    [
        (None, "export has no tokenizer"),
        ("facebook/mbart-large-50", "is not one open_clip can load"),
    ],
)
def test_export_that_cannot_carry_its_tokenizer_is_refused(tmp_path, tokenizer_name, message):
    export = _export_dir(tmp_path, tokenizer_name=tokenizer_name)
    p = _cli("export", "--checkpoint", export, "--to-open-clip", tmp_path / "oc")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bimac export: ") and message in lines[0]
    assert not (tmp_path / "oc").exists()  # refused before anything is written


def test_clip_bpe_export_uses_open_clips_own_tokenizer(tmp_path):
    export = _export_dir(tmp_path, tokenizer_name="coca_ViT-B-32")
    files = export_open_clip(export, tmp_path / "oc")
    assert (files.directory / "tokenizer.txt").read_text().strip() == "coca_ViT-B-32"
    config = json.loads((files.directory / "open_clip_config.json").read_text())
    assert "hf_tokenizer_name" not in config["model_cfg"]["text_cfg"]
    assert type(open_clip.get_tokenizer(f"local-dir:{files.directory}")).__name__ == (
        "SimpleTokenizer"
    )
