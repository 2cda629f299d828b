"""The BiMAC pretraining task: Eq. 8, ``L = L_MCL + λ_CG L_CG + λ_GIT L_GIT``.

Every objective switches on and off from :class:`ObjectiveConfig`, so the ablation rows of
Table 5 (``configs/pretrain/ablations/``) and the λ_GIT sweep of Table 6 are config changes.
L_GIT has two parts, both weighted by λ_GIT: the grounding term of Eq. 7 (``grounding``) and the
patch reconstruction L_rec by D_p (``git``). Without ``grounding`` (Table 5, row 4) D_p attends to
the plain noun embeddings; with it (rows 5-6) each noun carries the position of the patch that
Hungarian matching assigned to it (the "grounded text embeddings W_g").

The experiment config (:class:`PretrainConfig`) composes four sections plus the tokenizer:
``data`` (bimac.data.DataConfig), ``model`` (BiMACConfig), ``objectives`` (ObjectiveConfig),
``train`` (bimac.engine.TrainConfig), ``tokenizer`` (TokenizerConfig). A section may be a YAML path
(relative to the file naming it) to reuse ``configs/data/*.yaml`` / ``configs/model/*.yaml``, or a
mapping with ``_base_: path`` plus the keys it changes; file-level ``_base_`` chains work as
everywhere. :class:`BiMACPretrain` binds the task to the data pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bimac.config import ConfigError, load_config
from bimac.data import DataConfig, SkipCounter, TokenizerConfig, build_tokenizer, make_loader
from bimac.data.loader import check_spacy_pipeline, require_shards
from bimac.data.tokenizer import strip_special
from bimac.engine import TrainConfig
from bimac.engine.loop import StepContext
from bimac.losses import (
    caption_loss,
    contrastive_loss,
    grounding_loss,
    grounding_terms,
    matched_patches,
    pointing_game,
    reconstruction_loss,
    reward_weights,
)
from bimac.models.bimac import BiMAC, BiMACConfig, unwrap

logger = logging.getLogger(__name__)

# batches after which an objective that has had no signal yet (no noun, no reference) is reported
NO_SIGNAL_BATCHES = 10


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
    # recompute rewards every k-th CG call (in training: every k-th step); in between CG is unweighted
    rf_every: int = 1
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
    ``loader_factory(rank, world_size, epoch, cursor)``: builds the training loader (the entry
    point passes ``bimac.data``'s builder bound to the data config and the global batch).
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
        self._batches = 0
        self._nouns = 0  # nouns the grounding objective has matched to patches
        self._reference_count = 0  # reference captions the RF reward has scored against

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
        self, rank: int, world_size: int, epoch: int, cursor: dict[int, int] | None
    ) -> Iterable:
        if self.loader_factory is None:
            raise RuntimeError("PretrainTask needs loader_factory to build the training loader")
        return self.loader_factory(rank, world_size, epoch, cursor)

    def losses(
        self, model: nn.Module, batch: dict[str, Any], context: MicroBatchShare | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Weighted loss terms of Eq. 8 by name (``mcl``, ``cg``, ``grounding``, ``reconstruction``)
        and float metrics (unweighted losses, pointing-game score, mean CIDEr-D reward).

        Without ``context``: the losses of ``batch`` as one piece. With it (the engine, after
        :meth:`step_context`): this micro-batch's contributions to the step's global terms, whose
        sums over micro-batches and ranks are the global losses and whose gradients sum to the
        global gradient; metrics are contributions too (``loss_cg``, ``loss_reconstruction``).
        """
        if context is not None:
            return self._contributions(model, batch, context)
        o = self.objectives
        self._count_signal(batch)
        out = self._forward(model, batch)
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if o.mcl:
            raw = contrastive_loss(out["image_features"], out["text_features"], self._scale(out))
            terms["mcl"] = raw
        if o.cg:
            weights = None
            if o.rf and self._refresh_rewards():
                rewards = self._rewards(model, out, batch)
                metrics["rf_cider"] = float(rewards.mean())
                weights = reward_weights(rewards).to(out["logits"].device)
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
        hits_count = self._pointing_game(out, batch)
        if hits_count[1]:
            metrics["pointing_game"] = hits_count[0] / hits_count[1]
        return terms, metrics

    def _forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """One forward of every active objective, its floating outputs in float32."""
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
        return {
            k: v.float()
            if torch.is_tensor(v) and v.is_floating_point() and k != "decoder_memory"
            else v
            for k, v in out.items()
        }

    def _scale(self, out: dict[str, Any]) -> torch.Tensor | float:
        """1/τ of Eqs. 3-4: fixed, or CoCa's learnable ``exp(s)`` clamped at 100 as open_clip does."""
        t = self.objectives.temperature
        return out["logit_scale"].clamp(max=100) if t is None else 1.0 / t

    def _pointing_game(self, out: dict[str, Any], batch: dict[str, Any]) -> tuple[int, int]:
        """(hits, nouns with a box) of the pointing game, or (0, 0) without boxes."""
        if "noun_emb" not in out or "noun_boxes" not in batch:
            return 0, 0
        score, count = pointing_game(
            out["noun_emb"],
            out["patch_emb"],
            batch["noun_boxes"],
            batch["noun_has_box"],
            out["noun_mask"],
            self.model_config.grid,
        )
        return (round(score * count) if count else 0), count

    # -- global-batch losses under accumulation and data parallelism (GradCache) ---------------

    def _cross_sample(self, out: dict[str, Any]) -> dict[str, _CrossInputs]:
        """The inputs of the objectives that compare samples (contrastive, grounding's in-batch
        negatives): per-row features, scalars (the same for every row) and fixed per-row inputs."""
        o, inputs = self.objectives, {}
        if o.mcl:
            scalars = {"logit_scale": self._scale(out)} if o.temperature is None else {}
            inputs["mcl"] = _CrossInputs(
                {"image": out["image_features"], "text": out["text_features"]}, scalars, {}
            )
        if o.grounding:
            inputs["grounding"] = _CrossInputs(
                {
                    "noun": out["noun_emb"],
                    "matched": matched_patches(out["patch_emb"], out["matches"]),
                },
                {"scale": out["grounding_logit_scale"], "bias": out["grounding_logit_bias"]},
                {
                    "noun_mask": out["noun_mask"],
                    "positive": out["noun_mask"] & (out["matches"] >= 0),
                },
            )
        return inputs

    def _global_cross_loss(
        self, name: str, f: dict[str, torch.Tensor], s: dict[str, torch.Tensor], fixed: dict
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-row weighted contributions ``[B_global]`` of a cross-sample term over the whole
        global batch (their sum is the term), and its global metrics."""
        o = self.objectives
        if name == "mcl":
            scale = s["logit_scale"] if "logit_scale" in s else 1.0 / o.temperature
            per_row = contrastive_loss(
                f["image"], f["text"], scale, across_ranks=False, reduction="none"
            )
            per_row = per_row / per_row.shape[0]
            return per_row, {"loss_mcl": per_row.detach().sum().item()}
        per_noun, s_pos = grounding_terms(
            f["noun"], fixed["noun_mask"], f["matched"], fixed["positive"], s["scale"], s["bias"]
        )
        count = fixed["positive"].sum().clamp(min=1)
        per_row = o.lambda_git * per_noun.sum(1) / count
        with torch.no_grad():
            pos = (torch.sigmoid(s_pos) * fixed["positive"]).sum() / count
        return per_row, {
            "loss_grounding": (per_noun.detach().sum() / count).item(),
            "grounding_pos": float(pos),
            "grounding_nouns": float(fixed["positive"].sum()),
        }

    def step_context(
        self, model: nn.Module, micro: list[dict[str, Any]], seed_micro_batch: Any
    ) -> StepContext:
        """The first pass over a step's micro-batches (the engine's hook for global-batch losses).

        Each micro-batch is forwarded once, seeded as its re-forward will be, without gradient
        (with accumulation 1 the forward keeps its graph and is the only one). The cross-sample
        features of every micro-batch and rank are gathered in rank order (the global batch:
        rank-major, then micro-batch, then row), the contrastive and grounding losses of the
        whole global batch and their gradients with respect to the features and scalars are
        computed once, and every micro-batch gets its rows' gradients (the scalars' on one
        micro-batch of rank 0 only). Caption tokens, reconstruction elements and RF's rewards are
        counted over the global batch here too, so each micro-batch's terms are its share of the
        global means.
        """
        o = self.objectives
        keep_graph = len(micro) == 1
        refresh_rewards = o.cg and o.rf and self._refresh_rewards()
        # only what the global terms need is kept of each first-pass forward (not its logits)
        cross: list[dict[str, _CrossInputs]] = []
        rewards: list[torch.Tensor] = []
        counts: list[torch.Tensor] = []  # caption tokens, rec. elements, pointing-game hits/nouns
        kept = None
        for i, batch in enumerate(micro):
            self._count_signal(batch)
            seed_micro_batch(i)
            with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
                out = self._forward(model, batch)
            cross.append({k: v.detached() for k, v in self._cross_sample(out).items()})
            tokens = int((out["labels"] != self.model_config.pad_id).sum()) if o.cg else 0
            elements = out["target_pixels"].numel() if o.git else 0
            counts.append(torch.tensor([tokens, elements, *self._pointing_game(out, batch)]))
            if refresh_rewards:
                rewards.append(self._rewards(model, out, batch).to(out["logits"].device))
            kept = out if keep_graph else None
        device = out["image_features"].device
        rank, world = _rank_world()
        sizes = [batch_rows(b) for b in micro]
        first = rank * sum(sizes)  # this rank's first row of the global batch
        shares = [
            MicroBatchShare(out=kept, first_of_step=rank == 0 and i == 0) for i in range(len(micro))
        ]
        metrics: dict[str, float] = {}
        for name in cross[0]:
            parts = [c[name] for c in cross]
            f = {
                k: _all_rows(torch.cat([p.features[k] for p in parts])).requires_grad_()
                for k in parts[0].features
            }
            s = {k: v.clone().requires_grad_() for k, v in parts[0].scalars.items()}
            fixed = {k: _all_rows(torch.cat([p.fixed[k] for p in parts])) for k in parts[0].fixed}
            with torch.enable_grad():
                per_row, term_metrics = self._global_cross_loss(name, f, s, fixed)
                grads = torch.autograd.grad(per_row.sum(), [*f.values(), *s.values()])
            per_row = per_row.detach()
            metrics.update(term_metrics)
            feature_grads = dict(zip(f, grads[: len(f)]))
            scalar_grads = dict(zip(s, grads[len(f) :]))
            row = first
            for share, n in zip(shares, sizes):
                share.cross[name] = _CrossShare(
                    float(per_row[row : row + n].sum()),
                    {k: g[row : row + n] for k, g in feature_grads.items()},
                    {
                        k: g if share.first_of_step else torch.zeros_like(g)
                        for k, g in scalar_grads.items()
                    },
                )
                row += n
        total = torch.stack(counts).sum(0).to(device, torch.float64)
        if world > 1:
            dist.all_reduce(total)
        for share in shares:
            share.caption_tokens, share.reconstruction_elements = float(total[0]), float(total[1])
        if total[3]:
            metrics["pointing_game"] = float(total[2] / total[3])
        if refresh_rewards:
            everyone = _all_rows(torch.cat(rewards))
            metrics["rf_cider"] = float(everyone.mean())
            mean = everyone.clamp(min=0).mean()
            for share, r in zip(shares, rewards):
                share.reward_weights = reward_weights(r, mean=mean)
        return StepContext(shares, metrics)

    def _contributions(
        self, model: nn.Module, batch: dict[str, Any], share: MicroBatchShare
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One micro-batch's terms: each cross-sample term is the surrogate
        ``Σ features · cached gradient`` (valued at this micro-batch's share of the global term),
        the others their sums over this micro-batch divided by the global batch's counts."""
        o = self.objectives
        out = share.out if share.out is not None else self._forward(model, batch)
        cross = self._cross_sample(out)
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if o.mcl:
            terms["mcl"] = share.cross["mcl"].surrogate(cross["mcl"])
        if o.cg:
            nll = caption_loss(
                out["logits"],
                out["labels"],
                self.model_config.pad_id,
                share.reward_weights,
                reduction="sum",
            )
            raw = nll / max(share.caption_tokens, 1.0)
            terms["cg"] = o.lambda_cg * raw
            metrics["loss_cg"] = raw.item()
        if o.grounding:
            terms["grounding"] = share.cross["grounding"].surrogate(cross["grounding"])
        if o.git:
            error = reconstruction_loss(
                out["reconstruction"], out["target_pixels"], o.rec_norm_pix, reduction="sum"
            )
            raw = error / share.reconstruction_elements
            terms["reconstruction"] = o.lambda_git * raw
            metrics["loss_reconstruction"] = raw.item()
        return terms, metrics

    # -- objectives without signal -------------------------------------------------------------

    def _count_signal(self, batch: dict[str, Any]) -> None:
        """Count the nouns grounding learns from; after :data:`NO_SIGNAL_BATCHES` batches, warn
        once about each objective that had none (it would otherwise train silently at 0)."""
        self._batches += 1
        if "noun_mask" in batch:
            self._nouns += int(batch["noun_mask"].sum())
        if self._batches == NO_SIGNAL_BATCHES:
            for name, cause in self.inactive_objectives().items():
                logger.warning("objectives.%s is inactive: %s", name, cause)

    def inactive_objectives(self) -> dict[str, str]:
        """Objective -> why it has had no signal so far, with the fix."""
        o, out = self.objectives, {}
        if o.grounding and self._batches and not self._nouns:
            out["grounding"] = (
                f"no noun in the captions of {self._batches} batches, so its loss is 0; set "
                "data.noun_source: json for world shards, or spacy with an English pipeline "
                "(data.spacy_pipeline: en_core_web_sm) for real captions, or objectives.grounding: "
                "false"
            )
        if o.rf and self._cg_calls and not self._reference_count:
            out["rf"] = (
                f"no reference caption in {self._cg_calls} steps, so every reward weight is "
                "1; give captions in the shards (data.references: true) or objectives.rf: false"
            )
        return out

    def summary(self) -> dict[str, Any]:
        """What the engine adds to summary.json: the objectives that never had a signal."""
        return {"inactive_objectives": self.inactive_objectives()}

    # -- RF: CIDEr-D reward of the model's own greedy caption ----------------------------------

    def _refresh_rewards(self) -> bool:
        """Count a CG call (a step in training); True on the calls that recompute the rewards."""
        self._cg_calls += 1
        return (self._cg_calls - 1) % self.objectives.rf_every == 0

    def _rewards(self, model: nn.Module, out: dict, batch: dict) -> torch.Tensor:
        """R(T_i, I_i): the CIDEr-D of each image's greedy caption against its references."""
        from bimac.generation import GenerationConfig, gathered_for_generation, generate

        tok = self._require_tokenizer()
        # the start token takes one of the decoder's context_length positions
        max_new = min(self.objectives.rf_max_new_tokens, self.model_config.context_length - 1)
        cfg = GenerationConfig(strategy="greedy", max_new_tokens=max_new)
        with gathered_for_generation(model):
            gen = generate(unwrap(model).caption_adapter(tok), out["decoder_memory"].detach(), cfg)
        candidates = strip_special(gen.ids, tok.bos_id, tok.eos_id, self.model_config.pad_id)
        references = self._references(batch)
        self._reference_count += sum(1 for refs in references for ref in refs if ref)
        return torch.as_tensor(self._reward_scorer().score(candidates, references))

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
        for i, batch in enumerate(self.build_train_loader(0, 1, 0, None)):
            if i >= self.objectives.rf_corpus_batches:
                break
            corpus += self._references(batch)
        logger.info(
            "CIDEr-D document frequencies from %d training images (%d captions)",
            len(corpus),
            sum(map(len, corpus)),
        )
        return corpus


