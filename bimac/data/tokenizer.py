"""Tokenizers behind one interface (docs/contracts.md, "Tokenizer").

- ``HFTokenizer``: a ``tokenizers`` tokenizer.json; the embedded world trains its own small one
  (``train_world_tokenizer``, EN+BN, ~1000 tokens) so tiny models are not dominated by a 49k-row
  embedding table.
- ``OpenCLIPTokenizer``: open_clip's CLIP BPE for real English runs (ids equal open_clip's own).
- ``TransformersTokenizer``: any fast transformers tokenizer, e.g. mBART-50's SentencePiece for
  Bengali (``facebook/mbart-large-50``, ``src_lang="bn_IN"``).

All return fixed-length ``int64 [B, context_length]`` ids (BOS ... EOS, then ``pad_id``) and, from
``encode_with_offsets``, each token's character span (``int32 [B, context_length, 2]``, ``(0, 0)``
for special tokens and padding) so noun character spans become token spans (``token_spans``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from bimac.config import ConfigError, path_hint

log = logging.getLogger(__name__)
Offsets = np.ndarray  # int32 [B, context_length, 2]: each token's (start, end) character span


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    context_length: int

    def encode(self, texts: list[str]) -> torch.Tensor: ...

    def encode_with_offsets(self, texts: list[str]) -> tuple[torch.Tensor, Offsets]: ...

    def decode(self, ids: torch.Tensor | list[list[int]]) -> list[str]: ...


@dataclasses.dataclass
class TokenizerConfig:
    """``kind``: world (tokenizer.json at ``path``), open_clip (model ``name``), transformers."""

    kind: Literal["world", "open_clip", "transformers"] = "world"
    path: str = ""  # tokenizer.json of the world (beside its shards)
    name: str = ""  # open_clip model name or transformers hub name / local directory
    context_length: int = 32
    lang: str = "bn_IN"  # transformers: mBART-50 language code


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer a config names (no downloads unless ``name`` is a hub id not in the cache)."""
    if cfg.kind == "world":
        if not Path(cfg.path).is_file():
            raise ConfigError(
                f"tokenizer.path: world tokenizer {cfg.path!r} not found{path_hint(cfg.path)}; "
                "`python -m shards.world` writes tokenizer.json beside the shards"
            )
        return HFTokenizer.from_file(cfg.path, cfg.context_length)
    if cfg.kind == "open_clip":
        import open_clip

        name = cfg.name or "ViT-B-32"
        # open_clip falls back to CLIP BPE with only a warning for a name it does not know
        if not name.startswith("hf-hub:") and name not in open_clip.list_models():
            raise ConfigError(
                f"tokenizer.name={name!r} is not an open_clip model; use one of "
                "open_clip.list_models() (e.g. coca_ViT-B-32) or hf-hub:ORG/NAME"
            )
        return OpenCLIPTokenizer(name, cfg.context_length)
    if not cfg.name:
        raise ConfigError(
            "tokenizer.name is empty: set a transformers hub id or local tokenizer directory "
            "(e.g. facebook/mbart-large-50)"
        )
    return TransformersTokenizer(cfg.name, cfg.context_length, cfg.lang)


