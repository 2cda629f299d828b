"""The PAL Bengali captioner (PAL paper §3, §4.4-4.5): frozen MaxViT -> Linear+LN bridge -> mBART-50.

- Vision: a timm MaxViT (default ``maxvit_base_tf_224``), frozen and kept in eval mode; its final
  (7x7 at 224 px) stage and optionally the penultimate (14x14) stage are flattened into patch
  tokens. ``vision: "bimac:DIR"`` uses the raw patch grid of an exported BiMAC image tower instead.
  ``vision: "tiny"`` is a 4-stage, 1-block MaxViT with random weights for CPU runs; with
  ``train_vision: true`` it trains with the rest (a frozen random tower has nothing to give).
- Bridge (Eq. 3): one ``Linear(C, d_model) + LayerNorm`` per stage; the tokens are concatenated
  into the decoder's cross-attention memory ``E(x) [B, S, d_model]``.
- Decoder: the mBART-50 decoder (``MBartForConditionalGeneration``; its encoder is dropped, the
  bridge replaces it). Teacher forcing shifts the labels right with ``</s>`` as decoder start,
  labels start with the ``bn_IN`` code (mBART-50's target format), and generation forces ``bn_IN``
  as the first token through :class:`bimac.generation.MBartAdapter`. Attention is eager because
  SDPA returns no cross-attention maps (transformers 5.x), and PAL needs them.
- Progressive unfreezing: ``unfreeze`` is a list of ``(optimizer step, top decoder layers)``;
  ``-1`` = the whole decoder including embeddings. The bridge always trains; the tower only with
  ``train_vision``.
"""

from __future__ import annotations

import io
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bimac import export_folder
from bimac.config import from_dict, save_config

logger = logging.getLogger(__name__)

TINY_VISION_MEAN = (0.5, 0.5, 0.5)
TINY_VISION_STD = (0.5, 0.5, 0.5)


@dataclass
class TinyDecoderConfig:
    """Sizes of the random-weight mBART decoder used when ``decoder: tiny``."""

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 128
    max_positions: int = 64


@dataclass
class PALModelConfig:
    vision: str = "maxvit_base_tf_224"  # timm name, "tiny", or "bimac:DIR" (exported BiMAC)
    vision_pretrained: bool = True  # timm weights from the hub cache (or vision_weights)
    vision_weights: str | None = None  # local timm weights file (.safetensors / .pth)
    image_size: int = 224
    use_penultimate: bool = False  # also feed the penultimate (14x14) stage
    # Train the tower with the captioner (PAL freezes its pretrained MaxViT; a random ``tiny``
    # tower frozen reads colour but not shape or count, RESULTS.md "Causes found" 3).
    train_vision: bool = False
    decoder: str = "facebook/mbart-large-50"  # hub name / local dir, or "tiny" (random weights)
    tokenizer: str = "facebook/mbart-large-50"  # hub name / local dir, or "world" (trained here)
    target_lang: str = "bn_IN"
    max_length: int = 40  # caption tokens incl. the language code and </s>
    tiny_decoder: TinyDecoderConfig = field(default_factory=TinyDecoderConfig)
    gradient_checkpointing: bool = False
    unfreeze: list[tuple[int, int]] = field(default_factory=lambda: [(0, -1)])

    def __post_init__(self) -> None:
        if not self.unfreeze or self.unfreeze[0][0] != 0:
            raise ValueError("unfreeze must start with a (0, n_layers) entry")
        if any(b[0] <= a[0] for a, b in zip(self.unfreeze, self.unfreeze[1:])):
            raise ValueError("unfreeze steps must increase")


# ------------------------------------------------------------------------------- tokenizer


def world_bengali_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """The embedded world's Bengali captions of ``n`` train scenes."""
    from bimac.data.world import captions, make_scene

    return [c.text for i in range(n) for c in captions(make_scene(seed, "train", i))[1]]