@dataclass
class _CrossInputs:
    """A cross-sample objective's inputs from one forward (see ``PretrainTask._cross_sample``)."""

    features: dict[str, torch.Tensor]  # per row, differentiable
    scalars: dict[str, torch.Tensor]  # shared by every row, differentiable
    fixed: dict[str, torch.Tensor]  # per row, not differentiated (masks)

    def detached(self) -> _CrossInputs:
        return _CrossInputs(
            {k: v.detach() for k, v in self.features.items()},
            {k: v.detach() for k, v in self.scalars.items()},
            self.fixed,
        )


@dataclass
class _CrossShare:
    """One micro-batch's share of a cross-sample term computed over the global batch."""

    value: float  # the term's sum over this micro-batch's rows
    feature_grads: dict[str, torch.Tensor]  # d(global term)/d(features) of these rows
    scalar_grads: dict[str, torch.Tensor]  # d(global term)/d(scalars): on one micro-batch only

    def surrogate(self, inputs: _CrossInputs) -> torch.Tensor:
        """``Σ features · cached gradient`` (its gradient is this share of the global one), shifted
        so that its value is :attr:`value`."""
        parts = [(inputs.features[k] * g).sum() for k, g in self.feature_grads.items()]
        parts += [(inputs.scalars[k] * g).sum() for k, g in self.scalar_grads.items()]
        surrogate = torch.stack(parts).sum()
        return surrogate - surrogate.detach() + self.value


