"""English captioning fine-tuning: cross-entropy, then self-critical sequence training (SCST).

Phase ``xe``: teacher-forced token cross-entropy (BiMAC Eq. 6 without reward weights,
:func:`caption_loss`). Phase ``scst`` (Rennie et al. 2017): per image, ``samples`` captions are
drawn from the model (``strategy: sample``) or the top ``samples`` beams are kept
(``strategy: beam``); each is rewarded with CIDEr-D against the image's reference captions, with
document frequencies from the *training* references (:class:`bimac.metrics.cider.CiderD`), and
:func:`scst_loss` pushes up captions that beat the baseline: the greedy caption's reward
(``baseline: greedy``) or the mean of the image's other samples (``baseline: leave_one_out``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from bimac.data import DataConfig
from bimac.data.tokenizer import strip_special
from bimac.losses import caption_loss, scst_loss
from bimac.models.bimac import unwrap
from bimac.tasks.finetune import FinetuneBase, FinetuneConfig, freeze

logger = logging.getLogger(__name__)


@dataclass
class SCSTConfig:
    """The self-critical phase (``max_steps: 0`` skips it)."""

    max_steps: int = 0
    lr: float = 1e-5
    strategy: Literal["sample", "beam"] = "sample"
    samples: int = 5  # captions per image: samples, or kept beams
    baseline: Literal["greedy", "leave_one_out"] = "leave_one_out"
    max_new_tokens: int = 20
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.baseline == "leave_one_out" and self.samples < 2:
            raise ValueError("scst.baseline=leave_one_out needs scst.samples >= 2")
        if self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError("scst.samples and scst.max_new_tokens must be >= 1")


@dataclass
class CaptionEvalConfig:
    """Captioning metrics on the test annotations and, optionally, zero-shot NoCaps-format data."""

    annotations: str = "world:val:32"  # COCO-format JSON (Karpathy test) or world:SPLIT:N
    images: str = ""  # image folder of the annotation file names
    nocaps_annotations: str = ""  # NoCaps-format (COCO-style) JSON; "" = skip
    nocaps_images: str = ""
    metrics: list[str] = field(default_factory=lambda: ["bleu", "meteor", "cider", "spice"])
    strategy: Literal["greedy", "beam"] = "beam"
    num_beams: int = 3
    max_new_tokens: int = 20
    batch_size: int = 64
    enabled: bool = True


@dataclass
class CaptionConfig(FinetuneConfig):
    """``configs/finetune/caption/*.yaml`` (``train``: the cross-entropy phase)."""

    data: DataConfig = field(default_factory=DataConfig)
    scst: SCSTConfig = field(default_factory=SCSTConfig)
    eval: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)


def reference_index(shards: str, tokenizer: Any, lang: str = "en") -> dict[str, list[list[int]]]:
    """``{sample_id: [reference token ids]}`` of every training image (``url#key``, as the loader
    names samples): all ``captions_LANG`` of the JSON when present, else the ``txt`` caption."""
    from bimac.data.samples import iter_samples

    index: dict[str, list[list[int]]] = {}
    for s in iter_samples(shards):
        caps = (s.get("json") or {}).get(f"captions_{lang}") or [s.get("txt", "")]
        caps = [c for c in caps if c]
        if not caps:
            continue
        ids = strip_special(
            tokenizer.encode(caps), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        )
        index[f"{s['__url__']}#{s['__key__']}"] = ids
    if not index:
        raise ValueError(f"{shards}: no captions to use as SCST references")
    logger.info("SCST references: %d training images", len(index))
    return index


class CaptionTask(FinetuneBase):
    """Engine task for one phase (``phase``: ``xe`` or ``scst``) of English caption fine-tuning.

    ``references``: ``{sample_id: [token-id captions]}`` (SCST; read from the training shards
    when not given); CIDEr-D document frequencies come from all of them.
    """

    cfg: CaptionConfig

    def __init__(
        self,
        cfg: CaptionConfig,
        phase: Literal["xe", "scst"] = "xe",
        references: dict[str, list[list[int]]] | None = None,
    ) -> None:
        super().__init__(cfg)
        if phase not in ("xe", "scst"):
            raise ValueError(f"phase must be 'xe' or 'scst', got {phase!r}")
        self.phase = phase
        self.references = references
        self._scorer = None

    def build_model(self) -> nn.Module:
        model = self.load_model()
        # caption objectives touch the ViT trunk, the text tower's token outputs and the decoder
        freeze(
            [
                model.coca.logit_scale,
                model.coca.text.text_projection,
                model.patch_decoder,
                *model.grounding_parts(),
            ]
        )
        if model.coca.visual.proj is not None:
            freeze([model.coca.visual.proj])
        return model

    def losses(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        out = model(
            batch["image"], batch["text"], caption=True, grounding=False, reconstruction=False
        )
        if self.phase == "xe":
            loss = caption_loss(out["logits"], out["labels"], self.model_config.pad_id)
            return {"caption": loss}, {}
        return self._scst(model, out["decoder_memory"], batch)

    # -- SCST ------------------------------------------------------------------------------------

    def scorer(self) -> Any:
        """CIDEr-D with document frequencies from the training references (built once)."""
        from bimac.metrics.cider import CiderD

        if self._scorer is None:
            if self.references is None:
                self.references = reference_index(
                    self.cfg.data.train_shards, self.tokenizer, self.cfg.data.caption_lang
                )
            self._scorer = CiderD(list(self.references.values()))
        return self._scorer

    def batch_references(self, sample_ids: Sequence[str]) -> list[list[list[int]]]:
        self.scorer()
        missing = [s for s in sample_ids if s not in self.references]
        if missing:
            raise KeyError(f"{len(missing)} samples have no SCST references, e.g. {missing[0]!r}")
        return [self.references[s] for s in sample_ids]

    def rewards(self, ids: torch.Tensor, refs: list[list[list[int]]]) -> torch.Tensor:
        """CIDEr-D of generated rows ``ids [N, T]`` against their references."""
        tok = self.tokenizer
        cands = strip_special(ids, tok.bos_id, tok.eos_id, self.model_config.pad_id)
        return torch.as_tensor(self.scorer().score(cands, refs), dtype=torch.float32)

    def _scst(self, model: nn.Module, memory: torch.Tensor, batch: dict) -> tuple[dict, dict]:
        """Captions decoded without gradients (under ZeRO-3 with the model gathered once, see
        :func:`gathered_for_generation`), then their log-probabilities with gradients from one
        teacher-forced forward (:func:`sequence_logprobs`: the same module calls on every rank)."""
        from bimac.generation import (
            GenerationConfig,
            gathered_for_generation,
            generate,
            sequence_logprobs,
        )

        s = self.cfg.scst
        max_new = min(s.max_new_tokens, self.model_config.context_length - 1)
        k = s.samples
        with gathered_for_generation(model):
            # built inside: the adapter reads the decoder's context from a parameter's shape
            adapter = unwrap(model).caption_adapter(self.tokenizer)
            gen = generate(adapter, memory.detach(), GenerationConfig(
                strategy=s.strategy, max_new_tokens=max_new, num_return_sequences=k,
                num_beams=k if s.strategy == "beam" else 1, temperature=s.temperature,
            ))  # fmt: skip
            if s.baseline == "greedy":
                g = generate(
                    adapter,
                    memory.detach(),
                    GenerationConfig(strategy="greedy", max_new_tokens=max_new),
                )
        logprobs = sequence_logprobs(adapter, memory, gen.ids, gen.lengths)
        refs = self.batch_references(batch["sample_id"])
        rewards = self.rewards(gen.ids, [r for r in refs for _ in range(k)])
        steps = torch.arange(gen.ids.shape[1], device=gen.ids.device)
        mask = steps[None] < gen.lengths[:, None]
        metrics = {"scst_reward": float(rewards.mean())}
        greedy = None
        if s.baseline == "greedy":
            greedy = self.rewards(g.ids, refs)
            metrics["greedy_reward"] = float(greedy.mean())
            greedy = greedy.repeat_interleave(k)
        dev = logprobs.device
        loss = scst_loss(
            logprobs,
            mask,
            rewards.to(dev),
            s.baseline,
            None if greedy is None else greedy.to(dev),
            k,
        )
        return {"scst": loss}, metrics
