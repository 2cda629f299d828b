"""Data: the embedded world, WebDataset shards and loader, tokenizers, noun extraction.

Public API (everything here is importable from ``bimac.data``)::

    from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader

    # shards of the embedded world (+ tokenizer.json beside them):
    #   python -m shards.world --out runs/world/train --split train --n 2000
    cfg = DataConfig(train_shards="runs/world/train/{00000..00001}.tar", image_size=64,
                     batch_size=32, num_workers=2)
    tok = build_tokenizer(TokenizerConfig(kind="world", path="runs/world/train/tokenizer.json",
                                          context_length=32))
    loader = make_loader(cfg, tok, rank=0, world_size=1, epoch=0)  # a one-pass reader
    for batch in loader:            # dict, see docs/contracts.md "Batch"
        batch["image"]              # uint8 [B, 3, S, S]
        batch["text"]               # int64 [B, L]
        batch["noun_spans"], batch["noun_mask"], batch["noun_boxes"], batch["noun_has_box"]
        batch["sample_id"]          # list of "url#key"
    loader.skipped()                # {reason: count}, summed over DataLoader workers

``make_loader(cfg, tokenizer, urls=None, *, rank, world_size, epoch, global_batch_size, cursor,
num_workers, tokenizer_bn, counter) -> Loader``: with ``global_batch_size`` (training), a global
sample order over ``cfg.streams`` virtual streams: global step k holds the same samples in the
same order on every world size dividing ``cfg.streams`` and with any ``num_workers``; exact mode
yields every sample at most once per epoch (the tail after the last full global step is counted
as ``epoch_tail``), ``cfg.resampled=True`` reads ``cfg.epoch_samples`` raw samples per epoch.
``cursor`` (every rank's ``loader.state_dict()`` merged) resumes exactly, on another world size
too. Without ``global_batch_size``: a one-pass reader (one stream, one rank). Pass one ``SkipCounter`` to every epoch's
loader for running totals. Triplets (``cfg.kind="triplets"``) add ``image_syn`` and ``text_bn``
(``tokenizer_bn``, default ``tokenizer``); ``cfg.caption_lang="bn"`` makes pairs Bengali.
Skip reasons: ``bimac.data.REASONS``.
The world in Python: ``bimac.data.world.make_sample(seed, split, index, size, triplet)``.
Nouns: ``bimac.data.nouns.NounExtractor("world" | "en_core_web_sm")(text) -> list[Noun]``.
"""

from bimac.data.loader import (
    REASONS,
    DataConfig,
    IndexLoader,
    Loader,
    ShardDataset,
    SkipCounter,
    make_loader,
)
from bimac.data.tokenizer import TokenizerConfig, build_tokenizer, token_spans

__all__ = [
    "REASONS",
    "DataConfig",
    "IndexLoader",
    "Loader",
    "ShardDataset",
    "SkipCounter",
    "TokenizerConfig",
    "build_tokenizer",
    "make_loader",
    "token_spans",
]
