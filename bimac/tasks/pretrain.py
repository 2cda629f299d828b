"""The BiMAC pretraining task: Eq. 8, ``L = L_MCL + λ_CG L_CG + λ_GIT L_GIT``.

Every objective switches on and off from :class:`ObjectiveConfig`, so the ablation rows of
Table 5 (``configs/pretrain/ablations/``) and the λ_GIT sweep of Table 6 are config changes.
L_GIT has two parts, both weighted by λ_GIT: the grounding term of Eq. 7 (``grounding``) and the
patch reconstruction L_rec by D_p (``git``). Without ``grounding`` (Table 5, row 4) D_p attends to
the plain noun embeddings; with it (rows 5-6) each noun carries the position of the patch that
Hungarian matching assigned to it (the "grounded text embeddings W_g").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bimac.data.tokenizer import strip_special
from bimac.losses import (
    caption_loss,
    contrastive_loss,
    grounding_loss,
    pointing_game,
    reconstruction_loss,
    reward_weights,
)
from bimac.models.bimac import BiMAC, BiMACConfig

logger = logging.getLogger(__name__)


@dataclass
class ObjectiveConfig:
    """Which BiMAC objectives run, and their weights (paper defaults: λ_CG = 1, λ_GIT = 0.7, τ = 0.5)."""

    mcl: bool = True  # multi-pair contrastive learning, Eqs. 3-5
    cg: bool = True  # caption generation, Eq. 6
    rf: bool = True  # CIDEr-D reward weighting of CG (Table 5 "RF"); needs cg
    git: bool = True  # patch reconstruction L_rec by D_p
    grounding: bool = True  # Eq. 7 + grounded noun embeddings for D_p
    lambda_cg: float = 1.0
    lambda_git: float = 0.7
    temperature: float | None = 0.5  # fixed τ of Eqs. 3-4; null = learnable logit scale (CoCa)
    rf_every: int = 1  # recompute rewards every k-th CG call; in between CG is unweighted
    rf_max_new_tokens: int = 32  # greedy caption length for the reward
    # without a reward corpus: training batches read for CIDEr-D's document frequencies
    rf_corpus_batches: int = 64
    rec_norm_pix: bool = False  # L_rec against per-patch normalised pixels

    def __post_init__(self) -> None:
        if self.rf and not self.cg:
            raise ValueError("objectives.rf weights the caption loss: it needs objectives.cg: true")
        if not (self.mcl or self.cg or self.git or self.grounding):
            raise ValueError("objectives: at least one of mcl, cg, git, grounding must be on")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"objectives.temperature must be > 0 or null, got {self.temperature}")
        if self.rf_every < 1:
            raise ValueError("objectives.rf_every must be >= 1")


class PretrainTask:
    """Engine-facing task (docs/contracts.md "Task") for BiMAC pretraining.

    ``tokenizer``: provides ``bos_id``/``eos_id``/``pad_id`` (needed by RF). ``reward_corpus``: the
    training corpus as one list of reference-caption token-id lists per image, for CIDEr-D's
    document frequencies; when absent and RF is on it is read from the first
    ``rf_corpus_batches`` batches of the training loader (never from the current minibatch).
    ``loader_factory(rank, world_size, epoch, samples_seen)``: builds the training loader (the
    entry point passes ``bimac.data``'s builder bound to the data config).
    """

    def __init__(
        self,
        model: BiMACConfig,
        objectives: ObjectiveConfig,
        *,
        loader_factory: Any = None,
        tokenizer: Any = None,
        reward_corpus: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> None:
        self.model_config = model
        self.objectives = objectives
        self.loader_factory = loader_factory
        self.tokenizer = tokenizer
        self.reward_corpus = reward_corpus
        self._scorer = None
        self._cg_calls = 0

    # -- engine surface ----------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """BiMAC with the parts no active objective trains frozen (no unused-parameter errors)."""
        o = self.objectives
        model = BiMAC(self.model_config)
        unused: list[nn.Module] = []
        if o.temperature is not None or not o.mcl:
            unused.append(model.coca.logit_scale)
        if not o.cg:
            unused.append(model.coca.text_decoder)
        if not o.git:
            unused.append(model.patch_decoder)
        if not o.grounding:
            unused += model.grounding_parts()
        for part in unused:
            for p in part.parameters() if isinstance(part, nn.Module) else [part]:
                p.requires_grad_(False)
        return model

    def build_train_loader(
        self, rank: int, world_size: int, epoch: int, samples_seen: int
    ) -> Iterable:
        if self.loader_factory is None:
            raise RuntimeError("PretrainTask needs loader_factory to build the training loader")
        return self.loader_factory(rank, world_size, epoch, samples_seen)

    def losses(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Weighted loss terms of Eq. 8 by name (``mcl``, ``cg``, ``grounding``, ``reconstruction``)
        and float metrics (unweighted losses, pointing-game score, mean CIDEr-D reward)."""
        o = self.objectives
        out = model(
            batch["image"],
            batch["text"],
            batch.get("noun_spans"),
            batch.get("noun_mask"),
            caption=o.cg,
            grounding=o.grounding,
            reconstruction=o.git,
            grounded_reconstruction=o.grounding,
        )
        # bf16 / fp16 weights: the losses (softmaxes, sigmoids, sums over the batch) run in float32
        out = {
            k: v.float()
            if torch.is_tensor(v) and v.is_floating_point() and k != "decoder_memory"
            else v
            for k, v in out.items()
        }
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if o.mcl:
            scale = (
                out["logit_scale"].clamp(max=100) if o.temperature is None else 1.0 / o.temperature
            )
            raw = contrastive_loss(out["image_features"], out["text_features"], scale)
            terms["mcl"] = raw
        if o.cg:
            weights = self._reward_weights(model, out, batch, metrics) if o.rf else None
            raw = caption_loss(out["logits"], out["labels"], self.model_config.pad_id, weights)
            terms["cg"] = o.lambda_cg * raw
            metrics["loss_cg"] = raw.item()
        if o.grounding:
            raw, stats = grounding_loss(
                out["noun_emb"],
                out["noun_mask"],
                out["patch_emb"],
                out["grounding_logit_scale"],
                out["grounding_logit_bias"],
                out["matches"],
            )
            terms["grounding"] = o.lambda_git * raw
            metrics.update(stats, loss_grounding=raw.item())
        if o.git:
            raw = reconstruction_loss(out["reconstruction"], out["target_pixels"], o.rec_norm_pix)
            terms["reconstruction"] = o.lambda_git * raw
            metrics["loss_reconstruction"] = raw.item()
        if "mcl" in terms:
            metrics["loss_mcl"] = terms["mcl"].item()
        if "noun_emb" in out and "noun_boxes" in batch:
            score, count = pointing_game(
                out["noun_emb"],
                out["patch_emb"],
                batch["noun_boxes"],
                batch["noun_has_box"],
                out["noun_mask"],
                self.model_config.grid,
            )
            if count:
                metrics["pointing_game"] = score
        return terms, metrics

    # -- RF: CIDEr-D reward of the model's own greedy caption ----------------------------------

    def _reward_weights(
        self, model: nn.Module, out: dict, batch: dict, metrics: dict
    ) -> torch.Tensor | None:
        """R(T_i, I_i) / mean_batch(R) (see :func:`reward_weights`), or None on non-refresh steps."""
        self._cg_calls += 1
        if (self._cg_calls - 1) % self.objectives.rf_every:
            return None
        from bimac.generation import (
            CocaAdapter,
            GenerationConfig,
            gathered_for_generation,
            generate,
        )

        tok = self._require_tokenizer()
        net = getattr(model, "module", model)  # DeepSpeed / DDP wrappers
        # the start token takes one of the decoder's context_length positions
        max_new = min(self.objectives.rf_max_new_tokens, self.model_config.context_length - 1)
        cfg = GenerationConfig(strategy="greedy", max_new_tokens=max_new)
        with gathered_for_generation(model):
            adapter = CocaAdapter(
                net.coca,
                bos_token_id=tok.bos_id,
                eos_token_id=tok.eos_id,
                pad_token_id=self.model_config.pad_id,
            )
            gen = generate(adapter, out["decoder_memory"].detach(), cfg)
        candidates = strip_special(gen.ids, tok.bos_id, tok.eos_id, self.model_config.pad_id)
        references = self._references(batch)
        rewards = torch.as_tensor(self._reward_scorer().score(candidates, references))
        metrics["rf_cider"] = float(rewards.mean())
        return reward_weights(rewards).to(out["logits"].device)

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to refresh RF's rewards on the same calls (every ``rf_every``)."""
        return {"cg_calls": self._cg_calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._cg_calls = state.get("cg_calls", 0)

    def _references(self, batch: dict) -> list[list[list[int]]]:
        """Each image's reference captions: the loader's ``references`` (all captions of the
        image, ``data.references``), else the batch's own caption as the one reference."""
        if "references" in batch:
            return batch["references"]
        tok = self._require_tokenizer()
        return [
            [r]
            for r in strip_special(batch["text"], tok.bos_id, tok.eos_id, self.model_config.pad_id)
        ]

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError(
                "objectives.rf needs the tokenizer (bos_id / eos_id) in PretrainTask"
            )
        return self.tokenizer

    def _reward_scorer(self) -> Any:
        from bimac.metrics.cider import CiderD

        if self._scorer is None:
            corpus = self.reward_corpus
            if corpus is None:
                corpus = self._corpus_from_loader()
            self._scorer = CiderD(corpus)
        return self._scorer

    def _corpus_from_loader(self) -> list[list[list[int]]]:
        corpus: list[list[list[int]]] = []
        for i, batch in enumerate(self.build_train_loader(0, 1, 0, 0)):
            if i >= self.objectives.rf_corpus_batches:
                break
            corpus += self._references(batch)
        logger.info(
            "CIDEr-D document frequencies from %d training images (%d captions)",
            len(corpus),
            sum(map(len, corpus)),
        )
        return corpus
