"""BERTScore through ``bert_score`` with a configurable model (hub name or local path) and layer.

English defaults to ``roberta-large`` (layer 17), Bengali to the multilingual cased BERT
(``bert-base-multilingual-cased``, layer 9), bert_score's own choices. Rescaling needs a
baseline file for the (language, model) pair; bert_score ships none for Bengali. When there is
no baseline the result says ``rescaled: False`` with the reason (bert_score itself only warns).
Candidates with several references take the best-matching reference (bert_score's rule).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULTS = {"en": ("roberta-large", 17), "bn": ("bert-base-multilingual-cased", 9)}


def bertscore(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    lang: str = "en",
    model: str | Path | None = None,
    layer: int | None = None,
    rescale: bool = True,
    baseline_path: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> dict:
    """Mean P/R/F1 and per-candidate F1; ``rescaled`` and ``note`` say what was done."""
    from bert_score import BERTScorer

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    default_model, default_layer = DEFAULTS.get(lang, (None, None))
    model = str(model or default_model or "")
    if not model:
        raise ValueError(f"no default BERTScore model for language {lang!r}; pass model=")
    if layer is None:
        if model != default_model:
            raise ValueError("pass layer= for a model that is not the language default")
        layer = default_layer
    scorer = BERTScorer(
        model_type=model,
        num_layers=layer,
        lang=lang,
        batch_size=batch_size,
        device=device,
        baseline_path=str(baseline_path) if baseline_path else None,
    )
    tok = scorer._tokenizer
    if tok.model_max_length > 1_000_000:  # tokenizer saved without a limit: use the model's
        tok.model_max_length = getattr(scorer._model.config, "max_position_embeddings", 512)
    note = ""
    baseline = Path(scorer.baseline_path)
    do_rescale = rescale and baseline.is_file()
    if rescale and not do_rescale:
        note = f"unrescaled: no baseline file for lang={lang}, model={model} ({baseline})"
        logger.warning("BERTScore %s", note)
    elif not rescale:
        note = "unrescaled (rescale=False)"
    scorer._rescale_with_baseline = do_rescale  # baseline availability decided above
    p, r, f = scorer.score(list(candidates), [list(x) for x in references], batch_size=batch_size)
    return {
        "P": float(p.mean()),
        "R": float(r.mean()),
        "F1": float(f.mean()),
        "per_caption_F1": f.tolist(),
        "model": model,
        "layer": layer,
        "rescaled": do_rescale,
        "note": note,
    }
