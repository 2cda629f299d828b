"""Bengali corpus pipeline end to end with tiny random-weight models (no downloads).

translate (tiny MarianMT) -> verify (tiny BERT sentence-transformer) -> merge -> synthesise (tiny
Kandinsky 2.1 prior + decoder) -> pack, each through its ``main`` and the real loading code; then
regeneration from a sidecar, and the world source. (Each stage killed with SIGKILL and rerun:
``tests/test_shards_sigkill.py``.)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import defaultdict

import numpy as np
import pytest
import torch
from bengali_fixtures import coco_json, corpus, tiny_kandinsky, tiny_labse, tiny_marian
from PIL import Image

from shards.bengali import pack, synthesise, translate, verify
from shards.bengali.resumable import read_csv

TRIPLET_FILES = {"jpg", "syn.jpg", "txt", "en.txt", "bn.txt", "json"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the decoder's UNet is ~20x slower on a shared 2-core machine with the default thread pool
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    prior, decoder = tiny_kandinsky(root / "kandinsky")
    return {
        "marian": tiny_marian(root / "marian"),
        "labse": tiny_labse(root / "labse"),
        "prior": prior,
        "decoder": decoder,
    }


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    en, _ = corpus()
    texts = en[:8] + ["   ", " ".join(["very long caption"] * 60)]  # 8 good, 1 empty, 1 too long
    return coco_json(tmp_path_factory.mktemp("coco") / "captions.json", texts)


def _translate_args(models, captions, out):
    return [
        "--captions",
        str(captions),
        "--out",
        str(out),
        f"model={models['marian']}",
        "batch_size=3",
        "num_shards=2",
        "max_new_tokens=12",
    ]


def _synth_args(models, accepted, out):
    return [
        "--accepted",
        str(accepted),
        "--out",
        str(out),
        f"prior_model={models['prior']}",
        f"decoder_model={models['decoder']}",
        "height=64",
        "width=64",
        "prior_steps=2",
        "decoder_steps=2",
        "num_shards=2",
        "batch_size=2",
    ]


@pytest.fixture(scope="module")
def run(models, captions, tmp_path_factory):
    """The four stages once, through their command-line entry points."""
    root = tmp_path_factory.mktemp("run")
    translate.main(_translate_args(models, captions, root / "tr"))
    # tau between two of the pairs' similarities, computed here independently with the model
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(models["labse"]), device="cpu")
    pairs = [r for i in (0, 1) for r in read_csv(root / "tr" / f"shard_{i:05d}.csv") if r["bn"]]
    ref = {
        r["caption_id"]: float(s)
        for r, s in zip(
            pairs,
            st.similarity_pairwise(
                st.encode([r["en"] for r in pairs]), st.encode([r["bn"] for r in pairs])
            ),
        )
    }
    ordered = sorted(set(ref.values()))
    tau = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    verify_args = [
        "--translated",
        str(root / "tr"),
        "--out",
        str(root / "ver"),
        f"model={models['labse']}",
        f"tau={tau}",
        "batch_size=4",
    ]
    verify.main(verify_args)
    verify.main([*verify_args, "--merge"])
    synthesise.main(_synth_args(models, root / "ver" / "accepted.csv", root / "syn"))
    images = root / "coco_images"
    images.mkdir()
    rows = read_csv(root / "syn" / "shard_00000.csv") + read_csv(root / "syn" / "shard_00001.csv")
    image_ids = sorted({int(r["image_id"]) for r in rows})
    for i in image_ids:
        Image.new("RGB", (40, 30), (i * 40 % 255, 90, 160)).save(
            images / f"COCO_train2014_{i:012d}.jpg"
        )
    bad_id = image_ids[0]  # one real image that does not decode
    (images / f"COCO_train2014_{bad_id:012d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    pack_args = [
        "--synthetic",
        str(root / "syn"),
        "--images",
        str(images),
        "--out",
        str(root / "packed"),
        "shard_size=3",
    ]
    summary = pack.main(pack_args)
    return {
        "root": root,
        "tau": tau,
        "ref": ref,
        "bad_id": bad_id,
        "pack": summary,
        "verify_args": verify_args,
        "pack_args": pack_args,
    }


def test_translate_writes_en_and_bn_and_counts_bad_captions(run):
    root = run["root"] / "tr"
    rows = read_csv(root / "shard_00000.csv") + read_csv(root / "shard_00001.csv")
    assert list(rows[0]) == ["caption_id", "image_id", "en", "bn"]
    assert [int(r["caption_id"]) for r in rows] == list(range(100, 108))  # order kept, no dups
    assert all(r["bn"] == " ".join(r["bn"].split()) for r in rows)
    s0, s1 = (json.loads((root / f"shard_{i:05d}.summary.json").read_text()) for i in (0, 1))
    assert (s0["input"], s0["kept"], s0["rejected"]) == (5, 5, {})
    assert (s1["input"], s1["kept"], s1["rejected"]) == (5, 3, {"empty": 1, "too_long": 1})
    rejects = read_csv(root / "shard_00001.rejects.csv")
    assert sorted(r["reason"] for r in rejects) == ["empty", "too_long"]


def test_translate_rerun_does_nothing(run, models, captions, caplog):
    before = (run["root"] / "tr" / "shard_00001.csv").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert translate.main(_translate_args(models, captions, run["root"] / "tr")) == []
    assert "already finished; nothing to do" in caplog.text
    assert (run["root"] / "tr" / "shard_00001.csv").stat().st_mtime_ns == before


def test_verify_scores_with_the_model_and_keeps_pairs_at_or_above_tau(run):
    root = run["root"] / "ver"
    scored = read_csv(root / "shard_00000.csv") + read_csv(root / "shard_00001.csv")
    assert list(scored[0]) == verify.FIELDS
    for r in scored:  # reference: sentence-transformers' own pairwise cosine, float32
        assert float(r["similarity"]) == pytest.approx(run["ref"][r["caption_id"]], abs=1e-5)
        assert (r["valid"] == "True") == (run["ref"][r["caption_id"]] >= run["tau"])
    accepted = read_csv(root / "accepted.csv")
    assert {r["caption_id"] for r in accepted} == {
        k for k, s in run["ref"].items() if s >= run["tau"]
    }
    report = json.loads((root / "report.json").read_text())
    assert report["accepted"] == len(accepted) > 0 and report["below_tau"] > 0
    assert (root / "similarity_hist.png").stat().st_size > 0


def test_synthesise_sidecars_hash_the_prompt_within_the_token_limit(run, models):
    root = run["root"] / "syn"
    accepted = read_csv(run["root"] / "ver" / "accepted.csv")
    rows = read_csv(root / "shard_00000.csv") + read_csv(root / "shard_00001.csv")
    assert [r["caption_id"] for r in rows] == [r["caption_id"] for r in accepted]
    cfg = synthesise.SynthesiseConfig(
        prior_model=str(models["prior"]), decoder_model=str(models["decoder"])
    )
    synth = synthesise.KandinskySynthesiser(cfg)
    for r in rows:
        side = json.loads((root / r["sidecar"]).read_text())
        image = (root / r["image"]).read_bytes()
        assert side["prompt_sha256"] == hashlib.sha256(side["prompt"].encode()).hexdigest()
        assert side["image_sha256"] == hashlib.sha256(image).hexdigest()
        assert side["prompt"].startswith("A photo of: ") and ". In Bengali: " in side["prompt"]
        assert synth.count_tokens(side["prompt"]) <= 77
        assert side["seed"] == 42 and side["negative_prompt"] == synthesise.NEGATIVE_PROMPT
        assert side["prior_model"]["name"] == str(models["prior"])
        assert side["versions"]["diffusers"] and side["dtype"] == "float32"
        with Image.open(io.BytesIO(image)) as img:
            assert img.size == (64, 64)


def test_regenerating_from_a_sidecar_gives_the_same_image(run, models):
    root = run["root"] / "syn"
    row = read_csv(root / "shard_00001.csv")[-1]
    side = json.loads((root / row["sidecar"]).read_text())
    cfg = synthesise.SynthesiseConfig(
        prior_model=str(models["prior"]), decoder_model=str(models["decoder"])
    )
    data = synthesise.regenerate(side, synthesise.KandinskySynthesiser(cfg))
    assert data == (root / row["image"]).read_bytes()
    with pytest.raises(ValueError, match="SHA-256"):
        synthesise.regenerate({**side, "prompt": side["prompt"] + "!"}, None)


def test_pack_writes_triplets_and_counts_undecodable_images(run, caplog):
    root = run["root"] / "packed"
    syn_rows = read_csv(run["root"] / "syn" / "shard_00000.csv") + read_csv(
        run["root"] / "syn" / "shard_00001.csv"
    )
    bad = [r for r in syn_rows if int(r["image_id"]) == run["bad_id"]]
    members = defaultdict(set)
    for tar in sorted(root.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for name in tf.getnames():
                key, ext = name.split(".", 1)
                members[key].add(ext)
            for name in tf.getnames():
                if name.endswith(".json"):
                    meta = json.loads(tf.extractfile(name).read())
                    key = name.split(".")[0]
                    assert (
                        meta["prompt_sha256"] == hashlib.sha256(meta["prompt"].encode()).hexdigest()
                    )
                    bn = tf.extractfile(f"{key}.bn.txt").read().decode()
                    assert meta["captions_bn"] == [bn]
                    with Image.open(io.BytesIO(tf.extractfile(f"{key}.jpg").read())) as img:
                        assert (img.size, meta["width"]) == ((40, 30), 40)
    assert set(members) == {r["key"] for r in syn_rows} - {r["key"] for r in bad}
    assert all(exts == TRIPLET_FILES for exts in members.values())
    stats = [json.loads(p.read_text()) for p in sorted(root.glob("*_stats.json"))]
    assert len(stats) == (len(syn_rows) + 2) // 3
    assert sum(s["status_dict"].get("undecodable_real", 0) for s in stats) == len(bad) > 0
    assert sum(s["successes"] for s in stats) == len(members)
    with caplog.at_level(logging.INFO):
        again = pack.main(run["pack_args"])
    assert again["already_finished"] == again["shards"] and "nothing to do" in caplog.text


def test_pack_from_world_needs_no_model(tmp_path, caplog):
    out = tmp_path / "world"
    summary = pack.main(["--from-world", "--n", "5", "--out", str(out), "shard_size=2"])
    assert summary == {"shards": 3, "already_finished": 0, "status": {"success": 5}}
    keys = defaultdict(set)
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for name in tf.getnames():
                key, ext = name.split(".", 1)
                keys[key].add(ext)
            meta = json.loads(tf.extractfile(f"{key}.json").read())
            en = tf.extractfile(f"{key}.en.txt").read().decode()
            bn = tf.extractfile(f"{key}.bn.txt").read().decode()
            assert meta["prompt"] == synthesise.build_prompt(en, bn)
            assert meta["prompt_sha256"] == hashlib.sha256(meta["prompt"].encode()).hexdigest()
            syn = np.asarray(Image.open(io.BytesIO(tf.extractfile(f"{key}.syn.jpg").read())))
            real = np.asarray(Image.open(io.BytesIO(tf.extractfile(f"{key}.jpg").read())))
            assert syn.shape == real.shape and not np.array_equal(syn, real)
    assert len(keys) == 5 and all(exts == TRIPLET_FILES for exts in keys.values())
    with caplog.at_level(logging.INFO):
        again = pack.main(["--from-world", "--n", "5", "--out", str(out), "shard_size=2"])
    assert again["already_finished"] == 3 and "nothing to do" in caplog.text
