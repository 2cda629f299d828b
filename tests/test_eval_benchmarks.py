"""The benchmark formats (bimac.eval.benchmarks) on files the world writes (shards.world
--format): hand-computed scores on 4-item cases, the real commands, and CLIP_benchmark itself as
the referee of bimac's numbers on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_fixtures import SMALL, random_export, world_shards

from bimac.data.loader import SkipCounter
from bimac.data.samples import image_chw
from bimac.data.world import class_names, make_sample
from bimac.eval import benchmarks, classification, retrieval
from bimac.eval.common import Encoder
from shards.world import build_clip_benchmark, build_probe_benchmark

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def stub_encoder(images: list[bytes], image_vectors, text_vector) -> Encoder:
    """Embeddings chosen by hand: world image ``k`` (identified by its pixels) -> row ``k`` of
    ``image_vectors``; a text -> ``text_vector(text)``."""
    index = {image_chw(b, 64).tobytes(): k for k, b in enumerate(images)}

    def embed_images(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([image_vectors[index[img.numpy().tobytes()]] for img in x])

    return Encoder(
        images=embed_images,
        texts=lambda ts: torch.stack([text_vector(t) for t in ts]),
        image_size=64,
        name="stub",
    )


# -- image/caption selection formats: the probe split's 2 pairs (4 images, 4 captions) ----------

# S[k, j] = s(image k, caption j); pair 0 = images/captions 0, 1 (attribute swap), pair 1 = 2, 3
# (relation swap). Pair 0 is right every way; in pair 1 image 2 picks its caption (0.7 > 0.6),
# image 3 does not (0.3 < 0.8), and neither caption picks its image (0.7 < 0.8, 0.3 < 0.6).
S = torch.tensor(
    [[0.9, 0.1, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 0.7, 0.6], [0.0, 0.0, 0.8, 0.3]]
)
# format -> {subset: expected scores}
EXPECTED = {
    # one test per image (its caption vs the other member's): pair 0: 2/2, pair 1: 1/2
    "sugarcrepe": {
        "swap_att": {"text_acc": 100.0, "image_acc": 100.0, "acc": 100.0, "tests": 2},
        "replace_rel": {"text_acc": 50.0, "image_acc": 100.0, "acc": 50.0, "tests": 2},
    },
    "valse": {
        "attributes": {"text_acc": 100.0, "image_acc": 100.0, "acc": 100.0, "tests": 2},
        "relations": {"text_acc": 50.0, "image_acc": 100.0, "acc": 50.0, "tests": 2},
    },
    # one test per pair: text score needs both images right, image score both captions
    "winoground": {"winoground": {"text_acc": 50.0, "image_acc": 50.0, "acc": 50.0, "tests": 2}},
    # image2text as SugarCrepe; text2image: captions 0, 1 find their image, 2, 3 do not
    "spec": {
        "attribute": {"text_acc": 100.0, "image_acc": 100.0, "tests": 4},
        "relative_position": {"text_acc": 50.0, "image_acc": 0.0, "tests": 4},
    },
}


def probe_stub() -> Encoder:
    samples = [make_sample(0, "probe", i, 64) for i in range(4)]
    captions = [s["json"]["captions_en"][0] for s in samples]
    return stub_encoder(
        [s["jpg"] for s in samples], torch.eye(4), lambda t: S[:, captions.index(t)]
    )


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_selection_formats_score_world_files_as_computed_by_hand(tmp_path, fmt):
    build_probe_benchmark(tmp_path, fmt, 4)
    subsets = benchmarks.READERS[fmt](tmp_path)
    assert benchmarks.evaluate_selection(probe_stub(), subsets) == EXPECTED[fmt]


def test_winoground_scores_are_the_selection_scores():
    from bimac.eval.probe import winoground_scores

    sim = torch.stack([S[2 * n : 2 * n + 2, 2 * n : 2 * n + 2].T for n in range(2)])  # [n, c, i]
    assert winoground_scores(sim) == {"text_score": 50.0, "image_score": 50.0, "group_score": 50.0}


def test_valse_scores_only_validated_foils(tmp_path):
    build_probe_benchmark(tmp_path, "valse", 4)
    path = tmp_path / "relations.json"
    data = json.loads(path.read_text())
    data[next(k for k, v in data.items() if v["image_file"].endswith("_1.jpg"))]["mturk"] = {
        "caption": 1,
        "foil": 2,
        "other": 0,
    }
    path.write_text(json.dumps(data))
    scores = benchmarks.evaluate_selection(probe_stub(), benchmarks.read_valse(tmp_path))
    # image 3's test (the wrong one) is left out: 1/1 right
    assert scores["relations"] == {
        "text_acc": 100.0,
        "image_acc": 100.0,
        "acc": 100.0,
        "tests": 1,
        "excluded": 1,
    }


# -- CLIP_benchmark's webdataset layout ---------------------------------------------------------


def test_clip_benchmark_retrieval_scored_as_computed_by_hand(tmp_path):
    build_clip_benchmark(tmp_path, "retrieval", 4, shard_size=3)  # 2 shards: 0.tar, 1.tar
    assert (tmp_path / "test" / "nshards.txt").read_text().strip() == "2"
    ds = benchmarks.read_clip_benchmark(tmp_path)
    images, captions = benchmarks.clip_benchmark_pairs(ds, SkipCounter())
    assert ds.kind == "retrieval" and [len(c) for c in captions] == [5, 5, 5, 5]
    # V[k, j] = s(image k, any caption of image j), caption i of an image scaled by 1 - i/100 so
    # no two captions tie. i2t: image 2 ranks image 0's 5 captions above its own (0.5 > 0.4):
    # R@1, R@5 miss, R@10 hit. t2i: image 2's captions rank image 3 first (0.45 > 0.4).
    V = torch.tensor(
        [[0.9, 0.1, 0.2, 0.3], [0.2, 0.8, 0.1, 0.4], [0.5, 0.3, 0.4, 0.1], [0.1, 0.2, 0.45, 0.7]]
    )
    owner = {c: (j, i) for j, caps in enumerate(captions) for i, c in enumerate(caps)}

    def text_vector(t):
        j, i = owner[t]
        return V[:, j] * (1 - i / 100)

    r = retrieval.evaluate(stub_encoder(images, torch.eye(4), text_vector), images, captions)
    assert (r["i2t_R@1"], r["i2t_R@5"], r["i2t_R@10"]) == (75.0, 75.0, 100.0)
    assert (r["t2i_R@1"], r["t2i_R@5"], r["t2i_R@10"]) == (75.0, 100.0, 100.0)
    assert benchmarks.retrieval_result_metrics(r) == {
        "image_retrieval_recall@1": 0.75,
        "text_retrieval_recall@1": 0.75,
        "image_retrieval_recall@5": 1.0,
        "text_retrieval_recall@5": 0.75,
        "image_retrieval_recall@10": 1.0,
        "text_retrieval_recall@10": 1.0,
    }


def test_clip_benchmark_classification_scored_as_computed_by_hand(tmp_path):
    build_clip_benchmark(tmp_path, "cls_shape", 4)
    ds = benchmarks.read_clip_benchmark(tmp_path)
    assert ds.kind == "classification" and ds.classnames == class_names("cls_shape")
    assert all("{}" in t and "{c}" not in t for t in ds.templates)  # CLIP_benchmark's {c}
    images, labels = classification.shard_items(ds.shards)
    assert labels == [0, 2, 9, 8]  # the world's first four shapes, four classes
    # texts: one-hot of the class named in the prompt; images: hand-set logits. Images 0-2 put
    # their class first; image 3 (class 8) ranks classes 1, 3, 4 above it (rank 4: top-5 hit).
    logits = torch.zeros(4, 10)
    logits[0, 0], logits[1, 2], logits[2, 9] = 1.0, 1.0, 1.0
    logits[3, [1, 3, 4, 8]] = torch.tensor([0.9, 0.8, 0.7, 0.5])

    def text_vector(t):
        return torch.eye(10)[next(c for c, n in enumerate(ds.classnames) if f" {n}." in t)]

    enc = stub_encoder(images, logits, text_vector)
    c = classification.evaluate(enc, images, labels, ds.classnames, ds.templates)
    assert (c["top1"], c["top5"], c["mean_per_class_recall"]) == (75.0, 100.0, 75.0)
    assert benchmarks.classification_result_metrics(c) == {
        "acc1": 0.75,
        "acc5": 1.0,
        "mean_per_class_recall": 0.75,
    }


def test_missing_format_files_name_the_file(tmp_path):
    with pytest.raises(benchmarks.FormatError, match="nshards.txt"):
        benchmarks.read_clip_benchmark(tmp_path)
    with pytest.raises(benchmarks.FormatError, match="swap_att"):
        benchmarks.read_sugarcrepe(tmp_path)
    with pytest.raises(benchmarks.FormatError, match="examples.jsonl"):
        benchmarks.read_winoground(tmp_path)
    (tmp_path / "add_obj.json").write_text('{"0": {"filename": "a.jpg", "caption": "x"}}')
    with pytest.raises(benchmarks.FormatError, match="negative_caption"):
        benchmarks.read_sugarcrepe(tmp_path)


# -- the real commands ----------------------------------------------------------------------------


def run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *argv], env=ENV, cwd=kw.pop("cwd", ROOT), capture_output=True,
        text=True, timeout=600, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    _, tok = world_shards(root / "world", n=8)
    return random_export(root / "export", tok, SMALL)


@pytest.mark.slow
def test_eval_probe_formats_write_clip_benchmark_json(export, tmp_path):
    data = tmp_path / "sugarcrepe"
    assert run("shards.world", "--out", data, "--split", "probe", "--n", "8",
               "--format", "sugarcrepe").returncode == 0  # fmt: skip
    out = tmp_path / "res" / "{dataset}.json"
    p = run("cli", "eval", "probe", "--checkpoint", export, "--format", "sugarcrepe",
            "--data", data, "--out", out)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "| swap_att |" in p.stdout and "| replace_rel |" in p.stdout
    for task in ("swap_att", "replace_rel"):
        result = json.loads((tmp_path / "res" / f"sugar_crepe_{task}.json").read_text())
        assert set(result) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert result["dataset"] == f"sugar_crepe/{task}"
        assert result["task"] == "image_caption_selection"
        assert set(result["metrics"]) == {"text_acc", "image_acc", "acc"}
    bad = run("cli", "eval", "probe", "--checkpoint", export, "--format", "winoground",
              "--data", tmp_path / "nowhere")  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith("nowhere/examples.jsonl: missing; "
                                                         "Winoground's layout is examples.jsonl "
                                                         "+ images/")  # fmt: skip


@pytest.mark.slow
def test_eval_retrieval_skips_and_counts_a_truncated_shard(export, tmp_path):
    import webdataset as wds

    from shards.world import build

    tars = build(tmp_path / "shards", "retrieval", 12, size=32, shard_size=6)
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 2])  # cut inside the second shard
    with wds.TarWriter(str(tmp_path / "shards" / "00002.tar")) as tar:  # one image cut short
        from bimac.data.world import make_sample

        s = make_sample(0, "retrieval", 99, 32)
        tar.write({"__key__": "cut", "jpg": s["jpg"][: len(s["jpg"]) // 2], "txt": s["txt"]})
        tar.write({"__key__": "whole", "jpg": s["jpg"], "txt": s["txt"]})
    out = tmp_path / "r.json"
    p = run("cli", "eval", "retrieval", "--checkpoint", export, "--data",
            f"{tmp_path}/shards/{{00000..00002}}.tar", "--out", out)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "truncated_tar" in p.stderr
    r = json.loads(out.read_text())
    assert r["skipped_by_reason"]["truncated_tar"] == 1
    assert (
        r["skipped_by_reason"]["bad_image"] == 1
    )  # the cut image; its shard's other sample is used
    assert 7 <= r["images"] < 13  # the first shard whole, the second's complete samples, "whole"


# -- CLIP_benchmark as the referee ----------------------------------------------------------------

# clip-benchmark 1.6.2's zero-shot accuracy does float() of a 1-element array, which NumPy >= 2.4
# refuses (LAION-AI/CLIP_benchmark#147); the launcher swaps in the same top-k count (.item())
# only when the package's own function fails, and leaves everything else to the package.
LAUNCHER = """
import sys, torch
from clip_benchmark import cli
from clip_benchmark.metrics import zeroshot_classification as zc
try:
    zc.accuracy(torch.eye(5), torch.arange(5), topk=(1,))
