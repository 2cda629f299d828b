"""PAL Table 1's baselines: the two captioners the PAL paper re-implemented "under our setup and
dataset" (§5.2) — a ViT encoder with a (Bangla) GPT-2 decoder [12] and a CNN encoder with an LSTM
decoder [5] — selected by ``model.architecture`` (``pal``, ``vit_gpt2``, ``cnn_lstm``).

The paper gives neither their sizes nor their losses beyond "same data and compute"; both are
cross-entropy captioners (teacher forcing on the real image + Bengali caption, PAD masked), with
the PAL captioner's tokenizer, label format (``bn_IN ... </s>``, ``</s>`` as decoder start, the
language code forced first when generating) and evaluation. Their encoders train with them
(``train_encoder``; the cited works fine-tune end to end, the PAL paper does not say).

- ``vit_gpt2``: a timm ViT (``encoder``, any timm name; ``encoder_args`` override its constructor,
  e.g. the tiny sizes) whose tokens, through ``Linear + LayerNorm`` to the decoder width, are the
  cross-attention memory of ``transformers.GPT2LMHeadModel`` built with ``add_cross_attention``:
  from a ``GPT2Config`` (``decoder: tiny``) or a hub name / local dir (the paper's Bangla GPT-2;
  its cross-attention starts random, its embeddings are resized to the captioning tokenizer).
  Decoding reuses :class:`bimac.generation.MBartAdapter` (any transformers decoder that reads
  ``encoder_hidden_states`` with an ``EncoderDecoderCache``).
- ``cnn_lstm``: a timm CNN (default ResNet-50) pooled to one vector that sets the initial hidden
  and cell states of an ``nn.LSTM`` (Show and Tell, without attention: [5] is an encoder-decoder
  without it); decoding through :class:`LSTMAdapter`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bimac import export_folder
from bimac.config import from_dict, save_config
from bimac.generation import DecoderAdapter, GenerationConfig, MBartAdapter, generate
from bimac.models.pal_captioner import (
    PALCaptioner,
    PALModelConfig,
    never_generated_ids,
    normalize_images,
)


@dataclass
class TinyGPT2Config:
    """``GPT2Config`` sizes for ``decoder: tiny`` (random weights; tiny PAL's mBART sizes)."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_inner: int = 128
    n_positions: int = 64


@dataclass
class ViTGPT2Config:
    encoder: str = "vit_base_patch16_224"  # timm name ([12]: ViT-Base/16)
    encoder_pretrained: bool = True  # timm weights from the hub cache (or encoder_weights)
    encoder_weights: str | None = None  # local timm weights file
    encoder_args: dict[str, Any] = field(default_factory=dict)  # timm constructor overrides
    train_encoder: bool = True
    decoder: str = "flax-community/gpt2-bengali"  # hub name / local dir, or "tiny"
    tiny_decoder: TinyGPT2Config = field(default_factory=TinyGPT2Config)


@dataclass
class CNNLSTMConfig:
    encoder: str = "resnet50"  # timm name of a CNN with a pooled output
    encoder_pretrained: bool = True
    encoder_weights: str | None = None
    encoder_args: dict[str, Any] = field(default_factory=dict)  # e.g. {layers: [1,1,1,1]}
    train_encoder: bool = True
    embed_dim: int = 512
    hidden_size: int = 512
    num_layers: int = 1


@dataclass
class CaptionerConfig(PALModelConfig):
    """``model`` section of ``finetune.caption_bn``: the PAL captioner's keys (tokenizer,
    ``max_length``, ``image_size``, ``target_lang`` serve every architecture) and the baselines'."""

    architecture: Literal["pal", "vit_gpt2", "cnn_lstm"] = "pal"
    vit_gpt2: ViTGPT2Config = field(default_factory=ViTGPT2Config)
    cnn_lstm: CNNLSTMConfig = field(default_factory=CNNLSTMConfig)


def _timm_encoder(name: str, pretrained: bool, weights: str | None, args: dict) -> nn.Module:
    import timm

    overlay = {"file": weights} if weights else None
    return timm.create_model(
        name, pretrained=pretrained, pretrained_cfg_overlay=overlay, num_classes=0, **args
    )


class BaselineCaptioner(nn.Module):
    """Shared by both baselines: the encoder's image normalisation, the PAL captioner's label
    format and tokenisation, CE-only ``forward``, generation and export."""

    # the PAL captioner's own methods (they read only tokenizer, eos_id, cfg.max_length, weights)
    shift_right = PALCaptioner.shift_right
    tokenize = PALCaptioner.tokenize
    _tied_keys = PALCaptioner._tied_keys

    def __init__(self, cfg: CaptionerConfig, tokenizer: Any, encoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = encoder
        mean, std = encoder.pretrained_cfg["mean"], encoder.pretrained_cfg["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.lang_id = tokenizer.convert_tokens_to_ids(cfg.target_lang)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    def freeze_encoder(self, train_encoder: bool) -> None:
        self.encoder.requires_grad_(train_encoder)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.cfg.image_size, self.mean, self.std)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, memory: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, V]`` for ``labels [B, T]``."""
        raise NotImplementedError

    def adapter(self) -> DecoderAdapter:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.decode(self.encode(images), labels)}

    @torch.no_grad()
    def caption(self, images: torch.Tensor, gen_cfg: GenerationConfig | None = None) -> Any:
        """Beam search (forced ``bn_IN``) -> ``bimac.generation.GenerationOutput`` with ``texts``."""
        gen_cfg = gen_cfg or GenerationConfig(
            strategy="beam", num_beams=4, max_new_tokens=self.cfg.max_length, no_repeat_ngram_size=3
        )
        was_training = self.training
        self.eval()
        try:
            adapter = self.adapter()
            adapter.suppressed_token_ids = never_generated_ids(self.tokenizer)
            return generate(adapter, self.encode(images), gen_cfg)
        finally:
            self.train(was_training)

    def save_pretrained(self, directory: str | Path) -> None:
        """``model.safetensors`` (all weights), ``config.yaml`` and the tokenizer files."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tied = self._tied_keys()
        state = {k: v.contiguous() for k, v in self.state_dict().items() if k not in tied}
        save_file(state, str(directory / export_folder.MODEL_FILE))
        save_config(self.cfg, directory / export_folder.CONFIG_FILE)
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))


