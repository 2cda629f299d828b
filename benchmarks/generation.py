"""Caption generation throughput: KV cache against re-running the decoder on the whole prefix.

Greedy and beam-5 decoding of ``--tokens`` tokens for a batch of ``--batch`` images with the
open_clip CoCa text tower + multimodal decoder (random weights, image memory given as tokens),
at a tiny width and at CoCa-Base width (``coca_ViT-B-32``: 512 wide, 12 + 12 layers, 49408-token
vocabulary, 255 memory tokens). EOS is blocked so every row decodes exactly ``--tokens`` tokens.
Prints a markdown table of generated tokens per second (rows x tokens / best wall time); beam
rows count the K beams of each image. Without a cache every step also recomputes the image
memory's cross-attention keys/values (what open_clip's ``CoCa.generate`` does).

    .venv/bin/python benchmarks/generation.py [--widths tiny base] [--batch 64] [--tokens 20]
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

from bimac.generation import CocaAdapter, GenerationConfig, generate

WIDTHS = {
    # name: (width, heads, text layers = decoder layers, vocab, memory tokens)
    "tiny": (128, 4, 2, 1000, 64),
    "base": (512, 8, 12, 49408, 255),
}


def build(name: str) -> tuple[CocaAdapter, torch.Tensor]:
    width, heads, layers, vocab, n_mem = WIDTHS[name]
    torch.manual_seed(0)
    tower = dict(width=width, heads=heads, layers=layers, vocab_size=vocab, context_length=76)
    coca = open_clip.CoCa(
        embed_dim=width,
        multimodal_cfg=tower,
        text_cfg=dict(tower, embed_cls=True, output_tokens=True),
        vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1, head_width=32),
    ).eval()
    torch.nn.init.normal_(coca.text_decoder.text_projection, std=width**-0.5)
    adapter = CocaAdapter(coca, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)
    return adapter, torch.randn(1, n_mem, width)


def tokens_per_s(adapter, memory, cfg: GenerationConfig, batch: int, repeats: int) -> float:
    memory = memory.expand(batch, -1, -1).contiguous()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(adapter, memory, cfg)
        best = min(best, time.perf_counter() - start)
    assert out.ids.shape[1] == cfg.max_new_tokens
    return len(out.ids) * cfg.max_new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--beam-batch", type=int, default=0, help="batch for beam-5 (0: --batch)")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.tokens} tokens, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| width | decoding | batch | no cache (tok/s) | cache (tok/s) | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    beam_batch = args.beam_batch or args.batch
    for name in args.widths:
        adapter, memory = build(name)
        for label, batch, kw in [
            ("greedy", args.batch, dict()),
            ("beam-5", beam_batch, dict(strategy="beam", num_beams=5)),
        ]:
            rates = [
                tokens_per_s(
                    adapter,
                    memory,
                    GenerationConfig(
                        max_new_tokens=args.tokens,
                        min_new_tokens=args.tokens,
                        use_cache=use_cache,
                        **kw,
                    ),
                    batch,
                    args.repeats,
                )
                for use_cache in (False, True)
            ]
            print(
                f"| {name} | {label} | {batch} | {rates[0]:.1f} | {rates[1]:.1f} | "
                f"{rates[1] / rates[0]:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
