"""Stage 2: LaBSE verification of EN/BN pairs, then the merge (PAL §4.2.2, eq. 4).

``python -m shards.bengali.verify --translated work/translated --out work/verified
[--shard-index N] [tau=0.55] [model=PATH]`` scores every pair of each finished translate shard:
``shard_NNNNN.csv`` gets ``similarity`` (cosine of the sentence embeddings) and ``valid``
(similarity >= tau). ``... --merge`` then writes ``accepted.csv`` (the valid pairs of all shards),
``report.json`` (counts per shard, the similarity histogram) and ``similarity_hist.png``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bimac.config import ConfigError, parse_cli, run_main
from shards.bengali.resumable import (
    ShardRun,
    atomic_write_bytes,
    atomic_write_json,
    pending_shards,
    read_csv,
    require_input,
    setup_logging,
    write_csv,
)
from shards.bengali.translate import pick_device

log = logging.getLogger(__name__)

FIELDS = ["caption_id", "image_id", "en", "bn", "similarity", "valid"]
ACCEPTED_FIELDS = ["caption_id", "image_id", "en", "bn", "similarity"]
Embedder = Callable[[list[str]], np.ndarray]


@dataclass
class VerifyConfig:
    translated: Path = Path("work/bengali/translated")  # the translate stage's --out
    out: Path = Path("work/bengali/verified")
    model: str = "sentence-transformers/LaBSE"  # hub name or local path
    tau: float = 0.55
    batch_size: int = 128
    shard_index: int | None = None  # None: every translated shard (or SLURM_ARRAY_TASK_ID)
    merge: bool = False  # join the verified shards into accepted.csv + report
    hist_bins: int = 40
    device: str = "auto"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, computed in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def labse_embedder(cfg: VerifyConfig) -> Embedder:
    """``texts -> [N, D]`` embeddings from a sentence-transformers model (LaBSE by default)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(cfg.model, device=str(pick_device(cfg.device)))

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(
            texts,
            batch_size=len(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )

    return embed


def translated_shards(translated: Path) -> list[int]:
    """Indices of the translate shards that are finished (have a summary)."""
    return sorted(
        int(p.name.split("_")[1].split(".")[0])
        for p in Path(translated).glob("shard_*.summary.json")
    )


def verify_shard(embed: Embedder, cfg: VerifyConfig, index: int) -> dict[str, Any]:
    """Score the pairs of translate shard ``index``; return the shard summary."""
    run = ShardRun(cfg.out, "verify", index, FIELDS)
    if run.finished:
        return run.summary()
    source = ShardRun(cfg.translated, "translate", index, [])
    if not source.finished:
        raise FileNotFoundError(f"translate shard {index} is not finished ({source.summary_path})")
    rows = read_csv(source.csv_path)

    def check(item: dict[str, Any]) -> str | None:
        return "empty" if not item["en"].strip() or not item["bn"].strip() else None

    def process(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sims = cosine(embed([it["en"] for it in items]), embed([it["bn"] for it in items]))
        if not np.isfinite(sims).all():
            raise ValueError("non-finite similarity (a zero embedding?)")
        return [
            {**it, "similarity": float(s), "valid": bool(s >= cfg.tau)}
            for it, s in zip(items, sims)
        ]

    return run.run(rows, cfg.batch_size, check, process)


def merge(cfg: VerifyConfig) -> dict[str, Any]:
    """Join all verified shards into ``accepted.csv``, ``report.json`` and ``similarity_hist.png``."""
    out = Path(cfg.out)
    report_path = out / "report.json"
    if report_path.is_file():
        log.info("verify merge: %s exists; nothing to do (delete it to merge again)", report_path)
        return json.loads(report_path.read_text())
    expected = translated_shards(cfg.translated)
    missing = [i for i in expected if not ShardRun(out, "verify", i, FIELDS).finished]
    if not expected or missing:
        raise FileNotFoundError(
            f"verify merge: shards not verified yet: {missing or 'all'} in {out}"
        )
    accepted, sims, per_shard = [], [], {}
    for i in expected:
        run = ShardRun(out, "verify", i, FIELDS)
        rows = read_csv(run.csv_path)
        sims.extend(float(r["similarity"]) for r in rows)
        kept = [{k: r[k] for k in ACCEPTED_FIELDS} for r in rows if r["valid"] == "True"]
        accepted.extend(kept)
        summary = json.loads(run.summary_path.read_text())
        per_shard[str(i)] = {
            "scored": len(rows),
            "accepted": len(kept),
            "below_tau": len(rows) - len(kept),
            "rejected": summary["rejected"],
        }
    counts, edges = np.histogram(sims, bins=cfg.hist_bins, range=(-1.0, 1.0))
    write_csv(out / "accepted.csv", accepted, ACCEPTED_FIELDS)
    _plot_histogram(sims, cfg, out / "similarity_hist.png")
    report = {
        "tau": cfg.tau,
        "scored": len(sims),
        "accepted": len(accepted),
        "below_tau": len(sims) - len(accepted),
        "rejected_before_scoring": sum(sum(s["rejected"].values()) for s in per_shard.values()),
        "per_shard": per_shard,
        "histogram": {"edges": edges.round(4).tolist(), "counts": counts.tolist()},
    }
    atomic_write_json(report_path, report)
    log.info(
        "verify merge: %d of %d scored pairs accepted at tau=%.2f -> %s",
        len(accepted),
        len(sims),
        cfg.tau,
        out / "accepted.csv",
    )
    return report


def _plot_histogram(sims: list[float], cfg: VerifyConfig, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sims, bins=cfg.hist_bins, range=(-1.0, 1.0), color="tab:blue")
    ax.axvline(cfg.tau, color="tab:red", linestyle="--", label=f"tau = {cfg.tau:.2f}")
    ax.set_xlabel("LaBSE cosine similarity (EN, BN)")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


PROG = "python -m shards.bengali.verify"


def main(argv: list[str] | None = None) -> Any:
    setup_logging()
    cfg = parse_cli(VerifyConfig, PROG, __doc__, argv, "stage YAML (configs/bengali/*.yaml)")
    if cfg.merge:
        return merge(cfg)
    translate = "`python -m shards.bengali.translate --out DIR` writes it"
    finished = translated_shards(require_input(cfg.translated, "translated", translate))
    if not finished:
        raise ConfigError(
            f"translated: {cfg.translated} holds no finished translate shard; {translate}"
        )
    todo = pending_shards(cfg.out, "verify", finished, cfg.shard_index, FIELDS)
    if not todo:
        return []
    embed = labse_embedder(cfg)
    return [verify_shard(embed, cfg, i) for i in todo]


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
