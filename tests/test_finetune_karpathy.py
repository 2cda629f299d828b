"""Karpathy JSON + images -> training shards the loader and SCST read, and COCO-format test
annotations the captioning evaluation reads."""

from __future__ import annotations

import json

from finetune_fixtures import world_image, world_shards

from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from bimac.eval.captioning import load_annotations
from bimac.tasks.caption import reference_index
from bimac.tools.karpathy import main as karpathy


def test_karpathy_json_to_shards_and_coco_annotations(tmp_path):
    _, tok_file = world_shards(tmp_path / "world", n=4)
    (tmp_path / "img" / "val2014").mkdir(parents=True)
    caps = ["A red circle.", "Two blue squares.", "A green star.", "A small circle.", "Stars."]
    items = []
    for i, split in enumerate(["train", "restval", "train", "test"]):
        if i != 2:  # image 2 is missing on disk: skipped and counted
            world_image(tmp_path / "img" / "val2014" / f"{i}.jpg", index=i)
        items.append(
            {
                "filepath": "val2014",
                "filename": f"{i}.jpg",
                "split": split,
                "cocoid": 100 + i,
                "sentences": [{"raw": c} for c in caps],
            }
        )
    (tmp_path / "k.json").write_text(json.dumps({"images": items}))

    report = karpathy(
        [
            "--json",
            str(tmp_path / "k.json"),
            "--images",
            str(tmp_path / "img"),
            "--split",
            "train,restval",
            "--out",
            str(tmp_path / "shards"),
        ]
    )
    assert report["images"] == 3 and report["skipped"] == {"missing_image": 1}
    karpathy(
        [
            "--json",
            str(tmp_path / "k.json"),
            "--split",
            "test",
            "--coco-json",
            str(tmp_path / "test.json"),
        ]
    )

    tok = build_tokenizer(TokenizerConfig(kind="world", path=str(tok_file), context_length=16))
    cfg = DataConfig(
        train_shards=str(tmp_path / "shards" / "00000.tar"),
        image_size=32,
        batch_size=8,
        noun_source="json",
    )
    batches = list(make_loader(cfg, tok, rank=0, world_size=1))
    assert len(batches) == 1 and batches[0]["image"].shape == (2, 3, 32, 32)
    assert tok.decode(batches[0]["text"])[0] in caps  # one of the five, drawn per epoch
    refs = reference_index(cfg.train_shards, tok)
    assert len(refs) == 2 and all(len(r) == 5 for r in refs.values())
    assert set(refs) == set(batches[0]["sample_id"])  # SCST finds every batch sample

    references, sources = load_annotations(str(tmp_path / "test.json"))
    assert references == {103: caps} and sources == {103: "val2014/3.jpg"}


def test_retrieval_eval_reads_a_karpathy_split(tmp_path):
    from bimac.tasks.retrieval import RetrievalConfig, RetrievalEvalConfig
    from finetune.retrieval import eval_pairs

    items = [
        {"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f" cap {i} "}]}
        for i in range(3)
    ]
    (tmp_path / "k.json").write_text(json.dumps({"images": items}))
    cfg = RetrievalConfig(
        eval=RetrievalEvalConfig(data=str(tmp_path / "k.json"), images=str(tmp_path), limit=2)
    )
    images, captions = eval_pairs(cfg)
    assert images == [tmp_path / "0.jpg", tmp_path / "1.jpg"] and captions == [["cap 0"], ["cap 1"]]
