"""Checkpoint interchange with open_clip, both ways, with no pickled code ever loaded.

Export: a BiMAC's CoCa towers (``model.coca``: image tower, text tower, caption decoder) become
an open_clip checkpoint directory::

    files = export_open_clip("runs/demo/pretrain/export", "runs/demo/open_clip")
    register_open_clip(files.directory)   # open_clip.add_model_config(<name>.json)
    model, _, preprocess = open_clip.create_model_and_transforms(files.name,
                                                                 pretrained=str(files.weights))
    # or, with no registration: open_clip.create_model_and_transforms("local-dir:runs/demo/open_clip")

The directory holds ``<name>.json`` (the open_clip model config, CoCa class), ``open_clip_config.json``
(model + preprocess config, what ``local-dir:`` reads), ``open_clip_model.safetensors`` and the
tokenizer BiMAC was trained with, in the form open_clip loads:

- a ``tokenizers`` file (the world's ``tokenizer.json``): it becomes a Hugging Face tokenizer
  folder (``tokenizer.json`` + ``tokenizer_config.json``) and the text config's
  ``hf_tokenizer_name`` points there, so ``open_clip.get_tokenizer("local-dir:OUT")`` (which then
  loads ``AutoTokenizer`` from OUT) gives BiMAC's ids: BOS .. EOS, ``<pad>`` to the context
  length. open_clip collapses runs of whitespace before tokenising; BiMAC does not, so only
  captions with doubled spaces tokenise differently.
- an open_clip CLIP-BPE name (``tokenizer.txt``): no ``hf_tokenizer_name``, so open_clip builds
  its own ``SimpleTokenizer``, the one BiMAC wraps.

Any other tokenizer (a transformers name) is refused: open_clip would silently use CLIP's BPE.

Import: open_clip CoCa weights (a pretrained tag of an open_clip CoCa architecture, or a file)
as the start of BiMAC pretraining: :func:`bimac_config_from_open_clip` turns the architecture into a
:class:`BiMACConfig` whose ``pretrained`` names the weights; ``BiMAC(config)`` loads them through
``open_clip.load_checkpoint`` (safetensors, or ``torch.load(weights_only=True)``), and
:func:`write_model_config` saves it as ``configs/model/*.yaml`` for ``python -m pretrain``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import yaml
from safetensors.torch import save_file

from bimac import export_folder
from bimac.config import ConfigError, to_dict
from bimac.export_folder import TOKENIZER_FILE
from bimac.models.bimac import BiMAC, BiMACConfig

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "open_clip_model.safetensors"
LOCAL_CONFIG_FILE = "open_clip_config.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # makes OUT a transformers tokenizer folder


@dataclass
class OpenClipExport:
    directory: Path
    name: str  # the model name registered with open_clip
    config: Path  # <name>.json
    weights: Path  # open_clip_model.safetensors


def open_clip_model_config(cfg: BiMACConfig) -> dict[str, Any]:
    """The open_clip model config (``model_configs/*.json`` format, CoCa) of BiMAC's towers."""
    kwargs = cfg.coca_kwargs()
    return {**kwargs, "custom_text": True}


def preprocess_config(cfg: BiMACConfig) -> dict[str, Any]:
    """open_clip preprocessing equal to BiMAC's: shorter side bicubic, centre crop, mean/std."""
    return {
        "size": cfg.image_size,
        "mean": list(cfg.image_mean),
        "std": list(cfg.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def _tokenizer_source(src_dir: Path | None, tokenizer: str | Path | None) -> tuple[str, str]:
    """``("file", path)`` for a ``tokenizers`` JSON or ``("open_clip", name)`` for CLIP BPE; a
    tokenizer open_clip cannot load raises :class:`ConfigError` (one line, with the fix)."""
    if tokenizer is None and src_dir is not None:
        tokenizer = export_folder.tokenizer_source(src_dir)
    if tokenizer is None:
        raise ConfigError(
            "export has no tokenizer (no tokenizer.json or tokenizer.txt beside the model): "
            "without it open_clip would tokenise with CLIP's BPE; pass the tokenizer the model "
            "was trained with"
        )
    if Path(tokenizer).suffix == ".json":
        if not Path(tokenizer).is_file():
            raise ConfigError(f"tokenizer {tokenizer}: file not found")
        return "file", str(tokenizer)
    name = str(tokenizer)
    arch = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if arch and not arch["text_cfg"].get("hf_tokenizer_name") and "siglip" not in name.lower():
        return "open_clip", name  # open_clip's SimpleTokenizer, the CLIP BPE BiMAC wraps
    raise ConfigError(
        f"tokenizer {name!r} is not one open_clip can load from an export (a tokenizers "
        "tokenizer.json or an open_clip CLIP-BPE model name); open_clip would tokenise with "
        "CLIP's BPE instead, so the export is refused"
    )


def export_open_clip(
    model: BiMAC | str | Path,
    out_dir: str | Path,
    name: str | None = None,
    tokenizer: str | Path | None = None,
) -> OpenClipExport:
    """Write BiMAC's CoCa towers and its tokenizer as an open_clip checkpoint directory (see the
    module docstring).

    ``model``: a BiMAC or a BiMAC export directory. ``tokenizer``: a ``tokenizer.json`` or an
    open_clip model name (default: the one saved in the export directory). ``name``: the
    open_clip model name (default ``bimac-<config hash>``, so different sizes never clash).
    """
    src_dir = None
    if not isinstance(model, BiMAC):
        src_dir = Path(model)
        model = BiMAC.from_pretrained(src_dir)
    kind, source = _tokenizer_source(src_dir, tokenizer)
    cfg = model.config
    model_cfg = open_clip_model_config(cfg)
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:10]
    name = name or f"bimac-{digest}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        shutil.copyfile(source, out / TOKENIZER_FILE)
        tok = export_folder.load_tokenizer(
            out, cfg.context_length
        )  # checks the special tokens are there
        specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
        (out / HF_TOKENIZER_CONFIG).write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    **specials,
                    "unk_token": "<unk>",
                    "model_max_length": tok.context_length,
                },
                indent=2,
            )
        )
        # local-dir: loads the tokenizer from OUT whatever this says; by name, from this path
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(out.resolve())
    else:
        (out / "tokenizer.txt").write_text(source + "\n")
    config_path = out / f"{name}.json"
    config_path.write_text(json.dumps(model_cfg, indent=2))
    (out / LOCAL_CONFIG_FILE).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(cfg)}, indent=2)
    )
    state = {k: v.detach().contiguous().cpu() for k, v in model.coca.state_dict().items()}
    weights = out / WEIGHTS_FILE
    save_file(state, str(weights))
    logger.info("open_clip export %s: %s (%d tensors, %s tokenizer)", name, out, len(state), kind)
    return OpenClipExport(out, name, config_path, weights)


def register_open_clip(path: str | Path) -> list[str]:
    """Make open_clip know the model config(s) in ``path`` (a ``<name>.json`` or a directory);
    returns the registered names."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    names = []
    for f in files:
        data = json.loads(f.read_text())
        if all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
            open_clip.add_model_config(f)
            names.append(f.stem)
    if not names:
        raise FileNotFoundError(
            f"{path}: no open_clip model config (.json with embed_dim, vision_cfg, text_cfg)"
        )
    return names


# what BiMACConfig can express of an open_clip CoCa config: key -> (BiMAC field, default)
_VISION = {
    "image_size": ("image_size", None),
    "patch_size": ("patch_size", None),
    "width": ("vision_width", None),
    "layers": ("vision_layers", None),
    "head_width": ("vision_head_width", 64),
    "attentional_pool": ("attentional_pool", False),
    "attn_pooler_queries": ("attn_pooler_queries", 256),
    "attn_pooler_heads": ("attn_pooler_heads", 8),
}
_TEXT = {
    "context_length": ("context_length", None),
    "vocab_size": ("vocab_size", None),
    "width": ("text_width", None),
    "heads": ("text_heads", None),
    "layers": ("text_layers", None),
    "pad_id": ("pad_id", 0),
}
_IGNORED = {"output_tokens", "embed_cls", "mlp_ratio", "hf_tokenizer_name", "tokenizer_kwargs"}


def bimac_config_from_open_clip(
    model_cfg: dict[str, Any] | str, pretrained: str | None = None, **overrides: Any
) -> BiMACConfig:
    """:class:`BiMACConfig` with the tower shapes of an open_clip CoCa config (a dict, or a model
    name such as ``coca_ViT-B-32``) and ``pretrained`` (tag or file) as the weights to load.
    BiMAC-only fields (grounding and patch-decoder sizes) come from ``overrides`` or defaults.
    Anything of the open_clip config BiMAC cannot build (timm / HF towers, other block options)
    raises :class:`ConfigError`."""
    arch = model_cfg if isinstance(model_cfg, str) else None
    if arch is not None:
        found = open_clip.get_model_config(arch)
        if found is None:
            raise ConfigError(f"open_clip has no model config {arch!r}; register_open_clip(path)")
        model_cfg = found
    if "multimodal_cfg" not in model_cfg:
        raise ConfigError("not a CoCa config (no multimodal_cfg): BiMAC needs a caption decoder")
    fields: dict[str, Any] = {"embed_dim": model_cfg["embed_dim"]}
    for section, table in (("vision_cfg", _VISION), ("text_cfg", _TEXT)):
        sub = model_cfg[section]
        unknown = sorted(set(sub) - set(table) - _IGNORED)
        if unknown or sub.get("mlp_ratio", 4.0) != 4.0:
            raise ConfigError(f"open_clip {section} options BiMAC does not build: {unknown}")
        for key, (name, default) in table.items():
            if default is None and key not in sub:
                raise ConfigError(f"open_clip {section} lacks {key!r}")
            fields[name] = sub.get(key, default)
    mm = model_cfg["multimodal_cfg"]
    if (
        mm.get("width", fields["text_width"]) != fields["text_width"]
        or mm.get("heads", fields["text_heads"]) != fields["text_heads"]
    ):
        raise ConfigError("BiMAC's caption decoder has the text tower's width and heads")
    fields["decoder_layers"] = mm["layers"]
    if "init_logit_scale" in model_cfg:
        fields["init_logit_scale"] = model_cfg["init_logit_scale"]
    fields["pad_id"] = model_cfg.get("pad_id", fields["pad_id"])
    fields.setdefault("grounding_dim", fields["embed_dim"])
    fields.setdefault("patch_decoder_width", fields["text_width"])
    if arch is not None:
        fields["pretrained_arch"] = arch
    fields["pretrained"] = pretrained
    fields.update(overrides)
    return BiMACConfig(**fields)


def write_model_config(cfg: BiMACConfig, path: str | Path) -> Path:
    """Save a :class:`BiMACConfig` as a ``configs/model/*.yaml`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def import_open_clip(
    arch: str,
    pretrained: str,
    out_dir: str | Path | None = None,
    tokenizer: str | None = None,
    **overrides: Any,
) -> BiMAC:
    """BiMAC whose CoCa towers hold open_clip weights (``arch``: a registered CoCa name, or a
    ``<name>.json`` / export directory, which is registered first). With ``out_dir``, also writes
    a BiMAC export there plus ``model.yaml`` (to start ``python -m pretrain`` from)."""
    path = Path(arch)
    if path.suffix == ".json" or path.is_dir():
        arch = register_open_clip(path)[0]
    cfg = bimac_config_from_open_clip(arch, pretrained, **overrides)
    model = BiMAC(cfg)
    if out_dir is not None:
        out = Path(out_dir)
        model.save_pretrained(out, tokenizer=tokenizer)
        write_model_config(cfg, out / "model.yaml")
        if path.is_dir() and (path / TOKENIZER_FILE).is_file() and tokenizer is None:
            shutil.copyfile(path / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return model


__all__ = [
    "OpenClipExport",
    "bimac_config_from_open_clip",
    "export_open_clip",
    "import_open_clip",
    "open_clip_model_config",
    "register_open_clip",
    "write_model_config",
]
