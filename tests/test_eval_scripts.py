"""The evaluation CLIs end to end: COCO caption files in, scores out; retrieval, classification
and probe on a tiny random-weight BiMAC export (numbers are not meaningful, shapes and files are).
"""

from __future__ import annotations

import json

import pytest
import torch
from finetune_fixtures import export_embeddings

from bimac.data.world import make_sample
from bimac.eval import captioning, classification, probe, retrieval
from bimac.metrics.bleu import bleu
from bimac.metrics.cider import cider_d
from bimac.metrics.text import java_available, normalize_bn


def _coco_bn(tmp_path, n=6):
    images, anns, results = [], [], []
    for i in range(n):
        caps = make_sample(0, "val", i)["json"]["captions_bn"]
        images.append({"id": i, "file_name": f"{i}.jpg"})
        anns += [{"image_id": i, "caption": c} for c in caps]
        if i < n - 1:  # the last image gets no result
            results.append({"image_id": i, "caption": caps[0] if i % 2 else "একটি বড় কালো তারা।"})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (tmp_path / "res.json").write_text(json.dumps(results))
    refs = {i: [a["caption"] for a in anns if a["image_id"] == i] for i in range(n - 1)}
    return refs, {r["image_id"]: r["caption"] for r in results}


@pytest.mark.skipif(not java_available(), reason="no Java runtime: METEOR needs one")
def test_captioning_cli_bengali(tmp_path, capsys):
    refs, res = _coco_bn(tmp_path)
    out = captioning.main(
        [
            "--results",
            str(tmp_path / "res.json"),
            "--annotations",
            str(tmp_path / "ann.json"),
            "--lang",
            "bn",
            "--out",
            str(tmp_path / "scores.json"),
        ]
    )
    assert json.loads((tmp_path / "scores.json").read_text())["CIDEr-D"] == out["CIDEr-D"]
    assert "| BLEU-1 |" in capsys.readouterr().out.replace("| BLEU-1 | BLEU-2", "| BLEU-1 |")
    ids = sorted(res)
    cands = [normalize_bn(res[i]) for i in ids]
    ref_lists = [[normalize_bn(r) for r in refs[i]] for i in ids]
    assert out["CIDEr-D"] == pytest.approx(100 * cider_d(cands, ref_lists)[0], abs=1e-9)
    assert out["BLEU-4"] == pytest.approx(100 * bleu(cands, ref_lists)[0][3], abs=1e-9)
    assert out["missing_results"] == 1 and out["images"] == 5
    assert out["SPICE"] == "unavailable" and out["SPICE_reason"] == "English only"
    assert 0 < out["METEOR"] < 100


def test_captioning_rejects_bad_results(tmp_path):
    _coco_bn(tmp_path)
    (tmp_path / "dup.json").write_text(json.dumps([{"image_id": 0, "caption": "a"}] * 2))
    with pytest.raises(ValueError, match="more than one"):
        captioning.main(
            [
                "--results",
                str(tmp_path / "dup.json"),
                "--annotations",
                str(tmp_path / "ann.json"),
                "--lang",
                "bn",
                "--metrics",
                "cider",
            ]
        )
    (tmp_path / "alien.json").write_text(json.dumps([{"image_id": 99, "caption": "a"}]))
    with pytest.raises(ValueError, match="no annotations"):
        captioning.main(
            [
                "--results",
                str(tmp_path / "alien.json"),
                "--annotations",
                str(tmp_path / "ann.json"),
                "--lang",
                "bn",
                "--metrics",
                "cider",
            ]
        )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from bimac.data.tokenizer import train_world_tokenizer
    from bimac.models.bimac import BiMAC, BiMACConfig

    directory = tmp_path_factory.mktemp("ckpt")
    texts = [c for i in range(40) for c in make_sample(0, "train", i)["json"]["captions_en"]]
    torch.manual_seed(0)
    cfg = BiMACConfig(
        vocab_size=300,
        image_size=32,
        patch_size=8,
        vision_width=64,
        vision_layers=1,
        vision_head_width=32,
        text_width=64,
        text_layers=1,
        text_heads=2,
        decoder_layers=1,
        grounding_dim=32,
        patch_decoder_width=32,
        patch_decoder_layers=1,
        patch_decoder_heads=2,
    )
    BiMAC(cfg).save_pretrained(directory, tokenizer=train_world_tokenizer(texts, 300))
    return directory


def test_retrieval_karpathy_json(checkpoint, tmp_path):
    (tmp_path / "img").mkdir()
    items = []
    for i in range(6):
        s = make_sample(0, "retrieval", i)
        (tmp_path / "img" / f"{i}.jpg").write_bytes(s["jpg"])
        items.append(
            {
                "filename": f"{i}.jpg",
                "split": "test" if i < 5 else "train",
                "sentences": [{"raw": c} for c in s["json"]["captions_en"]],
            }
        )
    (tmp_path / "k.json").write_text(json.dumps({"images": items}))
    out = retrieval.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(tmp_path / "k.json"),
            "--images",
            str(tmp_path / "img"),
            "--max-sim-mb",
            "0",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert out["images"] == 5 and out["texts"] == 25
    assert json.loads((tmp_path / "r.json").read_text())["mTR"] == out["mTR"]
    # recomputed from the export's own embeddings: image i owns captions 5i..5i+4
    img, txt = export_embeddings(
        checkpoint, [(tmp_path / "img" / f"{i}.jpg").read_bytes() for i in range(5)],
        [c["raw"] for it in items[:5] for c in it["sentences"]],
    )  # fmt: skip
    sim = img @ txt.T
    owner = torch.arange(25) // 5
    i2t_rank = torch.stack([(sim[i] > sim[i][owner == i].max()).sum() for i in range(5)])
    t2i_rank = torch.stack([(sim[:, j] > sim[owner[j], j]).sum() for j in range(25)])
    for k in (1, 5, 10):
        assert out[f"i2t_R@{k}"] == pytest.approx(100 * float((i2t_rank < k).float().mean()))
        assert out[f"t2i_R@{k}"] == pytest.approx(100 * float((t2i_rank < k).float().mean()))
    assert out["mTR"] == pytest.approx(sum(out[f"i2t_R@{k}"] for k in (1, 5, 10)) / 3)
    assert out["mIR"] == pytest.approx(sum(out[f"t2i_R@{k}"] for k in (1, 5, 10)) / 3)


