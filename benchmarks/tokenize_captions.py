"""CPU microseconds per caption of the loader's tokenizers (``encode_with_offsets``: ids padded to
the context and each token's character span), against the libraries they wrap.

- ``open_clip``: bimac's ``OpenCLIPTokenizer`` (CLIP BPE in ``tokenizers``, the paper configs'
  tokenizer) against open_clip's own ``SimpleTokenizer`` (Python BPE; ids only), on the same
  captions; the ids are checked equal first.
- ``world``: the embedded world's ``tokenizers`` BPE (``HFTokenizer``) against the same
  tokenizer padded by ``tokenizers`` itself through ``encode_batch``, what the loader did before.

Captions: the embedded world's English captions (``world_corpus``), in batches of 64 as a loader
worker tokenises them; each timing is the median of ``--repeats`` passes, the two taking turns
batch by batch.
``.venv/bin/python benchmarks/tokenize_captions.py [--n 3000] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import open_clip
import torch
from tokenizers import Tokenizer

from bimac.data.tokenizer import (
    OpenCLIPTokenizer,
    TokenizerConfig,
    build_tokenizer,
    save_world_tokenizer,
)
from bimac.data.world import world_corpus


def us_per_caption(fns: dict[str, Callable], batches: list[list[str]], repeats: int) -> dict:
    """Median over ``repeats`` passes of each function's CPU us per caption over ``batches``. The
    functions take turns batch by batch (the machine's speed drifts by tens of per cent between
    seconds here, so whole passes one after another would compare two speeds of the machine)."""
    passes: dict[str, list[float]] = {name: [] for name in fns}
    n = sum(map(len, batches))
    for _ in range(repeats):
        spent = dict.fromkeys(fns, 0.0)
        for batch in batches:
            for name, fn in fns.items():
                c = time.process_time()
                fn(batch)
                spent[name] += time.process_time() - c
        for name in fns:
            passes[name].append(1e6 * spent[name] / n)
    return {name: statistics.median(v) for name, v in passes.items()}


def padded_by_tokenizers(path: Path, context: int) -> Callable:
    """The world tokenizer as the loader used it before: padding and the batch in tokenizers."""
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(context)
    tok.enable_padding(length=context, pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")

    def encode(texts: list[str]):
        encs = tok.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encs])
        offsets = [
            [(s, e) if not special else (0, 0) for (s, e), special in zip(x.offsets, x.special_tokens_mask)]
            for x in encs
        ]  # fmt: skip
        return ids, offsets

    return encode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=3000, help="captions")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    torch.set_num_threads(1)
    texts = [t for t in world_corpus(a.n, seed=1) if t.isascii()][: a.n]
    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    clip = OpenCLIPTokenizer("ViT-B-32", context_length=77)
    reference = open_clip.get_tokenizer("ViT-B-32")
    assert torch.equal(clip.encode(texts), reference(texts)), "ids differ from open_clip's"
    with tempfile.TemporaryDirectory() as tmp:
        path = save_world_tokenizer(Path(tmp) / "tokenizer.json")
        world = build_tokenizer(TokenizerConfig(kind="world", path=str(path), context_length=32))
        before = padded_by_tokenizers(path, 32)
        assert torch.equal(world.encode(texts), before(texts)[0]), "world ids changed"
        result = {
            "open_clip": us_per_caption(
                {"bimac": clip.encode_with_offsets, "open_clip": reference}, batches, a.repeats
            ),
            "world": us_per_caption(
                {"bimac": world.encode_with_offsets, "padded_by_tokenizers": before},
                batches,
                a.repeats,
            ),
        }
    rows = []
    for name, r in result.items():
        other = next(k for k in r if k != "bimac")
        ours, lib = r["bimac"], r[other]
        rows.append(f"| {name} (vs {other}) | {ours:.1f} | {lib:.1f} | {lib / ours:.2f} |")
    report(texts, "| tokenizer | bimac, us per caption | library, us per caption | speedup |",
           rows, result, a.json)  # fmt: skip


def report(texts: list[str], header: str, rows: list[str], result: dict, path: str | None,
           **meta) -> None:  # fmt: skip
    """Print the run's date, load and the table; with ``path``, write the results and the run's
    facts there as JSON."""
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "captions": len(texts),
        "mean_chars": sum(map(len, texts)) / len(texts),
        **meta,
    }
    print(f"{meta['date']}, load average {meta['load_average_1_5_15']}, {len(texts)} captions")
    print(header)
    print("|---|---:|---:|---:|")
    print("\n".join(rows))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"meta": meta, **result}, indent=2))


if __name__ == "__main__":
    main()
