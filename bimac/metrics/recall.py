"""Recall@k for cross-modal retrieval, from embeddings in memory-bounded chunks.

Rank of a query = the number of *non-matching* gallery items whose similarity is >= the best
matching item's similarity. Ties therefore count against the model (a constant model scores
R@1 = 0, not 100), and the result does not depend on the order of the gallery.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ranks_from_similarity(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank of each row's best positive column: ``sim`` and bool ``positive`` are ``[Q, G]``."""
    if sim.shape != positive.shape:
        raise ValueError(f"similarity {tuple(sim.shape)} and mask {tuple(positive.shape)} differ")
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every query needs at least one positive")
    best = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return ((sim >= best) & ~positive).sum(dim=1)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Percentage of queries with rank < k, for each k."""
    return {k: 100.0 * float((ranks < k).float().mean()) for k in ks}


def _chunk_rows(n_gallery: int, max_bytes: int) -> int:
    # a similarity block of float32 plus its bool mask and comparison temporaries
    return max(1, max_bytes // max(1, n_gallery * 4 * 3))


def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    max_bytes: int = 256 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image->text and text->image ranks, with similarity blocks of at most ~``max_bytes``.

    ``image_emb [I, D]``, ``text_emb [T, D]`` (compared by dot product; L2-normalise first for
    cosine) and ``text_to_image [T]``: the image index each caption describes.
    """
    text_to_image = text_to_image.to(torch.long)
    n_img, n_txt = len(image_emb), len(text_emb)
    if len(text_to_image) != n_txt:
        raise ValueError(f"{n_txt} texts but {len(text_to_image)} text->image labels")
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError("text_to_image holds an image index out of range")
    i2t = torch.empty(n_img, dtype=torch.long)
    rows = _chunk_rows(n_txt, max_bytes)
    for a in range(0, n_img, rows):
        b = min(a + rows, n_img)
        sim = image_emb[a:b].float() @ text_emb.float().T
        pos = text_to_image[None, :] == torch.arange(a, b)[:, None]
        i2t[a:b] = ranks_from_similarity(sim, pos)
    t2i = torch.empty(n_txt, dtype=torch.long)
    rows = _chunk_rows(n_img, max_bytes)
    for a in range(0, n_txt, rows):
        b = min(a + rows, n_txt)
        sim = text_emb[a:b].float() @ image_emb.float().T
        pos = torch.arange(n_img)[None, :] == text_to_image[a:b, None]
        t2i[a:b] = ranks_from_similarity(sim, pos)
    return i2t, t2i


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    max_bytes: int = 256 * 2**20,
) -> dict[str, float]:
    """``i2t_R@k``, ``t2i_R@k``, their means ``mTR`` / ``mIR`` (BiMAC Table 5) and ``rsum``."""
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, max_bytes)
    out: dict[str, float] = {}
    r_i2t, r_t2i = recall_at_k(i2t, ks), recall_at_k(t2i, ks)
    out.update({f"i2t_R@{k}": v for k, v in r_i2t.items()})
    out.update({f"t2i_R@{k}": v for k, v in r_t2i.items()})
    out["mTR"] = sum(r_i2t.values()) / len(ks)
    out["mIR"] = sum(r_t2i.values()) / len(ks)
    out["rsum"] = sum(r_i2t.values()) + sum(r_t2i.values())
    return out