def noun_token_spans(
    offsets: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Token spans of N character spans at once: ``offsets`` ``[N, L, 2]`` (each span's caption's
    token offsets), ``starts``/``ends`` ``[N]`` -> ``int64 [N, 2]`` token index spans ``[start,
    end)`` covering each character span, and ``bool [N]`` whether any token overlaps it (False:
    truncated away). A token overlaps when it has characters and shares one with the span."""
    s, e = offsets[..., 0], offsets[..., 1]
    hit = (e > s) & (s < ends[:, None]) & (e > starts[:, None])
    first = hit.argmax(1)
    end = hit.shape[1] - hit[:, ::-1].argmax(1)
    return np.stack([first, end], 1), hit.any(1)


def token_spans(
    offsets: np.ndarray | list[tuple[int, int]], char_spans: list[tuple[int, int]]
) -> list[tuple[int, int] | None]:
    """One caption's token offsets ``[L, 2]`` -> the token span of each character span (None if
    truncated away): ``noun_token_spans`` for a single caption."""
    if not char_spans:
        return []
    chars = np.asarray(char_spans, np.int64).reshape(-1, 2)
    offs = np.broadcast_to(np.asarray(offsets, np.int64), (len(chars), *np.shape(offsets)))
    spans, found = noun_token_spans(offs, chars[:, 0], chars[:, 1])
    return [(int(a), int(b)) if ok else None for (a, b), ok in zip(spans, found)]


class HFTokenizer:
    """A ``tokenizers.Tokenizer``: BOS/EOS from its post-processor, truncated by it, padded here."""

    def __init__(self, tok, context_length: int = 32) -> None:
        self.tok = tok
        self.context_length = context_length
        self.pad_id = tok.token_to_id("<pad>")
        self.bos_id = tok.token_to_id("<s>")
        self.eos_id = tok.token_to_id("</s>")
        if None in (self.pad_id, self.bos_id, self.eos_id):
            raise ValueError("tokenizer.json lacks one of the special tokens <pad>, <s>, </s>")
        self.vocab_size = tok.get_vocab_size()
        tok.enable_truncation(context_length)  # counts the post-processor's BOS/EOS: EOS stays
        # padding here, not in tokenizers: its padded encodings (pad tokens as strings, offsets,
        # masks) cost ~40 % of the encode (BENCHMARKS.md, "Data loader on photographs")
        tok.no_padding()

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = 32) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        return cls(_Tok.from_file(str(path)), context_length)

    def encode_with_offsets(self, texts: list[str]) -> tuple[torch.Tensor, Offsets]:
        # one caption at a time: encode_batch hands a batch to its thread pool, which in the
        # loader (its workers are the parallelism) costs CPU and gains nothing
        n, length = len(texts), self.context_length
        ids = np.full((n, length), self.pad_id, np.int64)
        offsets = np.zeros((n, length, 2), np.int32)
        special = np.ones((n, length), bool)
        for i, text in enumerate(texts):
            enc = self.tok.encode(text)
            k = len(enc.ids)
            if k:
                ids[i, :k], offsets[i, :k], special[i, :k] = enc.ids, enc.offsets, enc.special_tokens_mask  # fmt: skip
        offsets[special] = 0
        return torch.from_numpy(ids), offsets

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.encode_with_offsets(texts)[0]

    def decode(self, ids) -> list[str]:
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tok.decode_batch(rows, skip_special_tokens=True)


def train_world_tokenizer(corpus: list[str], vocab_size: int = 1000):
    """A SentencePiece-style BPE (Metaspace) trained on ``corpus``; decode round-trips exactly."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = _Tok(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    # punctuation apart, so a noun is its own token(s), never merged with the full stop
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return tok


