"""BiMAC: open_clip's CoCa towers plus a grounding head and the patch-reconstruction decoder D_p.

Paper: BiMAC, Algorithm 1 and Fig. 1. E_img, E_txt and D_txt are open_clip's CoCa towers
(``model.coca``), built from a config dict with random weights or loaded from an open_clip
pretrained tag / checkpoint file. BiMAC adds

- grounding heads that project the *raw* ViT patch grid (taken before any attentional pooler,
  which would hand us 255 pooled queries instead of patches) and noun embeddings (text-encoder
  token outputs mean-pooled over each noun's token span, Eq. 2) into one space, where
  S = W Rᵀ (Eq. 7) is scored;
- D_p: a cross-attention transformer whose queries are the patch positions and whose keys and
  values are the grounded noun embeddings (each noun plus the position embedding of the patch
  Hungarian matching gave it), reconstructing every patch's pixels (L_rec).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bimac import export_folder
from bimac.config import ConfigError, from_dict, load_config
from bimac.matching import hungarian_match

logger = logging.getLogger(__name__)


@dataclass
class BiMACConfig:
    """Sizes of the CoCa towers and the BiMAC heads (defaults: the CPU ``tiny`` model)."""

    embed_dim: int = 64
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 2
    vision_head_width: int = 32
    attentional_pool: bool = False
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    decoder_layers: int = 2
    context_length: int = 32
    vocab_size: int = 1000
    pad_id: int = 0
    grounding_dim: int = 64
    patch_decoder_width: int = 128
    patch_decoder_layers: int = 2
    patch_decoder_heads: int = 4
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    init_logit_scale: float = 2.659260036932778  # log(1 / 0.07), open_clip's default
    # open_clip weights for real users: a checkpoint file, or a pretrained tag of `pretrained_arch`
    # (e.g. "mscoco_finetuned_laion2b_s13b_b90k"); None = random init (tests, CI, the tiny model).
    pretrained: str | None = None
    pretrained_arch: str = "coca_ViT-B-32"
    # top-level submodules whose weights stay fixed: any of "visual", "text", "text_decoder",
    # "patch_decoder", "grounding"
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
        memory = self.embed_dim if self.attentional_pool else self.vision_width
        if memory != self.text_width:
            raise ValueError(
                f"the caption decoder (width text_width={self.text_width}) cross-attends image tokens "
                f"of width {memory} ({'embed_dim' if self.attentional_pool else 'vision_width'}); "
                "make them equal"
            )
        unknown = set(self.freeze) - set(FREEZABLE)
        if unknown:
            raise ValueError(f"freeze: unknown part {sorted(unknown)}; choose from {FREEZABLE}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def coca_kwargs(self) -> dict[str, Any]:
        """The open_clip ``CoCa`` constructor arguments for these sizes."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "attentional_pool": self.attentional_pool,
                "attn_pooler_queries": self.attn_pooler_queries,
                "attn_pooler_heads": self.attn_pooler_heads,
                "output_tokens": True,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
                "embed_cls": True,
                "output_tokens": True,
                "pad_id": self.pad_id,
            },
            "multimodal_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.decoder_layers,
                "attn_pooler_heads": self.text_heads,
            },
            "init_logit_scale": self.init_logit_scale,
            "pad_id": self.pad_id,
        }


FREEZABLE = ("visual", "text", "text_decoder", "patch_decoder", "grounding")


