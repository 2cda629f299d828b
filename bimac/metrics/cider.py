"""CIDEr-D (Vedantam et al. 2015), vectorised with sparse n-gram TF-IDF vectors in NumPy.

The formula is exactly pycocoevalcap's ``Cider`` (which is CIDEr-D): n = 1..4, TF-IDF weights
``tf * (log(N_docs) - log(max(1, df)))``, clipped cosine ``min(w_hyp, w_ref) * w_ref`` per
order, a Gaussian length penalty with sigma = 6 on the difference of *bigram counts* (the
reference code's ``if n == 1`` quirk, kept so scores match), mean over orders and references,
times 10. ``tests/test_metrics_cider.py`` checks equality with pycocoevalcap to 1e-9.

One core serves both uses:

* evaluation: document frequencies from the evaluated references themselves::

      mean, per_image = cider_d(candidates, references)

* training reward (SCST): document frequencies from the training corpus, built once::

      scorer = CiderD(train_refs)            # train_refs[i]: the reference captions of image i
      rewards = scorer.score(samples, refs)  # np.ndarray [len(samples)], one score per sample

A caption is a whitespace-tokenised string, a sequence of string tokens, or a sequence of
integer token ids (list, NumPy array or tensor, special tokens already stripped: drop BOS,
everything from EOS on, and padding). A scorer is string- or id-based, fixed by its corpus.
Candidates sharing references (several samples per image) may repeat the same reference list.

How it is vectorised: an n-gram is one int64 key in base ``B = vocabulary + 1`` (so
``B ** n`` must stay below 2**63: at most 55,107 distinct tokens in one call or corpus for
n = 4, else a ValueError). Per order, the values ``key * n_sentences + sentence`` (keys first
compacted with ``np.unique`` where that product would overflow) are sorted once; runs give term
frequencies, document frequencies and, because each candidate is laid out just before its own
references, the candidate/reference matches, all without Python loops over n-grams.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["CiderD", "cider_d"]

_INT64_MAX = int(np.iinfo(np.int64).max)


def _encode(captions: Sequence[object], vocab: dict[str, int] | None = None, ids=None):
    """Symbols (>= 1) of all captions concatenated, per-caption lengths, and the vocabulary.

    Captions are strings (whitespace-split), string-token sequences or integer-id sequences.
    With a corpus vocabulary (``vocab`` for strings, sorted ``ids`` for integers), known tokens
    keep ids ``1..n_known`` and unknown ones follow. Returns
    ``(tok, lengths, n_known, n_symbols, vocab_or_ids)``.
    """
    all_str = set(map(type, captions)) <= {str}  # the common case, checked at C speed
    kinds = (
        {True}
        if all_str and captions
        else {
            isinstance(c, str) or (len(c) > 0 and isinstance(next(iter(c)), str))
            for c in captions
            if len(c)
        }
    )
    if len(kinds) > 1:
        raise TypeError("captions mix string tokens and integer token ids")
    if not kinds or kinds == {True}:
        if ids is not None and kinds:
            raise TypeError("this scorer was built from token ids; got strings")
        sep = "\x00"
        joined = f" {sep} ".join(c if isinstance(c, str) else " ".join(c) for c in captions)
        if joined.count(sep) != len(captions) - 1:
            raise ValueError("captions must not contain NUL characters")
        words = joined.split()  # one C-level split; separators mark caption boundaries
        # a new word gets the next id on first lookup: one C-level pass over the words
        known = {sep: 0, **(vocab or {})}
        n_known = len(known) - 1
        table = defaultdict(itertools.count(n_known + 1).__next__, known)
        codes = np.fromiter(map(table.__getitem__, words), np.int64, len(words))
        lengths = np.diff(np.r_[-1, np.flatnonzero(codes == 0), len(codes)]) - 1
        n_sym = len(table) - 1
        if vocab is None:
            del table[sep]
            vocab, n_known = dict(table), n_sym
        return codes[codes != 0], lengths, n_known, n_sym, vocab
    if vocab is not None:
        raise TypeError("this scorer was built from string tokens; got token ids")
    arrays = [
        np.asarray(c.detach().cpu() if hasattr(c, "detach") else c, np.int64).ravel()
        for c in captions
    ]
    lengths = np.fromiter(map(len, arrays), np.int64, len(arrays))
    raw = np.concatenate(arrays)
    if ids is None:
        ids, inv = np.unique(raw, return_inverse=True)
        return inv.ravel() + 1, lengths, len(ids), len(ids), ids
    n_known = len(ids)
    j = np.searchsorted(ids, raw).clip(max=max(n_known - 1, 0))
    known = ids[j] == raw if n_known else np.zeros(len(raw), bool)
    tok = j + 1
    new_ids, inv = np.unique(raw[~known], return_inverse=True)
    tok[~known] = n_known + 1 + inv.ravel()
    return tok, lengths, n_known, n_known + len(new_ids), ids


def _cider_core(
    tok: np.ndarray,
    lengths: np.ndarray,
    n_refs: np.ndarray,
    base: int,
    n: int,
    sigma: float,
    ref_len: float | None,
    lookup_df: Callable[[int, np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """Per-candidate CIDEr-D for sentences laid out as ``[cand_0, refs_0..., cand_1, ...]``.

    ``tok``: symbols in ``[1, base)``, all sentences concatenated. Document frequencies come from
    ``lookup_df(order, sorted n-gram keys)`` when given, else from these references (with
    ``ref_len = log(number of images)``).
    """
    n_img = len(n_refs)
    n_sent = len(lengths)
    if base**n > _INT64_MAX:
        raise ValueError(
            f"{base - 1} distinct tokens are too many for exact int64 {n}-gram keys "
            f"(at most {int(_INT64_MAX ** (1 / n)) - 1})"
        )
    owner = np.repeat(np.arange(n_img), n_refs + 1)
    cand_sent = np.cumsum(n_refs + 1) - (n_refs + 1)
    is_cand = np.zeros(n_sent, bool)
    is_cand[cand_sent] = True
    if ref_len is None:
        ref_len = float(np.log(n_img))

    total = len(tok)
    starts = np.cumsum(lengths) - lengths
    sent = np.repeat(np.arange(n_sent), lengths)
    remaining = lengths[sent] - (np.arange(total) - starts[sent])
    key = np.zeros(total, np.int64)
    sq_norm = np.zeros((n_sent, n))
    val = np.zeros((n_sent, n))  # clipped products, on the reference rows
    for k in range(n):
        shifted = np.zeros(total, np.int64)
        shifted[: max(total - k, 0)] = tok[k:]
        key = key * base + shifted  # only meaningful where remaining > k
        pos = np.flatnonzero(remaining > k)
        if not len(pos):
            continue
        s = sent[pos]
        if base ** (k + 1) * n_sent <= _INT64_MAX:  # exact Python ints: no overflow
            comb, uniq = key[pos] * n_sent + s, None
        else:
            uniq, inv = np.unique(key[pos], return_inverse=True)
            comb = inv.ravel() * n_sent + s
        comb.sort()
        first = np.flatnonzero(np.r_[True, comb[1:] != comb[:-1]])
        tf = np.diff(np.r_[first, len(comb)])
        e_gram, e_sent = np.divmod(comb[first], n_sent)
        new_gram = np.r_[True, e_gram[1:] != e_gram[:-1]]
        gram_id = np.cumsum(new_gram) - 1
        if lookup_df is None:
            # Distinct (gram, image) among reference entries; images are contiguous in layout.
            ref_e = np.flatnonzero(~is_cand[e_sent])
            g, img = gram_id[ref_e], owner[e_sent[ref_e]]
            new = np.r_[True, (g[1:] != g[:-1]) | (img[1:] != img[:-1])] if len(g) else g
            df = np.bincount(g[new.astype(bool)], minlength=int(gram_id[-1]) + 1)[gram_id]
        else:
            keys = e_gram[new_gram] if uniq is None else uniq[e_gram[new_gram]]
            df = lookup_df(k, keys)[gram_id]
        w = tf * (ref_len - np.log(np.maximum(1.0, df)))
        sq_norm[:, k] = np.bincount(e_sent, w * w, minlength=n_sent)
        # Each reference entry meets its own candidate's entry for the same gram, if any:
        # the last candidate entry at or before it in (gram, sentence) order.
        last = np.maximum.accumulate(np.where(is_cand[e_sent], np.arange(len(e_sent)), -1))
        ref_e = np.flatnonzero(~is_cand[e_sent] & (last >= 0))
        p = last[ref_e]
        ok = (e_gram[p] == e_gram[ref_e]) & (owner[e_sent[p]] == owner[e_sent[ref_e]])
        p, r = p[ok], ref_e[ok]
        val[:, k] = np.bincount(e_sent[r], np.minimum(w[p], w[r]) * w[r], minlength=n_sent)

    norm = np.sqrt(sq_norm)
    glen = np.maximum(lengths - 1, 0) if n >= 2 else np.zeros_like(lengths)  # bigram count
    ref_rows = np.flatnonzero(~is_cand)
    cand_of = cand_sent[owner[ref_rows]]
    v = val[ref_rows]
    denom = norm[cand_of] * norm[ref_rows]
    v = np.divide(v, denom, out=v, where=denom != 0)
    delta = (glen[cand_of] - glen[ref_rows]).astype(np.float64)
    v *= np.exp(-(delta**2) / (2 * sigma**2))[:, None]
    per_img = np.add.reduceat(v, np.cumsum(n_refs) - n_refs, axis=0)  # refs are contiguous
    return per_img.mean(axis=1) / n_refs * 10.0


def _layout(candidates: Sequence[object], references: Sequence[Sequence[object]]):
    """Sentences as ``[cand_0, refs_0..., cand_1, refs_1..., ...]`` and the reference counts."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    n_refs = np.array([len(r) for r in references], np.int64)
    if len(n_refs) and n_refs.min() == 0:
        raise ValueError(f"candidate {int(np.argmin(n_refs))} has no references")
    flat = []
    for c, rs in zip(candidates, references):
        flat.append(c)
        flat.extend(rs)
    return flat, n_refs