def save_world_tokenizer(path: str | Path, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Train the embedded world's tokenizer on its captions and save it as ``path``."""
    from bimac.data.world import world_corpus

    path = Path(path)
    train_world_tokenizer(world_corpus(2000, seed), vocab_size).save(str(path))
    return path


class OpenCLIPTokenizer:
    """open_clip's CLIP BPE (lower-cased), its ids equal open_clip's own.

    open_clip's ``SimpleTokenizer`` merges in Python (~35 us a caption here, more with the
    padding); the same vocabulary and merges, its split pattern and byte-level alphabet run in
    ``tokenizers`` (Rust), built from the tokenizer open_clip ships (no download): same ids,
    tested against open_clip on 2,109 strings, and each sub-word's own character span."""

    def __init__(self, name: str = "ViT-B-32", context_length: int = 77) -> None:
        import open_clip

        self.tok = open_clip.get_tokenizer(name)
        if not hasattr(self.tok, "bpe"):
            raise ValueError(f"{name}: only open_clip's SimpleTokenizer (CLIP BPE) is wrapped")
        self.context_length = context_length
        self.bos_id, self.eos_id, self.pad_id = self.tok.sot_token_id, self.tok.eot_token_id, 0
        self.vocab_size = self.tok.vocab_size
        self.fast = clip_bpe(self.tok)

    # a loader worker receives the wrapper pickled: rebuilding the Rust tokenizer there costs
    # less than half of unpickling it (0.04 against 0.10 CPU-s)
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "fast"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.fast = clip_bpe(self.tok)

    def encode_with_offsets(self, texts: list[str]) -> tuple[torch.Tensor, Offsets]:
        n, length = len(texts), self.context_length
        ids = np.full((n, length), self.pad_id, np.int64)
        offsets = np.zeros((n, length, 2), np.int32)
        ids[:, 0] = self.bos_id
        for i, text in enumerate(texts):
            # lower-cased here as open_clip does (Python's rules, e.g. a word-final sigma)
            enc = self.fast.encode(text.lower(), add_special_tokens=False)
            k = min(len(enc.ids), length - 2)  # truncated as open_clip does: EOS stays last
            ids[i, 1 : k + 1], ids[i, k + 1] = enc.ids[:k], self.eos_id
            if k:
                offsets[i, 1 : k + 1] = enc.offsets[:k]
        return torch.from_numpy(ids), offsets

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.encode_with_offsets(texts)[0]

    def decode(self, ids) -> list[str]:
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        special = {self.bos_id, self.eos_id, self.pad_id}
        return [self.tok.decode([i for i in r if i not in special]).strip() for r in rows]


def clip_bpe(simple):
    """open_clip's ``SimpleTokenizer`` ``simple`` as a ``tokenizers.Tokenizer`` for lower-cased
    text: its vocabulary, its merges in rank order, words marked ``</w>`` at their end, its split
    pattern (without the case flag: the text is lower-cased), bytes mapped to its alphabet, and
    its special tokens kept whole when they appear in a caption."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    tok = _Tok(models.BPE(vocab=simple.encoder, merges=merges, end_of_word_suffix="</w>"))
    words = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    if not simple.pat.pattern.endswith("|" + words):
        raise ValueError(f"open_clip's split pattern is not CLIP's: {simple.pat.pattern!r}")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.add_special_tokens([simple.decoder[i] for i in simple.all_special_ids])
    return tok


class TransformersTokenizer:
    """A fast transformers tokenizer (mBART-50 for Bengali: ``facebook/mbart-large-50``)."""

    def __init__(self, name: str, context_length: int = 64, lang: str | None = "bn_IN") -> None:
        from transformers import AutoTokenizer

        kw = {"src_lang": lang, "tgt_lang": lang} if lang else {}
        self.tok = AutoTokenizer.from_pretrained(name, **kw)
        if not self.tok.is_fast:
            raise ValueError(f"{name}: a fast tokenizer is needed for character offsets")
        self.context_length = context_length
        self.pad_id = self.tok.pad_token_id
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.pad_id
        self.eos_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode_with_offsets(self, texts: list[str]) -> tuple[torch.Tensor, Offsets]:
        enc = self.tok(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        # special tokens and padding have (0, 0) in transformers' offset mapping already
        return enc["input_ids"].long(), enc["offset_mapping"].numpy().astype(np.int32)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.encode_with_offsets(texts)[0]

    def decode(self, ids) -> list[str]:
        return self.tok.batch_decode(ids, skip_special_tokens=True)


def strip_special(ids: torch.Tensor, bos_id: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """Rows of token ids -> lists without BOS, and cut at the first EOS or pad."""
    rows = []
    for row in ids.tolist():
        out = []
        for t in row:
            if t in (eos_id, pad_id):
                break
            if t != bos_id:
                out.append(t)
        rows.append(out)
    return rows