class PatchDecoder(nn.Module):
    """D_p: patch-position queries cross-attend to (grounded) noun embeddings -> patch pixels.

    A learned "no text" key is always present, so a caption without nouns still has something to
    attend to (an all-masked attention row would be NaN). ``grad_checkpointing`` recomputes each
    block in backward (non-reentrant, like open_clip's towers).
    """

    def __init__(
        self,
        num_patches: int,
        text_dim: int,
        width: int,
        layers: int,
        heads: int,
        patch_pixels: int,
    ) -> None:
        super().__init__()
        self.query_pos = nn.Parameter(torch.randn(num_patches, width) * 0.02)
        self.key_pos = nn.Parameter(torch.randn(num_patches, width) * 0.02)
        self.null_key = nn.Parameter(torch.zeros(1, 1, width))
        self.in_proj = nn.Linear(text_dim, width)
        layer = nn.TransformerDecoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(width))
        self.out = nn.Linear(width, patch_pixels)
        self.grad_checkpointing = False

    def forward(
        self, nouns: torch.Tensor, noun_mask: torch.Tensor, matches: torch.Tensor | None
    ) -> torch.Tensor:
        """``nouns [B, N, Dt]``, ``noun_mask [B, N]``, ``matches [B, N]`` patch index per noun
        (-1: unmatched; None: ungrounded, GIT without grounding) -> ``[B, P, patch_pixels]``."""
        b = nouns.shape[0]
        kv = self.in_proj(nouns)
        if matches is not None:
            pos = self.key_pos[matches.clamp(min=0)] * (matches >= 0).unsqueeze(-1)
            kv = kv + pos
        kv = torch.cat([self.null_key.expand(b, -1, -1), kv], dim=1)
        pad = torch.cat([noun_mask.new_zeros(b, 1), ~noun_mask], dim=1)
        x = self.query_pos.unsqueeze(0).expand(b, -1, -1)
        # nn.TransformerDecoder's own loop (no masks on the queries), one checkpoint per block
        for block in self.blocks.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, kv, memory_key_padding_mask=pad, use_reentrant=False)
            else:
                x = block(x, kv, memory_key_padding_mask=pad)
        return self.out(self.blocks.norm(x))


def _init_multimodal_decoder(decoder: nn.Module) -> None:
    """open_clip's initialisation of the CoCa multimodal decoder, which open_clip 3.3 never runs.

    Its ``text_projection`` is created with ``torch.empty`` (garbage: logits ~1e23 here) and its
    own ``init_parameters`` raises (it reads a ``.transformer`` attribute the class lacks); only
    pretrained weights hide this. Same standard deviations as ``MultimodalTransformer.init_parameters``.
    """
    width, layers = decoder.width, len(decoder.resblocks)
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    for block in [*decoder.resblocks, *decoder.cross_attn]:
        nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(decoder.text_projection, std=width**-0.5)