def train_mbart50_tokenizer(texts: list[str], vocab_size: int = 256) -> Any:
    """A SentencePiece unigram vocabulary trained on ``texts``, wrapped as an mBART-50 tokenizer
    (fairseq id layout: ``<s>=0 <pad>=1 </s>=2 <unk>=3``, pieces, the 52 language codes, ``<mask>``).

    The training text is ``texts`` plus each of their words once on its own line. SentencePiece
    seeds its unigram pieces with the corpus's branching substrings only, and in a templated corpus
    a word that is always followed by a space (``▁তিনটি▁``) is never one: without the word lines
    the world's numerals, colours and ``আছে`` came out as single characters (5-7 pieces each)."""
    import sentencepiece as spm
    from transformers import MBart50Tokenizer

    words = sorted({w.strip(string.punctuation + "।") for t in texts for w in t.split()} - {""})
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*texts, *words]),
        model_writer=buf,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return MBart50Tokenizer(vocab=vocab, src_lang="en_XX", tgt_lang="bn_IN")


def load_tokenizer(name: str, target_lang: str = "bn_IN") -> Any:
    """``"world"``: trained on the embedded world's Bengali text; else a hub name or local dir."""
    if name == "world":
        tok = train_mbart50_tokenizer(world_bengali_corpus())
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    tok.tgt_lang = target_lang
    return tok


def never_generated_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids a caption never contains after the forced code: language codes, <s>, <pad>, <mask>."""
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES

    never = {tokenizer.convert_tokens_to_ids(c) for c in FAIRSEQ_LANGUAGE_CODES}
    never |= {tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id}
    return tuple(sorted(i for i in never if i is not None))


# ------------------------------------------------------------------------------- vision


def _tiny_maxvit(image_size: int) -> nn.Module:
    """3 one-block stages: the final grid is 4x4 at 64 px (a 4th stage would leave 2x2)."""
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, _tf_cfg

    cfg = MaxxVitCfg(
        embed_dim=(32, 32, 64),
        depths=(1, 1, 1),
        block_type=("C", "C", "M"),
        stem_width=16,
        head_hidden_size=None,
        **_tf_cfg(),
    )
    return MaxxVit(cfg, img_size=image_size, num_classes=0)


def check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(
            f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}"
        )


def normalize_images(
    images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float, resized to ``size`` px, normalised by ``mean``/``std``
    ``[1, 3, 1, 1]`` (on their device): the input of every captioner's vision encoder."""
    check_images(images)
    x = images.to(mean.device).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - mean) / std