def test_classification_image_folder_and_probe_world(checkpoint, tmp_path):
    for i in range(6):
        s = make_sample(0, "cls_shape", i)
        d = tmp_path / "folder" / s["json"]["label"]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.jpg").write_bytes(s["jpg"])
    (tmp_path / "t.txt").write_text("a {}\na picture of a {}\n")
    out = classification.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(tmp_path / "folder"),
            "--templates",
            str(tmp_path / "t.txt"),
        ]
    )
    assert out["images"] == 6 and out["templates"] == 2
    classes = sorted(d.name for d in (tmp_path / "folder").iterdir())
    assert out["classes"] == len(classes)
    # recomputed: class vector = normalised mean of the normalised template embeddings
    paths = [(c, p) for c in classes for p in sorted((tmp_path / "folder" / c).iterdir())]
    templates = ["a {}", "a picture of a {}"]
    img, txt = export_embeddings(
        checkpoint, [p.read_bytes() for _, p in paths], [t.format(c) for c in classes for t in templates]
    )  # fmt: skip
    weights = torch.nn.functional.normalize(txt.view(len(classes), 2, -1).mean(1), dim=-1)
    predicted = (img @ weights.T).argmax(1)
    labels = torch.tensor([classes.index(c) for c, _ in paths])
    assert out["top1"] == pytest.approx(100 * float((predicted == labels).float().mean()))
    pr = probe.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data",
            "world:probe:4",
            "--out",
            str(tmp_path / "p.json"),
        ]
    )
    assert pr["examples"] == 4
    assert pr["group_score"] <= min(pr["text_score"], pr["image_score"])
    assert {"attribute_text_score", "relation_group_score"} <= set(pr)


def test_world_evaluation_writes_what_the_report_reads(checkpoint, tmp_path):
    from bimac.eval import world
    from bimac.tools.report import render

    run = tmp_path / "run"
    run.mkdir()
    rows = world.main(
        ["--checkpoint", str(checkpoint), "--n", "8", "--out", str(run / "eval.json")]
    )
    data = json.loads((run / "eval.json").read_text())
    assert {r["task"] for r in rows} == {
        "retrieval",
        "zero-shot cls (shape)",
        "zero-shot cls (colour_shape)",
        "captioning (PTB-tokenised)"
        if java_available()
        else "captioning (no Java: whitespace-tokenised)",
        "probe",
    }
    assert data["retrieval"]["images"] == 8 and data["retrieval"]["texts"] >= 8
    assert data["zero_shot_shape"]["chance_top1"] == 10.0
    assert data["zero_shot_colour_shape"]["chance_top1"] == 1.0  # 10 colours x 10 shapes
    assert data["metrics"]["retrieval/mTR"] == data["retrieval"]["mTR"]
    page = render([run], tmp_path / "report.md")
    r1 = f"{data['retrieval']['i2t_R@1']:.2f}"
    retrieval_rows = [line for line in page.splitlines() if line.startswith("| run/eval/retrieval")]
    assert len(retrieval_rows) == 1 and f"| {r1} |" in retrieval_rows[0]
    assert "| run/eval/probe |" in page and "| run/eval/zero_shot_shape |" in page


def test_world_evaluation_split_sizes_variant_and_flat_metrics(checkpoint, tmp_path):
    """What the tables read: per-split sizes, the binding variant's retrieval split, no captioning
    with --caption-n 0, and flat keys equal to the nested numbers; the run's pointing game comes
    from the summary.json beside the export (absent: the key is left out)."""
    from bimac.eval import world

    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(checkpoint), "--retrieval-n", "12", "--cls-n", "6"]
    args += ["--probe-pairs", "3", "--caption-n", "0", "--variant", "binding", "--out", str(out)]
    world.main(args)
    data = json.loads(out.read_text())
    flat = data["metrics"]
    assert data["retrieval"]["images"] == 12 and data["retrieval"]["texts"] == 60
    assert data["zero_shot_shape"]["images"] == data["zero_shot_colour_shape"]["images"] == 6
    assert data["probe"]["examples"] == 3 and "captioning" not in data
    for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mTR", "mIR"):
        assert flat[f"retrieval/{k}"] == data["retrieval"][k]
    # mTR is the mean of the three image-to-text recalls (BiMAC Table 5)
    i2t = [data["retrieval"][f"i2t_R@{k}"] for k in (1, 5, 10)]
    assert flat["retrieval/mTR"] == pytest.approx(sum(i2t) / 3, abs=1e-9)
    assert flat["cls_shape/top1"] == data["zero_shot_shape"]["top1"]
    assert flat["cls_colour_shape/top1"] == data["zero_shot_colour_shape"]["top1"]
    assert flat["probe/group_score"] == data["probe"]["group_score"]
    assert "pointing_game" not in flat  # the fixture export has no summary.json beside it
    (tmp_path / "run").mkdir()
    summary = {"final_metrics": {"pointing_game": 0.375}}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    assert world.pointing_game(tmp_path / "run" / "export") == 0.375
    assert world.pointing_game(tmp_path / "elsewhere") is None