@dataclass
class MicroBatchShare:
    """What :meth:`PretrainTask.step_context` leaves for one micro-batch's ``losses`` call."""

    out: dict[str, Any] | None  # the forward kept with its graph (accumulation 1), else None
    first_of_step: bool  # rank 0's first micro-batch: it carries the scalars' gradients
    cross: dict[str, _CrossShare] = field(default_factory=dict)
    caption_tokens: float = 0.0  # non-pad caption tokens of the global batch
    reconstruction_elements: float = 0.0  # reconstructed pixel values of the global batch
    reward_weights: torch.Tensor | None = None  # R_i / global mean R for these rows (RF)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (the same shape on every rank), concatenated in rank order;
    no gradient (the feature cache differentiates the gathered copy itself)."""
    _, world = _rank_world()
    if world == 1:
        return x
    sendable = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo has no bool all_gather
    parts = [torch.empty_like(sendable) for _ in range(world)]
    dist.all_gather(parts, sendable.contiguous())
    return torch.cat(parts).to(x.dtype)


def batch_rows(batch: dict[str, Any]) -> int:
    return int(batch["text"].shape[0])


@dataclass
class PretrainConfig:
    """One pretraining experiment (``configs/pretrain/*.yaml``)."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: BiMACConfig = field(default_factory=BiMACConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """Experiment YAML + ``section.key=value`` overrides -> a checked :class:`PretrainConfig`."""
    return check_consistency(load_config(PretrainConfig, path, overrides))


def check_consistency(cfg: PretrainConfig) -> PretrainConfig:
    """Cross-section rules; the loader's batch is the engine's micro-batch, and RF makes the loader
    add every caption of an image as its reward references."""
    m, d, t = cfg.model, cfg.data, cfg.tokenizer
    if m.image_size != d.image_size:
        raise ConfigError(f"model.image_size={m.image_size} != data.image_size={d.image_size}")
    if m.context_length != t.context_length:
        raise ConfigError(
            f"model.context_length={m.context_length} != tokenizer.context_length={t.context_length}"
        )
    if cfg.objectives.rf and not d.references:
        logger.info(
            "data.references := true (objectives.rf scores against all of an image's captions)"
        )
        d = dataclasses.replace(d, references=True)
        cfg = dataclasses.replace(cfg, data=d)
    if d.batch_size != cfg.train.micro_batch_size:
        logger.info("data.batch_size := train.micro_batch_size = %d", cfg.train.micro_batch_size)
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(d, batch_size=cfg.train.micro_batch_size)
        )
    return cfg


class BiMACPretrain(PretrainTask):
    """The pretraining task bound to the data pipeline: loader, skip counts and export."""

    def __init__(self, cfg: PretrainConfig) -> None:
        # at start-up, before DeepSpeed, wandb or a worker starts and leaves run files behind
        check_spacy_pipeline(cfg.data)
        require_shards(cfg.data.train_shards, "data.train_shards")
        tokenizer = build_tokenizer(cfg.tokenizer)
        if tokenizer.vocab_size > cfg.model.vocab_size or tokenizer.pad_id != cfg.model.pad_id:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} / model.pad_id={cfg.model.pad_id} do not "
                f"cover the tokenizer (vocab {tokenizer.vocab_size}, pad {tokenizer.pad_id})"
            )
        self.cfg = cfg
        self.counter = SkipCounter()
        super().__init__(
            cfg.model, cfg.objectives, loader_factory=self._loader, tokenizer=tokenizer
        )

    def _loader(self, rank: int, world_size: int, epoch: int, cursor: dict[int, int] | None):
        return make_loader(
            self.cfg.data, self.tokenizer, rank=rank, world_size=world_size, epoch=epoch,
            global_batch_size=self.cfg.train.global_batch_size, cursor=cursor,
            counter=self.counter,
        )  # fmt: skip

    def skipped_counts(self) -> dict[str, int]:
        return self.counter.as_dict()

    def export(self, model: Any, out_dir: Path) -> None:
        tok = self.cfg.tokenizer
        source = Path(tok.path) if tok.kind == "world" else tok.name
        model.save_pretrained(out_dir, tokenizer=source, experiment_config=self.cfg)
