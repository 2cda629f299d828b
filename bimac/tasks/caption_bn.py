"""The PAL Bengali captioning task (PAL paper Eq. 6): ``CE + λ PAL + α InfoNCE + β OT``.

Per triplet batch (``image``, ``image_syn``, ``text_bn``; docs/contracts.md): CE on the real
images (teacher forcing, PAD masked); the last-K decoder cross-attention of that same pass gives
the patch weights ``w`` (Eq. 8), which pool the bridge tokens of the real and the synthetic image
(Eq. 9) for PAL (Eq. 10) and InfoNCE (Eq. 11), and serve as both masses of the OT term (Eqs.
12-13: ``a = b = w``, "the same attention weights as masses"). A batch without ``image_syn`` gets
CE only. The seven rows of Table 3 are presets of :class:`PALLossConfig`
(``configs/finetune/caption_bn/ablation_*.yaml``); ``ce_syn`` adds CE on the synthetic images
(averaged with the real CE, so the loss keeps its scale). The Table 1 baselines
(``model.architecture: vit_gpt2 | cnn_lstm``, :mod:`bimac.models.baseline_captioners`) train
with CE on the real images only; ``losses`` other than CE do not apply to them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bimac.data import DataConfig, SkipCounter, make_loader
from bimac.data.tokenizer import TransformersTokenizer
from bimac.engine import TrainConfig, derive_accumulation
from bimac.losses import (
    caption_loss,
    cosine_cost,
    info_nce,
    pal_loss,
    pal_pool,
    pal_weights,
    sinkhorn_ot,
)
from bimac.models.baseline_captioners import CaptionerConfig, build_captioner
from bimac.models.pal_captioner import PALCaptioner, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class PALLossConfig:
    """Weights and settings of Eq. 6 (paper defaults, §5.1)."""

    ce_syn: bool = False  # Table 3 "CE (Real+Syn)": CE on the synthetic images too
    lambda_pal: float = 0.5
    tau: float = 1.0  # attention temperature of Eq. 8
    rho: float = 0.5  # top-rho attention mass kept
    k: int = 2  # last-K decoder layers
    detach_weights: bool = False  # True: no gradient from PAL/InfoNCE/OT into the attention
    alpha: float = 0.3  # InfoNCE weight
    temperature: float = 0.07  # InfoNCE temperature t
    beta: float = 0.5  # OT weight
    ot_eps: float = 0.05
    ot_iters: int = 30
    ot_grad: Literal["unrolled", "envelope"] = "envelope"

    @property
    def needs_attention(self) -> bool:
        return self.lambda_pal > 0 or self.alpha > 0 or self.beta > 0


@dataclass
class CaptionEvalConfig:
    """Held-out evaluation after training (BLEU-1..4, METEOR in Bengali mode, BERTScore)."""

    enabled: bool = True
    shards: str = ""  # default: data.val_shards
    max_samples: int = 1000
    batch_size: int = 16
    num_beams: int = 4
    max_new_tokens: int = 40
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    meteor: bool = True  # needs Java
    bertscore_model: str = ""  # "" = skip; hub name or local dir (bn default: mBERT, layer 9)
    bertscore_layer: int | None = None
    show: int = 4  # captions printed with their references


@dataclass
class CaptionBnConfig:
    """The experiment config of ``python -m finetune.caption_bn``."""

    model: CaptionerConfig = field(default_factory=CaptionerConfig)
    losses: PALLossConfig = field(default_factory=PALLossConfig)
    data: DataConfig = field(
        default_factory=lambda: DataConfig(kind="triplets", noun_source="none")
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)


def as_loader_tokenizer(tokenizer: Any, max_length: int, lang: str) -> TransformersTokenizer:
    """The captioner's mBART-50 tokenizer in the loader's interface (``text_bn`` = labels)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return TransformersTokenizer(tmp, max_length, lang)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class CaptionBnTask:
    """Engine-facing task (docs/contracts.md "Task") for the PAL captioner."""

    def __init__(self, cfg: CaptionBnConfig, world_size: int = 1) -> None:
        if cfg.data.kind != "triplets":
            raise ValueError("data.kind must be 'triplets' for the PAL captioner")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.target_lang)
        self.accumulation = derive_accumulation(
            cfg.train.global_batch_size, cfg.train.micro_batch_size, world_size
        )
        self._loader_tokenizer: TransformersTokenizer | None = None
        self.counter = SkipCounter()  # one for the whole run: skip totals span epochs

    # -- engine interface -------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        return build_captioner(self.cfg.model, self.tokenizer)

    def loader_tokenizer(self) -> TransformersTokenizer:
        if self._loader_tokenizer is None:
            m = self.cfg.model
            self._loader_tokenizer = as_loader_tokenizer(
                self.tokenizer, m.max_length, m.target_lang
            )
        return self._loader_tokenizer

    def build_train_loader(
        self, rank: int, world_size: int, epoch: int, cursor: dict[int, int] | None
    ) -> Iterable[dict]:
        data = self.cfg.data
        if data.batch_size != self.cfg.train.micro_batch_size:
            data = DataConfig(**{**data.__dict__, "batch_size": self.cfg.train.micro_batch_size})
        tok = self.loader_tokenizer()
        return make_loader(
            data, tok, rank=rank, world_size=world_size, epoch=epoch,
            global_batch_size=self.cfg.train.global_batch_size, cursor=cursor, tokenizer_bn=tok,
            counter=self.counter,
        )  # fmt: skip

    def skipped_counts(self) -> dict[str, int]:
        return self.counter.as_dict()

    def export(self, model: nn.Module, out_dir: Path) -> None:
        _unwrap(model).save_pretrained(out_dir)

    def losses(
        self, model: nn.Module, batch: dict
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        lc = self.cfg.losses
        m = _unwrap(model)
        metrics: dict[str, float] = {}
        labels = batch["text_bn"]
        if not isinstance(m, PALCaptioner):  # a Table 1 baseline: CE on the real images
            ce = caption_loss(model(batch["image"], labels)["logits"], labels, m.pad_id)
            return {"ce": ce}, metrics
        if m.training:
            step = int(m.num_updates) // self.accumulation
            metrics["decoder_layers_trained"] = float(m.apply_unfreeze(step))
            m.num_updates += 1  # counts micro-batches; // accumulation = optimizer steps
        syn = batch.get("image_syn")
        use_syn = syn is not None
        out = model(
            batch["image"],
            labels,
            images_syn=syn if use_syn and (lc.needs_attention or lc.ce_syn) else None,
            caption_syn=use_syn and lc.ce_syn,
            output_attentions=use_syn and lc.needs_attention,
        )
        ce = caption_loss(out["logits"], labels, m.pad_id)
        metrics["ce_real"] = float(ce.detach())
        terms: dict[str, torch.Tensor] = {}
        if "logits_syn" in out:
            ce_syn = caption_loss(out["logits_syn"], labels, m.pad_id)
            metrics["ce_syn"] = float(ce_syn.detach())
            ce = 0.5 * (ce + ce_syn)
        terms["ce"] = ce
        if not (use_syn and lc.needs_attention):
            return terms, metrics

        w = pal_weights(out["cross_attentions"], labels != m.pad_id, lc.k, lc.tau, lc.rho)
        if lc.detach_weights:
            w = w.detach()
        memory, memory_syn = out["memory"], out["memory_syn"]
        valid = w.sum(-1) > 0
        pooled, pooled_syn = pal_pool(memory, w), pal_pool(memory_syn, w)
        if lc.lambda_pal > 0:
            loss, stats = pal_loss(pooled, pooled_syn, valid)
            terms["pal"] = lc.lambda_pal * loss
            metrics["pal_cos"] = float(stats["pal_cos"])
        if lc.alpha > 0:
            loss, stats = info_nce(pooled, pooled_syn, lc.temperature)
            terms["info_nce"] = lc.alpha * loss
            metrics["info_nce_acc"] = float(stats["info_nce_acc"])
        if lc.beta > 0:
            ot = sinkhorn_ot(
                cosine_cost(memory, memory_syn), w, w, lc.ot_eps, lc.ot_iters, lc.ot_grad
            )
            terms["ot"] = lc.beta * ot.mean()
        return terms, metrics


@torch.no_grad()
def evaluate_captions(
    model: nn.Module, cfg: CaptionBnConfig, shards: str | None = None
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Beam-search captions for the held-out triplets, scored against their Bengali references by
    :func:`bimac.eval.captioning.score_captions` (``lang="bn"``): BLEU-1..4, METEOR (Bengali mode,
    if ``eval.meteor`` and Java runs), BERTScore F1 (if ``eval.bertscore_model``). Returns
    ``(scores, [(sample_id, caption, reference), ...])``; a metric that cannot run is logged and
    left out of ``scores``.

    The references of an image are all its Bengali captions (the world's five, JSON
    ``captions_bn``; else its ``bn.txt``), as COCO scores against all of an image's captions;
    ``scores["references"]`` is their mean count per image, and ``BLEU-k (1 ref)`` the BLEU
    against the trained caption ``bn.txt`` alone."""
    from bimac.eval.captioning import score_captions
    from bimac.generation import GenerationConfig
    from bimac.metrics.text import java_available

    ev = cfg.eval
    urls = shards or ev.shards or cfg.data.val_shards
    if not urls:
        raise ValueError("eval.shards (or data.val_shards) must name the held-out triplet shards")
    data = DataConfig(**{**cfg.data.__dict__, "batch_size": ev.batch_size, "shuffle_buffer": 0})
    tok = as_loader_tokenizer(model.tokenizer, cfg.model.max_length, cfg.model.target_lang)
    loader = make_loader(data, tok, urls, rank=0, world_size=1, epoch=0, num_workers=0)
    gen = GenerationConfig(
        strategy="beam",
        num_beams=ev.num_beams,
        max_new_tokens=ev.max_new_tokens,
        length_penalty=ev.length_penalty,
        no_repeat_ngram_size=ev.no_repeat_ngram_size,
    )
    rows: list[tuple[str, str, str]] = []
    for batch in loader:
        texts = model.caption(batch["image"], gen).texts
        refs = model.tokenizer.batch_decode(batch["text_bn"], skip_special_tokens=True)
        rows += list(zip(batch["sample_id"], texts, refs))
        if len(rows) >= ev.max_samples:
            break
    rows = rows[: ev.max_samples]
    every_caption = bengali_references(urls)
    references = {sid: every_caption.get(sid, [ref]) for sid, _, ref in rows}
    metrics = ["bleu"]
    if ev.meteor and java_available():
        metrics.append("meteor")
    elif ev.meteor:
        logger.warning("METEOR skipped: it needs a Java runtime on PATH (or set eval.meteor=false)")
    if ev.bertscore_model:
        metrics.append("bertscore")
    scores = score_captions(
        {sid: cap for sid, cap, _ in rows},
        references,
        lang="bn",
        metrics=tuple(metrics),
        bertscore_model=ev.bertscore_model or None,
        bertscore_layer=ev.bertscore_layer,
    )
    scores["references"] = sum(map(len, references.values())) / len(references)
    single = score_captions({sid: c for sid, c, _ in rows}, {sid: [r] for sid, _, r in rows}, "bn")
    scores |= {f"BLEU-{k} (1 ref)": single[f"BLEU-{k}"] for k in range(1, 5)}
    return scores, rows


def bengali_references(urls: str) -> dict[str, list[str]]:
    """``url#key`` (the loader's ``sample_id``) -> the image's Bengali captions from its JSON
    (``captions_bn``: the world writes five per image); images without them are left out."""
    from bimac.data.samples import iter_samples

    return {
        f"{s['__url__']}#{s['__key__']}": list(s["json"]["captions_bn"])
        for s in iter_samples(urls)
        if s.get("json", {}).get("captions_bn")
    }


def metrics_table(scores: dict[str, Any]) -> str:
    """A one-row markdown table of the evaluation scores (paper Table 2 columns), with the
    references per image and the single-reference BLEU-4."""
    names = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "BERTScore-F1", "BLEU-4 (1 ref)")
    cols = [c for c in names if c in scores]
    head = "| n | references | " + " | ".join(cols) + " |"
    sep = "|---" * (len(cols) + 2) + "|"
    row = f"| {scores['images']} | {scores.get('references', 1):g} | "
    row += " | ".join(f"{scores[c]:.2f}" for c in cols) + " |"
    return "\n".join([head, sep, row])
