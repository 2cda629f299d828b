"""Bengali corpus pipeline, model-free parts: truncation, the LaBSE filter, resumable shards, CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from bengali_fixtures import byte_clip_tokenizer
from PIL import Image

from bimac.config import load_config, parse_cli
from bimac.data.writer import partial_path
from shards.bengali import verify
from shards.bengali.pack import PackConfig
from shards.bengali.resumable import ShardRun, read_csv, shard_bounds
from shards.bengali.synthesise import (
    BN_STOPWORDS,
    EN_STOPWORDS,
    _version,
    build_prompt,
    sample_key,
    truncate_pair,
)


def count_words(text: str) -> int:
    """A tokenizer with one token per whitespace word plus BOS and EOS."""
    return len(text.split()) + 2


# --- truncation ---------------------------------------------------------------------------------


def test_truncation_drops_function_words_from_the_end_first():
    en_content = [f"thing{i}" for i in range(25)]
    bn_content = [f"বস্তু{i}" for i in range(25)]
    en = " ".join(w for c in en_content for w in (c, "the"))  # 50 words, 25 of them "the"
    bn = " ".join(w for c in bn_content for w in (c, "এবং"))
    out_en, out_bn = truncate_pair(en, bn, count_words, max_tokens=77, en_tokens=37)
    # Hand count: the prompt is 5 template words + EN + BN + 2 specials <= 77, so EN + BN <= 70;
    # a word leaves the side further over its share (EN: words + 2 specials - 37, BN: - 40), a
    # tie costs EN a word; the overs fall in step from (15, 12) and the loop stops right after an
    # EN drop, at EN 33 (2 under) + BN 37 (1 under) = 70.
    assert count_words(build_prompt(out_en, out_bn)) == 77
    assert len(out_en.split()) == 33 and len(out_bn.split()) == 37
    # every content word survives; the function words removed are the last 17 (EN) and 13 (BN)
    assert out_en.split() == [
        w for i, c in enumerate(en_content) for w in (c, "the")[: 1 + (i < 8)]
    ]
    assert out_bn.split() == [
        w for i, c in enumerate(bn_content) for w in (c, "এবং")[: 1 + (i < 12)]
    ]


def test_truncation_gives_unused_share_to_the_other_language():
    en = " ".join(f"thing{i}" for i in range(80))
    out_en, out_bn = truncate_pair(en, "লাল বৃত্ত", count_words)
    assert out_bn == "লাল বৃত্ত"
    assert out_en.split() == en.split()[:68]  # 70 words of room, 2 used by Bengali
    assert truncate_pair("a red cat", "লাল বিড়াল", count_words) == ("a red cat", "লাল বিড়াল")


def test_truncation_with_a_clip_tokenizer_keeps_content_words_of_both_languages():
    tok = byte_clip_tokenizer()  # one token per UTF-8 byte: Bengali costs 3 tokens a character

    def n_tokens(text: str) -> int:
        return len(tok(text).input_ids)

    en = (
        "A large brown dog with a red collar is running across the green grass in the park "
        "while two children in blue jackets are watching it from a wooden bench near the lake"
    )
    bn = (
        "একটি লাল কলার সহ একটি বড় বাদামী কুকুর পার্কে সবুজ ঘাসের উপর দিয়ে দৌড়াচ্ছে এবং "
        "নীল জ্যাকেট পরা দুটি শিশু হ্রদের কাছে একটি কাঠের বেঞ্চ থেকে এটি দেখছে"
    )
    assert n_tokens(build_prompt(en, bn)) > 77
    out_en, out_bn = truncate_pair(en, bn, n_tokens)
    assert n_tokens(build_prompt(out_en, out_bn)) <= 77
    assert out_en and out_bn
    for full, short, stop in ((en, out_en, EN_STOPWORDS), (bn, out_bn, BN_STOPWORDS)):
        words = iter(full.split())
        assert all(w in words for w in short.split())  # an in-order subsequence, words whole
        kept_stop = [w for w in short.split() if w.lower() in stop]
        dropped_content = [w for w in full.split() if w not in short.split() and w not in stop]
        assert not (kept_stop and dropped_content), (short, kept_stop, dropped_content)
    assert out_en.split()[:2] == ["large", "brown"]  # "A" was a function word; content stays
    assert "কুকুর" not in out_bn or "লাল" in out_bn


def test_truncation_refuses_a_template_over_the_limit():
    with pytest.raises(ValueError, match="template alone"):
        truncate_pair("cat", "বিড়াল", count_words, max_tokens=4)


def test_sample_key_has_no_dots():
    assert sample_key(123) == "000000000123"
    assert sample_key("a.b/c") == "a_b_c"


# --- the LaBSE filter with a stub embedder ------------------------------------------------------

# cosines with exact binary fractions' neighbours: EN -> (1, 0), BN -> (a, b) of a Pythagorean
# triple, so cos = a / c exactly as a float division.
TRIPLES = [(7, 24, 25), (5, 12, 13), (8, 15, 17), (3, 4, 5), (20, 21, 29), (4, 3, 5), (12, 5, 13)]


def _translated_shard(root, index, rows):
    run = ShardRun(root, "translate", index, ["caption_id", "image_id", "en", "bn"])
    run.run(rows, 4, lambda _: None, lambda items: items)


def _stub_embedder(vectors):
    def embed(texts):
        if "boom" in texts:
            raise RuntimeError("the model fell over")
        return np.array([vectors[t] for t in texts], dtype=np.float32)

    return embed


def test_filter_keeps_exactly_the_pairs_at_or_above_tau(tmp_path, caplog):
    vectors, rows = {}, []
    for i, (a, b, _) in enumerate(TRIPLES):
        en, bn = f"caption {i}", f"বাক্য {i}"
        vectors[en], vectors[bn] = (1.0, 0.0), (float(a), float(b))
        rows.append({"caption_id": i, "image_id": i, "en": en, "bn": bn})
    rows.append({"caption_id": 90, "image_id": 9, "en": "caption x", "bn": " "})  # empty BN
    _translated_shard(tmp_path / "tr", 0, rows[:4])
    _translated_shard(tmp_path / "tr", 1, rows[4:])
    cfg = verify.VerifyConfig(
        translated=tmp_path / "tr", out=tmp_path / "ver", tau=0.6, batch_size=3
    )
    for i in (0, 1):
        verify.verify_shard(_stub_embedder(vectors), cfg, i)
    report = verify.merge(cfg)

    expected = {i: a / c for i, (a, b, c) in enumerate(TRIPLES)}  # 0.28 .. 0.923, 3/5 == tau
    accepted = read_csv(tmp_path / "ver" / "accepted.csv")
    assert sorted(int(r["caption_id"]) for r in accepted) == [
        i for i, s in expected.items() if s >= 0.6
    ]
    assert 3 in {int(r["caption_id"]) for r in accepted}  # exactly at tau is kept
    scored = read_csv(tmp_path / "ver" / "shard_00000.csv") + read_csv(
        tmp_path / "ver" / "shard_00001.csv"
    )
    for r in scored:
        assert float(r["similarity"]) == pytest.approx(expected[int(r["caption_id"])], abs=1e-7)
        assert (r["valid"] == "True") == (expected[int(r["caption_id"])] >= 0.6)
    assert report["scored"] == 7 and report["accepted"] == 4 and report["below_tau"] == 3
    assert report["per_shard"]["1"]["rejected"] == {"empty": 1}
    assert sum(report["histogram"]["counts"]) == 7
    with Image.open(tmp_path / "ver" / "similarity_hist.png") as img:
        assert img.format == "PNG"
    with caplog.at_level(logging.INFO):
        verify.merge(cfg)
    assert "nothing to do" in caplog.text


def test_filter_skips_a_failing_batch_and_counts_it(tmp_path, caplog):
    rows = [
        {"caption_id": i, "image_id": 0, "en": f"c{i}", "bn": "boom" if i == 4 else f"ব{i}"}
        for i in range(6)
    ]
    vectors = {f"c{i}": (1.0, 0.0) for i in range(6)} | {f"ব{i}": (3.0, 4.0) for i in range(6)}
    _translated_shard(tmp_path / "tr", 0, rows)
    cfg = verify.VerifyConfig(translated=tmp_path / "tr", out=tmp_path / "ver", batch_size=2)
    summary = verify.verify_shard(_stub_embedder(vectors), cfg, 0)
    assert summary["failed_batches"] == 1 and summary["rejected"] == {"model_error": 2}
    assert [int(r["caption_id"]) for r in read_csv(tmp_path / "ver" / "shard_00000.csv")] == [
        0, 1, 2, 3]  # fmt: skip
    rejects = read_csv(tmp_path / "ver" / "shard_00000.rejects.csv")
    assert [(r["caption_id"], r["reason"]) for r in rejects] == [
        ("4", "model_error"),
        ("5", "model_error"),
    ]
    with caplog.at_level(logging.INFO):
        again = verify.verify_shard(_stub_embedder({}), cfg, 0)  # would fail if it ran
    assert again == summary and "nothing to do" in caplog.text


def test_merge_refuses_unverified_shards(tmp_path):
    _translated_shard(tmp_path / "tr", 0, [{"caption_id": 1, "image_id": 1, "en": "a", "bn": "ক"}])
    cfg = verify.VerifyConfig(translated=tmp_path / "tr", out=tmp_path / "ver")
    with pytest.raises(FileNotFoundError, match="not verified"):
        verify.merge(cfg)


# --- resumable shards ---------------------------------------------------------------------------


def _numbers(n):
    return [{"i": i, "text": "" if i == 5 else f"t{i}"} for i in range(n)]


def _check(item):
    return "empty" if not item["text"] else None


def test_shard_run_killed_midway_resumes_to_the_same_output(tmp_path):
    calls = []

    def process(items):
        calls.append([it["i"] for it in items])
        return [{"i": it["i"], "out": it["text"].upper()} for it in items]

    def dies_on_third_batch(items):
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill looks like from inside the loop
        return process(items)

    ShardRun(tmp_path / "whole", "t", 0, ["i", "out"]).run(_numbers(11), 3, _check, process)
    calls.clear()
    killed = ShardRun(tmp_path / "killed", "t", 0, ["i", "out"])
    with pytest.raises(KeyboardInterrupt):
        killed.run(_numbers(11), 3, _check, dies_on_third_batch)
    assert not killed.finished and not killed.csv_path.exists()
    partial_path(killed.part_path(2)).write_text('{"rows": [')  # a torn temporary file
    calls.clear()
    summary = killed.run(_numbers(11), 3, _check, process)
    assert calls == [[6, 7, 8], [9, 10]]  # only the batches that were not saved
    whole = tmp_path / "whole" / "shard_00000.csv"
    assert killed.csv_path.read_bytes() == whole.read_bytes()
    assert [r["i"] for r in read_csv(killed.csv_path)] == [str(i) for i in range(11) if i != 5]
    assert summary["input"] == 11 and summary["kept"] == 10 and summary["rejected"] == {"empty": 1}
    assert not killed.parts_dir.exists()


def test_shard_bounds_cover_everything_once():
    spans = [shard_bounds(103, 10, i) for i in range(10)]
    assert spans[0][0] == 0 and spans[-1][1] == 103
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    with pytest.raises(ValueError):
        shard_bounds(10, 10, 10)


def test_parse_cli_reads_flags_overrides_and_yaml(tmp_path):
    (tmp_path / "pack.yaml").write_text("shard_size: 7\nimages: /coco\n")
    cfg = parse_cli(
        PackConfig,
        "python -m shards.bengali.pack",
        "",
        [
            "--config",
            str(tmp_path / "pack.yaml"),
            "--from-world",
            "n=5",
            "--out=/x",
            "--size",
            "32",
        ],
    )
    assert (cfg.shard_size, str(cfg.images), cfg.from_world, cfg.n, str(cfg.out), cfg.size) == (
        7, "/coco", True, 5, "/x", 32)  # fmt: skip


def test_summary_json_is_what_marks_a_shard_finished(tmp_path):
    run = ShardRun(tmp_path, "t", 3, ["i", "out"])
    run.run(_numbers(2), 5, _check, lambda items: [{"i": it["i"], "out": 1} for it in items])
    assert json.loads(run.summary_path.read_text())["shard"] == 3
    assert run.finished and run.csv_path.name == "shard_00003.csv"


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("translate", "shards.bengali.translate:TranslateConfig"),
        ("verify", "shards.bengali.verify:VerifyConfig"),
        ("synthesise", "shards.bengali.synthesise:SynthesiseConfig"),
        ("pack", "shards.bengali.pack:PackConfig"),
    ],
)
def test_stage_configs_load_with_the_paper_settings(name, cls):
    import importlib

    module, attr = cls.split(":")
    cfg = load_config(
        getattr(importlib.import_module(module), attr), f"configs/bengali/{name}.yaml"
    )
    paper = {
        "translate": {"batch_size": 128, "num_shards": 10, "model": "Helsinki-NLP/opus-mt-en-bn"},
        "verify": {"tau": 0.55, "model": "sentence-transformers/LaBSE"},
        "synthesise": {
            "height": 768,
            "width": 768,
            "seed": 42,
            "max_tokens": 77,
            "en_tokens": 37,
            "negative_prompt": "low quality, bad anatomy, watermark",
        },
        "pack": {"shard_size": 1000},
    }[name]
    assert {k: getattr(cfg, k) for k in paper} == paper


def test_sidecar_version_finds_the_hub_commit():
    commit = "0123456789abcdef0123456789abcdef01234567"

    class Pipe:
        name_or_path = "kandinsky-community/kandinsky-2-1"
        components = {
            "unet": type(
                "M", (), {"config": {"_name_or_path": f"/hub/models--k/snapshots/{commit}/unet"}}
            )()
        }  # noqa: E501

    assert _version(Pipe(), "k") == {"name": "k", "revision": commit}
    Pipe.components = {}
    assert _version(Pipe(), "k") == {"name": "k", "revision": None}