class ViTGPT2Captioner(BaselineCaptioner):
    """timm ViT tokens -> Linear+LN -> GPT-2 with cross-attention. See the module docstring."""

    def __init__(self, cfg: CaptionerConfig, tokenizer: Any) -> None:
        v = cfg.vit_gpt2
        args = {"img_size": cfg.image_size, **v.encoder_args}
        super().__init__(
            cfg, tokenizer, _timm_encoder(v.encoder, v.encoder_pretrained, v.encoder_weights, args)
        )
        self.gpt2 = self._build_gpt2(v, tokenizer)
        d = self.gpt2.config.n_embd
        self.bridge = nn.Sequential(nn.Linear(self.encoder.num_features, d), nn.LayerNorm(d))
        self.freeze_encoder(v.train_encoder)

    @staticmethod
    def _build_gpt2(v: ViTGPT2Config, tokenizer: Any) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if v.decoder == "tiny":
            t = v.tiny_decoder
            gcfg = GPT2Config(
                vocab_size=len(tokenizer),
                **dataclasses.asdict(t),
                add_cross_attention=True,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **ids,
            )
            return GPT2LMHeadModel(gcfg)
        model = GPT2LMHeadModel.from_pretrained(v.decoder, add_cross_attention=True, **ids)
        model.resize_token_embeddings(len(tokenizer))
        return model

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Every ViT token (class token included) in the decoder width ``[B, 1 + N, n_embd]``."""
        return self.bridge(self.encoder.forward_features(self.pixels(images)))

    def decode(self, memory: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        inputs = self.shift_right(labels)
        # causal attention: pads after </s> never reach a caption token; masked anyway
        mask = (inputs != self.pad_id).long()
        out = self.gpt2(
            input_ids=inputs, attention_mask=mask, encoder_hidden_states=memory, use_cache=False
        )
        return out.logits

    def adapter(self) -> DecoderAdapter:
        return MBartAdapter(
            self.gpt2.transformer,
            self.gpt2.lm_head,
            decoder_start_token_id=self.eos_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            forced_first_token_id=self.lang_id,
            tokenizer=self.tokenizer,
        )


class CNNLSTMCaptioner(BaselineCaptioner):
    """Pooled CNN feature -> initial ``(h, c)`` of an LSTM decoder. See the module docstring."""

    def __init__(self, cfg: CaptionerConfig, tokenizer: Any) -> None:
        c = cfg.cnn_lstm
        super().__init__(
            cfg,
            tokenizer,
            _timm_encoder(c.encoder, c.encoder_pretrained, c.encoder_weights, c.encoder_args),
        )
        state = c.num_layers * c.hidden_size
        self.init_h = nn.Linear(self.encoder.num_features, state)
        self.init_c = nn.Linear(self.encoder.num_features, state)
        self.embed = nn.Embedding(len(tokenizer), c.embed_dim, padding_idx=self.pad_id)
        self.lstm = nn.LSTM(c.embed_dim, c.hidden_size, c.num_layers, batch_first=True)
        self.head = nn.Linear(c.hidden_size, len(tokenizer))
        self.freeze_encoder(c.train_encoder)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The CNN's pooled feature ``[B, F]``."""
        return self.encoder(self.pixels(images))

    def initial_state(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h0, c0)``, each ``[num_layers, B, hidden]``, from the image feature."""
        shape = (feature.shape[0], self.cfg.cnn_lstm.num_layers, self.cfg.cnn_lstm.hidden_size)
        h = torch.tanh(self.init_h(feature)).view(shape).transpose(0, 1).contiguous()
        c = self.init_c(feature).view(shape).transpose(0, 1).contiguous()
        return h, c

    def run(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Logits ``[B, L, V]`` of the next token after each of ``tokens [B, L]``, new state."""
        out, state = self.lstm(self.embed(tokens), state)
        return self.head(out), state

    def decode(self, memory: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.run(self.shift_right(labels), self.initial_state(memory))[0]

    def adapter(self) -> DecoderAdapter:
        return LSTMAdapter(self)


class LSTMAdapter(DecoderAdapter):
    """:class:`CNNLSTMCaptioner` in the decoding loop: the memory is the image feature ``[B, F]``,
    the cache the LSTM's ``(h, c)`` after the tokens fed so far."""

    def __init__(self, model: CNNLSTMCaptioner) -> None:
        self.model = model
        self.start_token_id = model.eos_id
        self.eos_token_id = model.eos_id
        self.pad_token_id = model.pad_id
        self.forced_first_token_id = model.lang_id
        self.tokenizer = model.tokenizer

    def prepare(self, inputs: torch.Tensor) -> dict:
        h, c = self.model.initial_state(inputs)
        return {"memory": inputs, "h": h, "c": c, "fed": 0}

    def reorder(self, state: dict, index: torch.Tensor) -> dict:
        return {
            "memory": state["memory"].index_select(0, index),
            "h": state["h"].index_select(1, index),
            "c": state["c"].index_select(1, index),
            "fed": state["fed"],
        }

    def logits(self, state: dict, prefix: torch.Tensor, use_cache: bool) -> torch.Tensor:
        if not use_cache:
            return self.sequence_logits(state["memory"], prefix)[:, -1]
        logits, (state["h"], state["c"]) = self.model.run(
            prefix[:, state["fed"] :], (state["h"], state["c"])
        )
        state["fed"] = prefix.shape[1]
        return logits[:, -1]

    def sequence_logits(self, memory: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return self.model.run(prefix, self.model.initial_state(memory))[0]


BASELINES: dict[str, type[BaselineCaptioner]] = {
    "vit_gpt2": ViTGPT2Captioner,
    "cnn_lstm": CNNLSTMCaptioner,
}


def pal_config(cfg: CaptionerConfig) -> PALModelConfig:
    """The PAL keys alone: a PAL export's ``config.yaml`` stays what ``PALCaptioner`` reads."""
    return PALModelConfig(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(PALModelConfig)}
    )


def build_captioner(cfg: CaptionerConfig, tokenizer: Any) -> nn.Module:
    """The captioner ``cfg.architecture`` names, with random (or ``*_pretrained``) weights."""
    if cfg.architecture == "pal":
        return PALCaptioner(pal_config(cfg), tokenizer=tokenizer)
    return BASELINES[cfg.architecture](cfg, tokenizer)


def load_captioner(directory: str | Path, map_location: str = "cpu") -> nn.Module:
    """Any ``finetune.caption_bn`` export (PAL or a baseline) with its weights."""
    import yaml
    from transformers import AutoTokenizer

    directory = Path(directory)
    data = yaml.safe_load((directory / export_folder.CONFIG_FILE).read_text())
    if data.get("architecture", "pal") == "pal":
        return PALCaptioner.from_pretrained(directory, map_location)
    cfg = from_dict(CaptionerConfig, data)
    # the export holds every weight: no timm download for an encoder it replaces anyway
    arch_cfg = getattr(cfg, cfg.architecture)
    cfg = dataclasses.replace(
        cfg, **{cfg.architecture: dataclasses.replace(arch_cfg, encoder_pretrained=False)}
    )
    tok = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    tok.tgt_lang = cfg.target_lang
    model = BASELINES[cfg.architecture](cfg, tok)
    state = export_folder.load_weights(directory, map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in model._tied_keys()]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
