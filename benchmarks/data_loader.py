"""Images per CPU-second of the training data pipeline vs the bare decode + resize loop.

Three image sets, each 3,000 JPEGs in shards with the world's captions and JSON:
``photo_500`` (~500x375, img2dataset's size) and ``photo_1024`` (~1024x768, CC's) built by
``shards.photos`` from photographs that installed packages ship, and ``world_256`` (the embedded
world at 256 px, flat colours). For each set, on a sample of its JPEGs held in memory:

1. every candidate decode path (PIL full decode, PIL ``draft``, simplejpeg full and DCT-scaled,
   ``torchvision.io.decode_jpeg``; resize with PIL or ``torch.nn.functional.interpolate`` on
   uint8) is timed and its 224 px output compared with full decode + PIL bicubic (PSNR); the
   fastest path within ``--psnr`` dB is the ceiling: its bare single-process loop;
2. ``bimac.data.make_loader`` (tar reading, grouping, shuffle, checks, JSON, decode, tokenising,
   noun spans, collate, hand-off from workers) runs one epoch with 0, 1 and 2 workers, with
   ``bimac.data.decode.decode_image`` and, side by side, with today's decode path before it
   (PIL draft + PIL bicubic, ``--no-baseline`` skips it), and with a decoder that decodes
   nothing (``noop_decode``: what the loader costs per sample with no decoding between samples);
3. at 0 workers the per-image CPU time of each loader stage besides decoding is measured alone,
   and the tar members' grouping into samples against webdataset's ``group_by_keys``.

CPU time = this process + every process under it (the fork server and its DataLoader
workers), so other jobs on a shared machine distort it far less than wall time. ``--json PATH`` writes every figure.
``.venv/bin/python benchmarks/data_loader.py [--n 3000] [--sets photo_1024] [--json out.json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import webdataset as wds
from PIL import Image

from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from bimac.data.decode import _dct_factor, decode_image, resize_crop, resized_size
from bimac.data.loader import (
    ShardDataset,
    SkipCounter,
    group_members,
    tar_members,
    worker_context,
)

# Each DataLoader worker re-imports this module (the fork server runs ``__main__`` again), so
# what only the decoder comparison and the set builder need is imported where they need it.
SETS = {"photo_500": (500, 375), "photo_1024": (1024, 768), "world_256": (256, 256)}
Decoder = Callable[[bytes, int], np.ndarray]


def _cpu() -> float:
    """CPU seconds of this process and of every process under it, finished ones included.

    The DataLoader workers are children of the loader's fork server, not of this process:
    ``RUSAGE_CHILDREN`` would miss them until the server exits, so the server's own account of
    its reaped children (``children_user``/``children_system``) is read with psutil. Between two
    epochs no worker is alive, so nothing is counted twice. This process's own CPU is read to the
    nanosecond (``/proc`` counts in 10 ms ticks: a start-up epoch at 0 workers read 0 s).
    """
    import psutil  # here, not at the top: each worker re-runs the top (8.5 ms of CPU an epoch)

    own = os.times()
    total = time.process_time() + own.children_user + own.children_system
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _minor_faults() -> int:
    """Minor page faults of this process and of every process under it, finished ones included
    (``/proc/PID/stat`` minflt + cminflt, as ``_cpu`` counts; 0 where there is no /proc): a
    count the load of a shared machine does not change, unlike CPU time."""
    import psutil

    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[7]) + int(fields[8])
    return total


def _pil_resize(img: Image.Image, w: int, h: int, size: int) -> np.ndarray:
    nw, nh = resized_size(w, h, size)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + size, top + size)))  # fmt: skip


def pil_full(data: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return _pil_resize(img, *img.size, size)


def pil_draft(data: bytes, size: int) -> np.ndarray:
    """Today's path before ``bimac.data.decode``: PIL ``draft`` + PIL bicubic."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    img.draft("RGB", (size, size))
    return _pil_resize(img.convert("RGB"), w, h, size)