except TypeError:
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        hit = pred.eq(target.view(1, -1).expand_as(pred))
        return [hit[:k].float().sum().item() / len(target) for k in topk]
    zc.accuracy = accuracy
sys.argv[0] = "clip_benchmark"
sys.exit(cli.main())
"""


@pytest.mark.slow
def test_clip_benchmark_agrees_with_bimac_eval_on_an_export(export, tmp_path):
    pytest.importorskip("clip_benchmark", reason="pip install clip-benchmark==1.6.2 (dev extra)")
    oc = tmp_path / "oc"
    assert run("cli", "export", "--checkpoint", export, "--to-open-clip", oc).returncode == 0
    data = tmp_path / "data"
    for name, split in (("world_retrieval", "retrieval"), ("world_shape", "cls_shape")):
        p = run("shards.world", "--out", data / name, "--split", split, "--n", "40",
                "--size", "32", "--format", "clip_benchmark", "--shard-size", "16")  # fmt: skip
        assert p.returncode == 0, p.stderr
    for name, task, cmd in (
        ("world_retrieval", "zeroshot_retrieval", "retrieval"),
        ("world_shape", "zeroshot_classification", "classification"),
    ):
        ref = subprocess.run(
            [sys.executable, "-c", LAUNCHER, "eval", "--dataset", f"wds/{name}",
             "--dataset_root", str(data / name), "--model", f"local-dir:{oc}",
             "--pretrained", "none", "--task", task, "--recall_k", "1", "5", "10", "--no_amp",
             "--num_workers", "0", "--batch_size", "16", "--output", str(tmp_path / "ref.json")],
            env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert ref.returncode == 0, ref.stderr[-2000:]
        ours = run("cli", "eval", cmd, "--checkpoint", export, "--format",
                   "clip_benchmark", "--data", data / name, "--out", tmp_path / "ours.json")  # fmt: skip
        assert ours.returncode == 0, ours.stderr
        theirs = json.loads((tmp_path / "ref.json").read_text())["metrics"]
        mine = json.loads((tmp_path / "ours.json").read_text())["metrics"]
        assert set(theirs) == set(mine), (theirs, mine)
        for key, value in theirs.items():  # 0.01 percentage points
            assert 100 * mine[key] == pytest.approx(100 * value, abs=0.01), key


def test_evaluation_reader_skips_and_counts_a_broken_image(tmp_path):
    """bimac.data.samples.iter_samples (every evaluation's shard reader): an image cut short and
    bytes that are no image are skipped and counted as bad_image; the good sample comes through."""
    import webdataset as wds

    from bimac.data.loader import SkipCounter
    from bimac.data.samples import iter_samples
    from bimac.data.world import make_sample

    s = make_sample(0, "retrieval", 0, 64)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as tar:
        tar.write({"__key__": "cut", "jpg": s["jpg"][: len(s["jpg"]) // 2], "txt": "a"})
        tar.write({"__key__": "noise", "jpg": b"not an image at all", "txt": "b"})
        tar.write({"__key__": "whole", "jpg": s["jpg"], "txt": "c"})
    counter = SkipCounter()
    got = list(iter_samples(str(tmp_path / "00000.tar"), counter=counter))
    assert [x["__key__"] for x in got] == ["whole"] and got[0]["jpg"] == s["jpg"]
    assert counter.as_dict() == {"bad_image": 2}