def pool_spans(tokens: torch.Tensor, spans: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens [B, L, D]`` over each span ``[start, end)`` in ``spans [B, N, 2]`` -> ``[B, N, D]``.

    Padded nouns (``mask`` False) and empty spans give zeros.
    """
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    inside = (pos >= spans[..., :1]) & (pos < spans[..., 1:]) & mask.unsqueeze(-1)  # [B, N, L]
    weights = inside.to(tokens.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return weights @ tokens


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, P, patch*patch*C]`` in row-major patch order (ViT's order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class BiMAC(nn.Module):
    """CoCa towers (``self.coca``, an ``open_clip.CoCa``) + grounding heads + patch decoder D_p."""

    def __init__(self, config: BiMACConfig) -> None:
        super().__init__()
        self.config = config
        self.coca = open_clip.CoCa(**config.coca_kwargs())
        _init_multimodal_decoder(self.coca.text_decoder)
        if config.pretrained:
            self._load_open_clip(config.pretrained)
        num_patches = config.grid**2
        self.patch_norm = nn.LayerNorm(config.vision_width)
        self.patch_proj = nn.Linear(config.vision_width, config.grounding_dim)
        self.noun_norm = nn.LayerNorm(config.text_width)
        self.noun_proj = nn.Linear(config.text_width, config.grounding_dim)
        # SigLIP-style scale and bias: Eq. 7 puts cosine scores through a sigmoid
        self.grounding_logit_scale = nn.Parameter(torch.tensor(2.302585))  # log 10
        self.grounding_logit_bias = nn.Parameter(torch.tensor(-5.0))
        self.patch_decoder = PatchDecoder(
            num_patches,
            config.text_width,
            config.patch_decoder_width,
            config.patch_decoder_layers,
            config.patch_decoder_heads,
            3 * config.patch_size**2,
        )
        self.register_buffer(
            "mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False
        )
        for name in config.freeze:
            for p in self._part(name).parameters():
                p.requires_grad_(False)

    def _part(self, name: str) -> nn.Module:
        if name in ("visual", "text", "text_decoder"):
            return getattr(self.coca, name)
        if name == "grounding":
            return nn.ModuleList([self.patch_norm, self.patch_proj, self.noun_norm, self.noun_proj])
        return self.patch_decoder

    def _load_open_clip(self, pretrained: str) -> None:
        path = Path(pretrained)
        if not path.is_file():
            cfg = open_clip.get_pretrained_cfg(self.config.pretrained_arch, pretrained)
            if not cfg:
                raise ConfigError(
                    f"pretrained: {pretrained!r} is neither a file nor an open_clip tag of "
                    f"{self.config.pretrained_arch}"
                )
            path = Path(open_clip.download_pretrained(cfg))
        # open_clip resizes position embeddings (e.g. 224 -> 256 px) and reports mismatches
        incompatible = open_clip.load_checkpoint(self.coca, str(path), strict=False)
        logger.info("loaded open_clip weights from %s: %s", path, incompatible)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of the three CoCa towers and D_p in backward.

        open_clip 3.3's towers checkpoint each residual block with ``use_reentrant=False`` (their
        own switch), as D_p does: reentrant checkpointing breaks on modules used twice.
        """
        self.coca.set_grad_checkpointing(enable)
        self.patch_decoder.grad_checkpointing = enable

    def caption_adapter(self, tokenizer: Any) -> Any:
        """The caption decoder as a :class:`bimac.generation.CocaAdapter` with the tokenizer's
        start / end tokens (RF rewards in pretraining, SCST in fine-tuning)."""
        from bimac.generation import CocaAdapter

        return CocaAdapter(
            self.coca,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=self.config.pad_id,
        )

    def grounding_parts(self) -> list[nn.Module | nn.Parameter]:
        """What only the grounding objective trains: noun/patch projections and its sigmoid."""
        return [
            self.patch_norm,
            self.patch_proj,
            self.noun_norm,
            self.noun_proj,
            self.grounding_logit_scale,
            self.grounding_logit_bias,
        ]

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (bf16 / fp16 when DeepSpeed casts the model, no autocast)."""
        return self.coca.visual.conv1.weight.dtype

    # -- inputs -----------------------------------------------------------------------------

    def normalize(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (on any device) -> normalised pixels on the model's device,
        computed in float32 and returned in ``dtype`` (default: the weights' dtype)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"BiMAC expects uint8 images, got {images.dtype}")
        images = images.to(self.mean.device, non_blocking=True)
        pixels = (images.float() / 255.0 - self.mean.float()) / self.std.float()
        return pixels.to(self.dtype if dtype is None else dtype)

    # -- towers -----------------------------------------------------------------------------

    def image_towers(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised pixels -> (global latent [B, D], decoder tokens, raw patch grid [B, P, Wv]).

        Runs the ViT trunk once and splits it: the raw patch tokens before open_clip's pooler
        (for grounding), and the pooler's output (global + decoder tokens) as CoCa uses them.
        """
        visual = self.coca.visual
        x = visual.transformer(visual._embeds(pixels))
        patches = x[:, 1:]
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, tokens, patches

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> L2-normalised global image embeddings ``[B, D]``."""
        return F.normalize(self.coca.encode_image(self.normalize(images), normalize=False), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids ``[B, L]`` -> L2-normalised global text embeddings ``[B, D]``."""
        return self.coca.encode_text(ids.to(self.mean.device), normalize=True)

    def ground_features(
        self, patches: torch.Tensor, nouns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw patches ``[B, P, Wv]`` and pooled nouns ``[B, N, Wt]`` -> unit vectors in one space."""
        r = F.normalize(self.patch_proj(self.patch_norm(patches)), dim=-1)
        w = F.normalize(self.noun_proj(self.noun_norm(nouns)), dim=-1)
        return r, w

    # -- training forward ---------------------------------------------------------------------

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        noun_spans: torch.Tensor | None = None,
        noun_mask: torch.Tensor | None = None,
        *,
        caption: bool = True,
        grounding: bool = True,
        reconstruction: bool = True,
        grounded_reconstruction: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One pass for all objectives; each flag skips the work of an objective that is off.

        Returns ``image_features``/``text_features`` (normalised), ``logit_scale``; with
        ``caption``: ``logits [B, L-1, V]``, ``labels`` and ``decoder_memory`` (the image tokens
        D_txt attends to, for generating captions without re-encoding); with ``grounding`` or
        ``reconstruction``: ``patch_emb [B, P, G]``, ``noun_emb [B, N, G]`` (unit vectors), ``noun_mask``,
        ``grounding_logit_scale``/``_bias`` and ``matches [B, N]`` (Hungarian, -1 = none);
        with ``reconstruction``: ``reconstruction [B, P, 3*p*p]`` and ``target_pixels`` (the
        normalised input cut into the same patches, float32).

        Inputs and constants follow the weights' dtype; the Hungarian scores and the
        reconstruction target are float32 whatever it is.
        """
        device = self.mean.device
        pixels32 = self.normalize(image, torch.float32)
        pixels = pixels32.to(self.dtype)
        text = text.to(device)
        image_latent, image_tokens, patches = self.image_towers(pixels)
        text_latent, token_embs = self.coca.text(text)
        out = {
            "image_features": F.normalize(image_latent, dim=-1),
            "text_features": F.normalize(text_latent, dim=-1),
            "logit_scale": self.coca.logit_scale.exp(),
        }
        if caption:
            out["logits"] = self.coca.text_decoder(image_tokens, token_embs[:, :-1])
            out["labels"] = text[:, 1:]
            out["decoder_memory"] = image_tokens
        if not (grounding or reconstruction):
            return out
        if noun_spans is None or noun_mask is None:
            raise ValueError("grounding/reconstruction need noun_spans and noun_mask in the batch")
        noun_spans, noun_mask = noun_spans.to(device), noun_mask.to(device)
        nouns = pool_spans(token_embs, noun_spans, noun_mask)
        r, w = self.ground_features(patches, nouns)
        scale = self.grounding_logit_scale.exp()
        out.update(
            patch_emb=r,
            noun_emb=w,
            noun_mask=noun_mask,
            grounding_logit_scale=scale,
            grounding_logit_bias=self.grounding_logit_bias,
        )
        matches = None
        if grounding or grounded_reconstruction:
            matches = hungarian_match(torch.einsum("bnd,bpd->bnp", w.float(), r.float()), noun_mask)
            out["matches"] = matches
        if reconstruction:
            out["reconstruction"] = self.patch_decoder(
                nouns, noun_mask, matches if grounded_reconstruction else None
            )
            out["target_pixels"] = patchify(pixels32, self.config.patch_size)
        return out

    # -- export -----------------------------------------------------------------------------

    def save_pretrained(
        self, directory: str | Path, tokenizer: Any = None, experiment_config: Any = None
    ) -> None:
        """An export folder (:mod:`bimac.export_folder`) in ``directory``.

        Its config holds the experiment config when given (it must have a ``model`` field), else
        ``{model: <BiMACConfig>}``. ``tokenizer``: see :func:`bimac.export_folder.save_tokenizer`.
        """
        config = experiment_config if experiment_config is not None else _Saved(self.config)
        export_folder.save(directory, self.state_dict(), config)
        export_folder.save_tokenizer(directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> BiMAC:
        """Rebuild from ``save_pretrained`` output: safetensors only, no pickled code runs."""
        model = cls(export_model_config(directory))
        model.load_state_dict(export_folder.load_weights(directory, map_location))
        return model


@dataclass
class _Saved:
    model: BiMACConfig


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine or a DDP wrapper (its ``module``), else ``model``."""
    return getattr(model, "module", model)


def export_model_config(directory: str | Path, key: str = "--checkpoint") -> BiMACConfig:
    """The model config of the export folder ``directory`` (its weights load into this)."""
    data = export_folder.read_config(directory, key)
    return dataclasses.replace(from_dict(BiMACConfig, data["model"], "model."), pretrained=None)


def load_model_config(path: str | Path, overrides: list[str] = ()) -> BiMACConfig:
    """``configs/model/*.yaml`` -> :class:`BiMACConfig`."""
    return load_config(BiMACConfig, path, overrides)