def today_decode(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``pil_draft`` as the loader's ``image_decoder``."""
    return pil_draft(data, size), Image.open(io.BytesIO(data)).size


class TimedDecoder:
    """A loader ``image_decoder`` that adds the CPU time spent inside ``fn`` to a shared counter,
    summed over the main process and every DataLoader worker (it travels to them with the
    dataset, as the skip counters do). The loader's CPU minus this is what it spends besides
    decoding, measured in the same epoch, so a drift of the machine's speed between two passes
    does not enter it."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.cpu = worker_context().Array("d", 1)

    def __call__(self, data: bytes, size: int):
        # this thread's CPU only: a worker's queue-feeder and fd-sharing threads run meanwhile
        c = time.thread_time()
        out = self.fn(data, size)
        spent = time.thread_time() - c
        with self.cpu.get_lock():
            self.cpu[0] += spent
        return out


def pil_draft_torch(data: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    img.draft("RGB", (size, size))
    return resize_crop(np.array(img.convert("RGB")), w, h, size)


def _simplejpeg(data: bytes, size: int, scaled: bool) -> tuple[np.ndarray, int, int]:
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    f = _dct_factor(w, h, size) if scaled else 1
    pixels = simplejpeg.decode_jpeg(
        data, "RGB", min_factor=f, min_height=-(-h // f), min_width=-(-w // f)
    )
    return pixels, w, h


def simplejpeg_scaled_pil(data: bytes, size: int) -> np.ndarray:
    pixels, w, h = _simplejpeg(data, size, scaled=True)
    return _pil_resize(Image.fromarray(pixels), w, h, size)


def simplejpeg_scaled_torch(data: bytes, size: int) -> np.ndarray:
    """The path ``decode_image`` takes for baseline/progressive YCbCr JPEGs."""
    return resize_crop(*_simplejpeg(data, size, scaled=True), size)


def simplejpeg_full_torch(data: bytes, size: int) -> np.ndarray:
    return resize_crop(*_simplejpeg(data, size, scaled=False), size)


def torchvision_torch(data: bytes, size: int) -> np.ndarray:
    import torchvision.io

    chw = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    h, w = chw.shape[1:]
    return resize_crop(chw.permute(1, 2, 0).numpy(), w, h, size)


CANDIDATES: dict[str, Decoder] = {
    "PIL full decode + PIL bicubic": pil_full,
    "PIL draft + PIL bicubic (today's loader)": pil_draft,
    "PIL draft + torch bicubic": pil_draft_torch,
    "simplejpeg DCT-scaled + PIL bicubic": simplejpeg_scaled_pil,
    "simplejpeg DCT-scaled + torch bicubic": simplejpeg_scaled_torch,
    "simplejpeg full + torch bicubic": simplejpeg_full_torch,
    "torchvision decode_jpeg + torch bicubic": torchvision_torch,
}
TODAY = "PIL draft + PIL bicubic (today's loader)"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse))


def images_per_cpu_s(fn: Decoder, jpegs: list[bytes], size: int) -> float:
    """One pass of the bare single-process loop of ``fn``."""
    c = time.process_time()
    for data in jpegs:
        fn(data, size)
    return len(jpegs) / (time.process_time() - c)


def compare_decoders(jpegs: list[bytes], size: int, repeats: int) -> dict[str, dict]:
    """Each candidate: images per CPU-second (median of ``repeats`` rounds, every candidate once
    per round: timed one after another, the machine's drift between minutes picked the winner)
    and its worst PSNR against full decode + bicubic."""
    refs = [pil_full(d, size) for d in jpegs]
    psnr = {
        name: min(_psnr(fn(d, size), r) for d, r in zip(jpegs, refs))
        for name, fn in CANDIDATES.items()
    }
    rounds = [
        {name: images_per_cpu_s(fn, jpegs, size) for name, fn in CANDIDATES.items()}
        for _ in range(repeats)
    ]
    return {
        name: {
            "images_per_cpu_s": float(np.median([r[name] for r in rounds])),
            "psnr_min_db": round(psnr[name], 1),
        }
        for name in CANDIDATES
    }


_NOOP_IMAGES: dict[int, np.ndarray] = {}


def noop_decode(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A decoder that decodes nothing: one reused black image. An epoch with it costs what the
    loader spends besides decoding with no decode between its samples (no cache or allocator
    traffic from the decoder): the floor of that part."""
    image = _NOOP_IMAGES.get(size)
    if image is None:
        image = _NOOP_IMAGES[size] = np.zeros((size, size, 3), np.uint8)
    return image, (640, 480)


def startup_cpu_s(cfg: DataConfig, tok, workers: int, decode) -> float:
    """CPU seconds besides decoding of an epoch that reads one sample per stream, decoding with
    ``decode``: what a loader epoch costs whatever its length (its workers' start, their first
    shuffle-buffer fill, their exit)."""
    run = pipeline(dataclasses.replace(cfg, resampled=True, epoch_samples=cfg.streams), tok,
                   workers, decode)  # fmt: skip
    return run["non_decode_ms_per_image"] * run["images"] / 1000


def pipeline(cfg: DataConfig, tok, workers: int, decode) -> dict:
    """Images per wall second and per CPU second (all processes) over one epoch of the training
    loader (``cfg.streams`` streams, global batch ``streams * batch_size``), start-up included,
    decoding with ``decode`` (a module-level function: the workers unpickle it). Images: those
    handed out plus the epoch's tail, which the loader decodes too (``epoch_tail``); the
    DataLoader workers that ran (the Loader lowers ``workers`` to a divisor of the streams);
    minor page faults per image; chunks handed over in a reused shared-memory buffer."""
    t, c, f = time.perf_counter(), _cpu(), _minor_faults()
    loader = make_loader(cfg, tok, rank=0, world_size=1, num_workers=workers,
                         global_batch_size=cfg.streams * cfg.batch_size)  # fmt: skip
    loader.dataset.image_decoder = timed = TimedDecoder(decode)
    n = sum(len(b["sample_id"]) for b in loader) + loader.skipped().get("epoch_tail", 0)
    cpu, decode_cpu = _cpu() - c, timed.cpu[0]
    pool = loader.dataset.pool
    return {
        "images_per_cpu_s": n / cpu,
        # item 3 of issue 18: what the loader spends besides decoding, per image and as a
        # fraction of the decode time, both from this epoch (start-up and workers included)
        "decode_ms_per_image": 1000 * decode_cpu / n,
        "non_decode_ms_per_image": 1000 * (cpu - decode_cpu) / n,
        "non_decode_fraction": (cpu - decode_cpu) / decode_cpu,
        # decoding's share of the loader's CPU, from one epoch: the ratio to a bare loop of the
        # same decoder, untouched by the machine's drift between the two passes
        "ratio_in_epoch": decode_cpu / cpu,
        "images_per_wall_s": n / (time.perf_counter() - t),
        "minor_faults_per_image": (_minor_faults() - f) / n,
        "reused_buffers": pool.reused if pool else 0,
        "images": n,
        "workers_used": loader.loader.num_workers,
    }


def stage_costs(cfg: DataConfig, tok, n: int = 1000) -> dict[str, float]:
    """CPU ms per image of each loader stage besides decoding, at 0 workers, each run alone: tar
    reading, grouping and the streams' shuffle over the whole epoch (over its first ``n`` samples
    alone the shuffle buffer's filling would count each sample read about twice), the rest on
    the first ``n`` samples."""
    ds = ShardDataset(cfg, tok, rank=0, world_size=1)
    c = time.process_time()
    total = sum(1 for _ in ds.raw_samples())
    tar = time.process_time() - c
    raw = list(itertools.islice(ds.raw_samples(), n))
    image = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    ds.image_decoder = lambda data, size: (image, (640, 480))
    c = time.process_time()
    items = [ds.decode(r) for r in raw]
    checks = time.process_time() - c
    c = time.process_time()
    for i in range(0, len(items), cfg.batch_size):
        ds.collate(items[i : i + cfg.batch_size])
    collate = time.process_time() - c
    ms = 1000 / len(raw)
    return {
        "tar_read_group_shuffle_ms": tar * 1000 / total,
        "checks_json_captions_nouns_ms": checks * ms,
        "collate_tokenise_spans_stack_ms": collate * ms,
    }


def grouping_costs(folder: Path, repeats: int) -> dict[str, float]:
    """CPU ms per sample of grouping the set's tar members (held in memory) into samples:
    bimac's ``group_members`` against webdataset's ``group_by_keys``, which it replaces."""
    members = []
    for url in sorted(str(p) for p in folder.glob("*.tar")):
        with open(url, "rb") as f:
            members += [m | {"__url__": url} for m in tar_members(f)] + [{}]
    out = {}
    for name, group in (
        ("bimac group_members", lambda: group_members(members, SkipCounter())),
        ("webdataset group_by_keys", lambda: wds.tariterators.group_by_keys(members)),
    ):
        best = math.inf
        for _ in range(repeats):
            c = time.process_time()
            n = sum(1 for _ in group())
            best = min(best, time.process_time() - c)
        out[name] = best * 1000 / n
    return out


def image_set(name: str, root: Path, n: int) -> Path:
    """The shard folder of ``name`` with ``n`` images, built unless already there."""
    out = root / f"{name}_{n}"
    if (out / "tokenizer.json").is_file():
        return out
    from shards import photos, world

    w, h = SETS[name]
    shard_size = min(500, -(-n // 6))  # at least 6 shards: 1, 2, 3 or 6 streams
    if name.startswith("world"):
        world.build(out, "train", n, w, seed=0, shard_size=shard_size)
    else:
        photos.build(out, n, w, h, seed=0, shard_size=shard_size)
    return out


def _jpegs(folder: Path) -> list[bytes]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            out += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    return out


def bench_set(name: str, folder: Path, a) -> dict:
    jpegs = _jpegs(folder)
    sample = jpegs[:: max(1, len(jpegs) // a.sample)][: a.sample]
    decoders = compare_decoders(sample, a.size, a.repeats)
    ok = {k: v for k, v in decoders.items() if v["psnr_min_db"] >= a.psnr}
    chosen = max(ok, key=lambda k: ok[k]["images_per_cpu_s"])
    tok = build_tokenizer(TokenizerConfig(path=str(folder / "tokenizer.json"), context_length=32))
    cfg = DataConfig(
        train_shards=f"{folder}/*.tar", image_size=a.size, batch_size=a.batch,
        shuffle_buffer=1000, streams=a.streams,
    )  # fmt: skip
    result = {
        "images": len(jpegs),
        "decoder": chosen,
        "decoders": decoders,
        "overhead_ms_per_image": stage_costs(cfg, tok),
        "grouping_ms_per_sample": grouping_costs(folder, a.repeats),
    }
    runs = {"loader": decode_image}
    if a.baseline:
        runs["today"] = today_decode
    ceilings = []
    for workers in (0, 1, 2):
        # Each loader epoch is timed right after a bare pass of the chosen path over the same
        # images, and the ratio taken within the pair: on a shared machine the CPU's speed
        # drifts by more than the loader's overhead between minutes (the ceiling alone moved
        # 33 % between two runs an hour apart). The row is the pair with the median ratio.
        pairs = []
        for _ in range(a.repeats):
            ceiling = images_per_cpu_s(CANDIDATES[chosen], jpegs, a.size)
            pair = {"ceiling_images_per_cpu_s": ceiling}
            for label, decode in runs.items():
                run = pipeline(cfg, tok, workers, decode)
                assert run["images"] == len(jpegs), (run["images"], len(jpegs))
                key = "" if label == "loader" else "today_"
                pair |= {f"{key}{k}": run[k] for k in ("images_per_cpu_s", "images_per_wall_s")}
                if label == "loader":
                    pair |= {k: run[k] for k in ("minor_faults_per_image", "reused_buffers", "workers_used", "decode_ms_per_image", "non_decode_ms_per_image", "non_decode_fraction", "ratio_in_epoch")}  # fmt: skip
                    # the same without the epoch's fixed start-up (measured apart, right after):
                    # what each sample costs besides its decode, which a longer epoch does not dilute
                    pair["startup_cpu_s"] = startup = startup_cpu_s(cfg, tok, workers, decode)
                    per_image = 1000 * startup / run["images"]
                    pair["per_sample_non_decode_fraction"] = (run["non_decode_ms_per_image"] - per_image) / run["decode_ms_per_image"]  # fmt: skip
                    # the same epoch with a decoder that does nothing, less its own start-up:
                    # the loader's floor per sample
                    noop = pipeline(cfg, tok, workers, noop_decode)
                    pair["noop_decoder_ms_per_image"] = noop["non_decode_ms_per_image"]
                    pair["noop_startup_cpu_s"] = noop_startup = startup_cpu_s(cfg, tok, workers, noop_decode)  # fmt: skip
                    pair["noop_decoder_per_sample_ms"] = noop["non_decode_ms_per_image"] - 1000 * noop_startup / noop["images"]  # fmt: skip
            pair["ratio"] = pair["images_per_cpu_s"] / ceiling
            if a.baseline:
                pair["speedup_vs_today"] = pair["images_per_cpu_s"] / pair["today_images_per_cpu_s"]
            pairs.append(pair)
            ceilings.append(ceiling)
        pairs.sort(key=lambda p: p["ratio"])
        result[str(workers)] = pairs[(len(pairs) - 1) // 2] | {
            "ratios": [p["ratio"] for p in pairs]
        }
    result["ceiling_images_per_cpu_s"] = float(np.median(ceilings))
    return result


def print_tables(results: dict, a) -> None:
    for name, r in results.items():
        print(f"\n### {name}: {r['images']} images -> uint8 {a.size} px\n")
        print("| decode path (bare loop) | images per CPU-s | min PSNR vs full + bicubic (dB) |")
        print("|---|---:|---:|")
        for k, v in r["decoders"].items():
            mark = " **(chosen)**" if k == r["decoder"] else ""
            print(f"| {k}{mark} | {v['images_per_cpu_s']:.0f} | {v['psnr_min_db']:.1f} |")
        print(f"\nceiling (chosen path, all images, median of the passes): {r['ceiling_images_per_cpu_s']:.0f}/CPU-s; "
              "loader stages besides decoding (ms/image): "
              + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in r["overhead_ms_per_image"].items()))  # fmt: skip
        print("grouping (ms/sample): " + ", ".join(f"{k} {v:.4f}" for k, v in r["grouping_ms_per_sample"].items()))  # fmt: skip
        print("\n| workers (used) | ceiling images per CPU-s (paired) | loader images per CPU-s | ratio (median; all pairs) | ratio in epoch | decode ms per image, in the loader | other loader ms per image (of decode) | epoch start-up CPU-s | other per sample, without start-up (of decode) | the same with a no-op decoder, ms | today's path | speedup | minor faults per image | reused buffers |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for w in ("0", "1", "2"):
            row = r[w]
            today = row.get("today_images_per_cpu_s", float("nan"))
            # ratios to three places: 0.898 printed as 0.90 would read as meeting the 0.9 target
            print(
                f"| {w} ({row['workers_used']}) | {row['ceiling_images_per_cpu_s']:.0f} | {row['images_per_cpu_s']:.0f} | "
                f"{row['ratio']:.3f} ({' / '.join(f'{x:.3f}' for x in row['ratios'])}) | {row['ratio_in_epoch']:.3f} | "
                f"{row['decode_ms_per_image']:.3f} | {row['non_decode_ms_per_image']:.3f} ({100 * row['non_decode_fraction']:.1f} %) | "
                f"{row['startup_cpu_s']:.2f} | {100 * row['per_sample_non_decode_fraction']:.1f} % | {row['noop_decoder_per_sample_ms']:.3f} | {today:.0f} | "
                f"{row.get('speedup_vs_today', float('nan')):.2f} | {row['minor_faults_per_image']:.1f} | {row['reused_buffers']} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=3000, help="images per set")
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated, of " + ",".join(SETS))
    p.add_argument("--size", type=int, default=224, help="tower input side")
    p.add_argument(
        "--repeats", type=int, default=3,
        help="decoders: median of this many interleaved rounds; loader rows: this many (ceiling, loader) pairs, median ratio",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=64, help="micro-batch = each stream's chunk")
    p.add_argument(
        "--streams",
        type=int,
        default=2,
        help="data.streams: the loader runs min(workers, a divisor of it) workers",
    )
    p.add_argument("--sample", type=int, default=200, help="images for the decoder comparison")
    p.add_argument("--psnr", type=float, default=40.0, help="quality bound of the chosen path")
    p.add_argument("--data", default="runs/bench/data_loader", help="where the sets are built")
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    names = [s for s in a.sets.split(",") if s]
    unknown = [s for s in names if s not in SETS]
    if unknown:
        p.error(f"--sets: unknown {unknown}; choose from {list(SETS)}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # as in a DataLoader worker; CPU time counts every thread anyway
    # The loader's fork server starts once per process (a fresh interpreter importing torch,
    # ~2.5 CPU-s here): a trainer pays it once per run, not per epoch, so it is warmed first.
    warm = worker_context().Process(target=int)
    warm.start()
    warm.join()
    results = {name: bench_set(name, image_set(name, Path(a.data), a.n), a) for name in names}
    load = os.getloadavg()
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "psnr_bound_db": a.psnr,
        "size": a.size,
        "batch_size": a.batch,
        "streams": a.streams,
        "repeats": a.repeats,
    }
    print(f"\n{meta['date']}, {meta['cpus']} CPUs, load average {load[0]:.1f} / {load[1]:.1f}")
    print_tables(results, a)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"meta": meta, **results}, indent=2))


if __name__ == "__main__":
    main()
