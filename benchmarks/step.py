"""Training-step time of BiMAC against open_clip's CoCa (``CoCaLoss``) on the same towers and batch.

Run: ``.venv/bin/python benchmarks/step.py [--batch 32] [--steps 5] [--model configs/model/tiny.yaml]``.
Prints a markdown table: step times (median over timed steps after one warm-up) for
CoCa (MCL + CG via open_clip's CoCaLoss), BiMAC without RF (MCL + CG + grounding + L_rec), the
RF reward (greedy captions + CIDEr-D) on its own, the Hungarian matching's share of a batch-256
step, and tiny's training throughput. Batches are random (uint8 images, token ids, 8 noun slots
of which 1-4 are used): step time does not depend on the pixel values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch
from open_clip.loss import CoCaLoss

from bimac.matching import hungarian_match
from bimac.models.bimac import BiMACConfig, load_model_config
from bimac.tasks.pretrain import ObjectiveConfig, PretrainTask

TOK = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2)


def make_batch(cfg: BiMACConfig, b: int, nouns: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.vocab_size, (b, cfg.context_length), generator=g)
    text[:, 0] = TOK.bos_id
    lengths = torch.randint(6, cfg.context_length - 1, (b,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        text[i, n] = TOK.eos_id
        text[i, n + 1 :] = TOK.pad_id
    starts = torch.arange(nouns).repeat(b, 1) % 4 + 1
    spans = torch.stack([starts, starts + 1], -1)
    used = torch.randint(1, 5, (b, 1), generator=g)
    mask = torch.arange(nouns).unsqueeze(0) < used
    return {
        "image": torch.randint(
            0, 256, (b, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8
        ),
        "text": text,
        "noun_spans": spans,
        "noun_mask": mask,
    }


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_interleaved(fns, steps: int) -> list[float]:
    """Median times of several step functions run in turn, so load changes hit them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def train_step(model, params, loss_fn):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="configs/model/tiny.yaml")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hungarian-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = load_model_config(a.model)
    batch = make_batch(cfg, a.batch)
    rows = []

    # CoCa: open_clip forward + CoCaLoss on the very towers BiMAC holds
    task = PretrainTask(cfg, ObjectiveConfig(rf=False))
    model = task.build_model()
    coca_loss = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=cfg.pad_id)

    def coca_forward():
        out = model.coca(model.normalize(batch["image"]), batch["text"])
        clip, cap = coca_loss(
            out["image_features"],
            out["text_features"],
            out["logits"],
            out["labels"],
            out["logit_scale"],
        )
        return clip + cap

    coca_params = [p for p in model.coca.parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    t_coca, t_bimac = timed_interleaved(
        [
            train_step(model, coca_params, coca_forward),
            train_step(model, params, lambda: sum(task.losses(model, batch)[0].values())),
        ],
        a.steps,
    )
    rows.append(("CoCa (open_clip forward + CoCaLoss)", a.batch, t_coca, 1.0))
    rows.append(("BiMAC, no RF (MCL + CG + grounding + L_rec)", a.batch, t_bimac, t_bimac / t_coca))

    # RF alone: greedy captions from the decoder memory + CIDEr-D against a training corpus
    corpus = [[row[1:12]] for row in make_batch(cfg, 512, seed=1)["text"].tolist()]
    rf_task = PretrainTask(cfg, ObjectiveConfig(), tokenizer=TOK, reward_corpus=corpus)
    with torch.no_grad():
        out = model(
            batch["image"], batch["text"], caption=True, grounding=False, reconstruction=False
        )
    t_rf = timed(lambda: rf_task._reward_weights(model, out, batch, {}), a.steps)
    rows.append(("RF reward alone (greedy decode + CIDEr-D)", a.batch, t_rf, t_rf / t_coca))
    t_full = timed(
        train_step(model, params, lambda: sum(rf_task.losses(model, batch)[0].values())), a.steps
    )
    rows.append(("BiMAC, full (RF every step)", a.batch, t_full, t_full / t_coca))

    # Hungarian share of a batch-256 step
    big = make_batch(cfg, a.hungarian_batch)
    t_big = timed(train_step(model, params, lambda: sum(task.losses(model, big)[0].values())), 2)
    with torch.no_grad():
        o = model(
            big["image"],
            big["text"],
            big["noun_spans"],
            big["noun_mask"],
            caption=False,
            reconstruction=False,
        )
    scores = torch.einsum("bnd,bpd->bnp", o["noun_emb"], o["patch_emb"])
    t_hung = timed(lambda: hungarian_match(scores, big["noun_mask"]), a.steps)

    print(
        f"Model {a.model}, torch threads {torch.get_num_threads()}, "
        f"load average at end {os.getloadavg()[0]:.1f}\n"
    )
    print("| step | batch | s / step | × CoCa | samples / s |")
    print("|---|---|---|---|---|")
    for name, b, t, ratio in rows:
        print(f"| {name} | {b} | {t:.3f} | {ratio:.2f} | {b / t:.1f} |")
    print(
        f"| BiMAC, no RF | {a.hungarian_batch} | {t_big:.3f} | | {a.hungarian_batch / t_big:.1f} |"
    )
    print(
        f"\nHungarian matching at batch {a.hungarian_batch} ({tuple(scores.shape)} scores, SciPy per "
        f"sample, one CPU transfer): {t_hung * 1e3:.1f} ms = {100 * t_hung / t_big:.1f} % of the step "
        f"({t_hung / a.hungarian_batch * 1e3:.3f} ms per sample)"
    )


if __name__ == "__main__":
    main()