class VisionTower(nn.Module):
    """Patch-token extractor: uint8 images -> list of ``[B, S_i, C_i]`` (one per stage); frozen
    and in eval mode unless ``cfg.train_vision``."""

    def __init__(self, cfg: PALModelConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.bimac = None
        if cfg.vision.startswith("bimac:"):
            from bimac.models.bimac import BiMAC

            self.bimac = BiMAC.from_pretrained(cfg.vision.removeprefix("bimac:"))
            self.trunk = self.bimac
            self.stage_indices: list[int] = []
            self.channels = [self.bimac.coca.visual.transformer.width]
            mean, std = TINY_VISION_MEAN, TINY_VISION_STD  # BiMAC normalises itself
        else:
            if cfg.vision == "tiny":
                self.trunk = _tiny_maxvit(cfg.image_size)
                mean, std = TINY_VISION_MEAN, TINY_VISION_STD
            else:
                import timm

                overlay = {"file": cfg.vision_weights} if cfg.vision_weights else None
                self.trunk = timm.create_model(
                    cfg.vision,
                    pretrained=cfg.vision_pretrained,
                    pretrained_cfg_overlay=overlay,
                    num_classes=0,
                    img_size=cfg.image_size,
                )
                mean, std = self.trunk.pretrained_cfg["mean"], self.trunk.pretrained_cfg["std"]
            # forward_intermediates counts the stem as feature 0: stage i is feature i + 1
            n = len(self.trunk.stages)
            self.stage_indices = [n - 1, n] if cfg.use_penultimate else [n]
            self.channels = [self.trunk.feature_info[i]["num_chs"] for i in self.stage_indices]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.trainable = cfg.train_vision
        self.trunk.requires_grad_(self.trainable)
        self.train(False)

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        if not self.trainable:
            self.trunk.eval()  # frozen: dropout / drop-path off, whatever the caller's mode
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self._patch_tokens(images)

    def _patch_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.bimac is not None:
            check_images(images)
            return [self.bimac.image_towers(self.bimac.normalize(images.to(self.mean.device)))[2]]
        x = normalize_images(images, self.image_size, self.mean, self.std)
        maps = self.trunk.forward_intermediates(
            x, indices=self.stage_indices, intermediates_only=True
        )
        return [m.flatten(2).transpose(1, 2) for m in maps]


# ------------------------------------------------------------------------------- captioner


def _build_mbart(cfg: PALModelConfig, tokenizer: Any) -> nn.Module:
    from transformers import MBartConfig, MBartForConditionalGeneration

    lang_id = tokenizer.convert_tokens_to_ids(cfg.target_lang)
    if cfg.decoder == "tiny":
        t = cfg.tiny_decoder
        mcfg = MBartConfig(
            vocab_size=len(tokenizer),
            d_model=t.d_model,
            encoder_layers=1,
            decoder_layers=t.layers,
            encoder_attention_heads=t.heads,
            decoder_attention_heads=t.heads,
            encoder_ffn_dim=t.ffn_dim,
            decoder_ffn_dim=t.ffn_dim,
            max_position_embeddings=t.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.eos_token_id,
            forced_bos_token_id=lang_id,
            scale_embedding=True,
            dropout=0.0,
            attention_dropout=0.0,
        )
        mcfg._attn_implementation = "eager"
        model = MBartForConditionalGeneration(mcfg)
    else:
        model = MBartForConditionalGeneration.from_pretrained(
            cfg.decoder, attn_implementation="eager"
        )
        model.config.forced_bos_token_id = lang_id
        model.config.decoder_start_token_id = tokenizer.eos_token_id
    model.model.encoder = None  # the bridge is the encoder; saves ~200M parameters at full size
    return model


class PALCaptioner(nn.Module):
    """Vision tower -> bridge -> mBART-50 decoder. See the module docstring."""

    def __init__(self, cfg: PALModelConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = (
            tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, cfg.target_lang)
        )
        self.vision = VisionTower(cfg)
        self.mbart = _build_mbart(cfg, self.tokenizer)
        d = self.mbart.config.d_model
        self.bridge = nn.ModuleList(
            nn.Sequential(nn.Linear(c, d), nn.LayerNorm(d)) for c in self.vision.channels
        )
        self.lang_id = self.tokenizer.convert_tokens_to_ids(cfg.target_lang)
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.eos_token_id
        # Training micro-batches seen (the task divides by the accumulation to get optimizer
        # steps); drives the unfreezing schedule and is saved with the weights, so resume keeps it.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if cfg.gradient_checkpointing:
            self.set_grad_checkpointing(True)
        # Everything but the tower starts trainable so an optimizer built now holds it all; the
        # training task applies the schedule (apply_unfreeze) before each step. A parameter
        # frozen by the schedule has no gradient, so AdamW leaves it as it is until its turn.
        self._unfrozen: int | None = None

    # -- parameters -------------------------------------------------------------------------

    @property
    def decoder(self) -> nn.Module:
        return self.mbart.model.decoder

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the decoder layers (the engine's ``activation_checkpointing``)."""
        # transformers 5.x renamed gradient_* to activation_checkpointing_* (old names deprecated).
        verb = "enable" if enable else "disable"
        fn = getattr(self.mbart, f"activation_checkpointing_{verb}", None)
        (fn or getattr(self.mbart, f"gradient_checkpointing_{verb}"))()

    def apply_unfreeze(self, step: int) -> int:
        """Set ``requires_grad`` per the schedule at optimizer ``step``; returns the layer count."""
        n_layers = next(n for s, n in reversed(self.cfg.unfreeze) if step >= s)
        if n_layers == self._unfrozen:
            return n_layers
        layers = self.decoder.layers
        train_all = n_layers < 0 or n_layers >= len(layers)
        self.mbart.requires_grad_(train_all)
        if not train_all:
            for layer in layers[len(layers) - n_layers :]:
                layer.requires_grad_(True)
            if self.decoder.layer_norm is not None:
                self.decoder.layer_norm.requires_grad_(True)
        self.bridge.requires_grad_(True)
        logger.info(
            "PAL decoder: %s trainable from step %d",
            "all layers" if train_all else f"top {n_layers} layers",
            step,
        )
        self._unfrozen = n_layers
        return n_layers

    # -- forward ----------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> bridge tokens ``E(x) [B, S, d_model]`` (Eq. 3), the decoder memory."""
        stages = self.vision(images)
        dtype = self.bridge[0][0].weight.dtype  # the bridge runs in the decoder's dtype
        return torch.cat([b(s.to(dtype)) for b, s in zip(self.bridge, stages)], dim=1)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: ``</s>`` then the labels without their last token."""
        start = torch.full_like(labels[:, :1], self.eos_id)
        return torch.cat([start, labels[:, :-1]], dim=1)

    def decode(
        self, memory: torch.Tensor, labels: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Teacher-forced logits ``[B, T, V]`` for ``labels [B, T]`` (``bn_IN ... </s> <pad>...``)
        and, if asked, the per-layer cross-attention maps ``[B, heads, T, S]``."""
        out = self.decoder(
            input_ids=self.shift_right(labels),
            encoder_hidden_states=memory,
            output_attentions=output_attentions,
            use_cache=False,
        )
        logits = self.mbart.lm_head(out.last_hidden_state) + self.mbart.final_logits_bias
        cross = out.cross_attentions if output_attentions else None
        if output_attentions and (not cross or cross[0] is None):
            raise RuntimeError(
                "the decoder returned no cross-attentions: it must use eager attention"
            )
        return logits, cross

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        images_syn: torch.Tensor | None = None,
        caption_syn: bool = False,
        output_attentions: bool = False,
    ) -> dict[str, Any]:
        """One training pass: ``memory`` E(x), ``logits`` and ``cross_attentions`` on the real
        images; with ``images_syn``, ``memory_syn`` E(x~) and (``caption_syn``) ``logits_syn``."""
        memory = self.encode(images)
        logits, cross = self.decode(memory, labels, output_attentions)
        out: dict[str, Any] = {"memory": memory, "logits": logits, "cross_attentions": cross}
        if images_syn is not None:
            out["memory_syn"] = self.encode(images_syn)
            if caption_syn:
                out["logits_syn"] = self.decode(out["memory_syn"], labels)[0]
        return out

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Bengali captions -> labels ``[B, T]`` in mBART-50 target format, ``pad`` filled."""
        enc = self.tokenizer(
            text_target=texts,
            max_length=self.cfg.max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        return enc["input_ids"]

    # -- generation -------------------------------------------------------------------------

    def adapter(self) -> Any:
        from bimac.generation import MBartAdapter

        adapter = MBartAdapter.from_model(
            self.mbart, forced_first_token_id=self.lang_id, tokenizer=self.tokenizer
        )
        adapter.suppressed_token_ids = never_generated_ids(self.tokenizer)
        return adapter

    @torch.no_grad()
    def caption(self, images: torch.Tensor, gen_cfg: Any = None) -> Any:
        """Beam search (forced ``bn_IN``) -> ``bimac.generation.GenerationOutput`` with ``texts``."""
        from bimac.generation import GenerationConfig, generate

        gen_cfg = gen_cfg or GenerationConfig(
            strategy="beam", num_beams=4, max_new_tokens=self.cfg.max_length, no_repeat_ngram_size=3
        )
        was_training = self.training
        self.eval()
        try:
            return generate(self.adapter(), self.encode(images), gen_cfg)
        finally:
            self.train(was_training)

    # -- persistence ------------------------------------------------------------------------

    def _tied_keys(self) -> set[str]:
        """State-dict keys that share storage with an earlier key (the tied embedding and LM
        head): safetensors refuses shared storage, and loading the first one restores them."""
        seen: set[int] = set()
        tied = set()
        for k, v in self.state_dict(keep_vars=True).items():
            ptr = v.data_ptr()
            if ptr in seen:
                tied.add(k)
            seen.add(ptr)
        return tied

    def save_pretrained(self, directory: str | Path) -> None:
        """``model.safetensors`` (bridge + decoder + step; not a frozen pretrained tower), ``config.yaml`` and the tokenizer files; loads without pickled code."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if k not in self._tied_keys()}
        if self.cfg.vision != "tiny" and not self.cfg.train_vision:  # the hub's weights
            state = {k: v for k, v in state.items() if not k.startswith("vision.")}
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors")
        )
        save_config(self.cfg, directory / "config.yaml")
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> PALCaptioner:
        import yaml
        from transformers import AutoTokenizer

        directory = Path(directory)
        data = yaml.safe_load((directory / "config.yaml").read_text())
        cfg = from_dict(PALModelConfig, data)
        tok = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
        tok.tgt_lang = cfg.target_lang
        model = cls(cfg, tokenizer=tok)
        state = export_folder.load_weights(directory, map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = model._tied_keys()
        missing = [k for k in missing if not k.startswith("vision.") and k not in tied]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model