def cider_d(
    candidates: Sequence[object],
    references: Sequence[Sequence[object]],
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, np.ndarray]:
    """Corpus CIDEr-D for evaluation (df from ``references``): ``(mean, per-candidate scores)``."""
    if not candidates:
        return 0.0, np.zeros(0)
    flat, n_refs = _layout(candidates, references)
    tok, lengths, _, n_sym, _ = _encode(flat)
    scores = _cider_core(tok, lengths, n_refs, n_sym + 1, n, sigma, None, None)
    return float(scores.mean()), scores


class CiderD:
    """CIDEr-D scorer with document frequencies fixed from a reference corpus (for rewards).

    Args:
        corpus: one entry per image (document): the list of its reference captions.
        n: highest n-gram order. sigma: the length penalty's standard deviation.

    ``score(candidates, references)`` returns one CIDEr-D per candidate; n-grams unseen in the
    corpus get df = 0 and ``ref_len = log(len(corpus))``, as in the SCST reference code.
    """

    def __init__(self, corpus: Sequence[Sequence[object]], n: int = 4, sigma: float = 6.0):
        if not corpus:
            raise ValueError("CiderD needs a non-empty reference corpus for document frequencies")
        self.n, self.sigma = n, sigma
        self.ref_len = float(np.log(len(corpus)))
        tok, lengths, n_sym, _, table = _encode([c for refs in corpus for c in refs])
        self._is_str = isinstance(table, dict)
        self._vocab = table if self._is_str else None
        self._ids = None if self._is_str else table
        self._base = n_sym + 1
        if self._base**n > _INT64_MAX:
            raise ValueError(f"{n_sym} distinct corpus tokens: too many for int64 {n}-gram keys")
        per_doc = np.array([len(r) for r in corpus], np.int64)
        owner = np.repeat(np.arange(len(corpus)), per_doc)
        starts = np.cumsum(lengths) - lengths
        sent = np.repeat(np.arange(len(lengths)), lengths)
        remaining = lengths[sent] - (np.arange(len(tok)) - starts[sent])
        key = np.zeros(len(tok), np.int64)
        self._keys: list[np.ndarray] = []
        self._df: list[np.ndarray] = []
        for k in range(n):
            shifted = np.zeros(len(tok), np.int64)
            shifted[: max(len(tok) - k, 0)] = tok[k:]
            key = key * self._base + shifted  # meaningful where remaining > k
            pos = np.flatnonzero(remaining > k)
            uniq, inv = np.unique(key[pos], return_inverse=True)
            doc_gram = np.unique(inv.ravel() * len(corpus) + owner[sent[pos]])
            self._keys.append(uniq)
            self._df.append(np.bincount(doc_gram // len(corpus), minlength=len(uniq)) * 1.0)

    def _lookup(self, k: int, keys: np.ndarray, base: int) -> np.ndarray:
        """Corpus df of call n-gram keys (order k + 1, in ``base``); grams with unknown tokens: 0."""
        if base != self._base:  # re-encode in the corpus base; an unknown digit -> absent
            digits, rest = [], keys.copy()
            for _ in range(k + 1):
                rest, d = np.divmod(rest, base)
                digits.append(d)
            known = np.all(np.stack(digits) < self._base, axis=0)
            keys = np.zeros_like(keys)
            for d in reversed(digits):
                keys = keys * self._base + d
            keys[~known] = -1
        table = self._keys[k]
        df = np.zeros(len(keys))
        if len(table):
            j = np.searchsorted(table, keys).clip(max=len(table) - 1)
            hit = table[j] == keys
            df[hit] = self._df[k][j[hit]]
        return df

    def score(
        self, candidates: Sequence[object], references: Sequence[Sequence[object]]
    ) -> np.ndarray:
        """CIDEr-D of each candidate against its references: ``float64 [len(candidates)]``."""
        if not candidates:
            return np.zeros(0)
        flat, n_refs = _layout(candidates, references)
        tok, lengths, _, n_sym, _ = _encode(flat, self._vocab, self._ids)
        base = n_sym + 1

        def lookup(k: int, keys: np.ndarray) -> np.ndarray:
            return self._lookup(k, keys, base)

        return _cider_core(tok, lengths, n_refs, base, self.n, self.sigma, self.ref_len, lookup)
