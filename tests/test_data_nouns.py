"""Tokenizers (world, open_clip, transformers wrapper) and spaCy noun extraction."""

from __future__ import annotations

import io

import open_clip
import pytest
import spacy
import torch
import webdataset as wds
from PIL import Image

from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader, token_spans
from bimac.data.nouns import NounExtractor
from bimac.data.tokenizer import OpenCLIPTokenizer, TransformersTokenizer, save_world_tokenizer
from bimac.data.world import make_sample, world_corpus


@pytest.fixture(scope="module")
def world_tok_path(tmp_path_factory):
    return save_world_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def tok(world_tok_path):
    return build_tokenizer(
        TokenizerConfig(kind="world", path=str(world_tok_path), context_length=32)
    )


def test_world_tokenizer_small_and_round_trips_en_and_bn(tok):
    assert 200 <= tok.vocab_size <= 2000
    texts = world_corpus(50, seed=9)  # other scenes than the training corpus (seed 0)
    ids = tok.encode(texts)
    assert ids.shape == (len(texts), 32) and ids.dtype == torch.long
    assert tok.decode(ids) == texts
    assert (ids[:, 0] == tok.bos_id).all()
    lengths = (ids != tok.pad_id).sum(1)
    assert (ids[torch.arange(len(texts)), lengths - 1] == tok.eos_id).all()
    assert any(not t.isascii() for t in texts)  # Bengali covered
    assert not (ids == tok.tok.token_to_id("<unk>")).any()


def test_truncation_keeps_eos(tok):
    ids = tok.encode([" ".join(["two red circles"] * 30)])
    assert ids.shape == (1, 32) and ids[0, -1] == tok.eos_id


def test_token_spans_hand_computed():
    offsets = [(0, 0), (0, 3), (3, 7), (7, 8), (9, 14), (0, 0)]
    assert token_spans(offsets, [(4, 7), (9, 14), (20, 25), (0, 8)]) == [
        (2, 3),
        (4, 5),
        None,
        (1, 4),
    ]


def test_open_clip_wrapper_matches_open_clip_and_maps_nouns():
    ref = open_clip.get_tokenizer("ViT-B-32")
    ours = OpenCLIPTokenizer("ViT-B-32", context_length=77)
    texts = ["Two red circles to the left of a blue square.", "A dog's ball, on the beach!"]
    assert torch.equal(ours.encode(texts), ref(texts))  # reference: open_clip's own tokenizer
    ids, offs = ours.encode_with_offsets(texts)
    (span,) = token_spans(offs[0], [(8, 15)])  # "circles"
    assert ours.decode([ids[0, span[0] : span[1]].tolist()]) == ["circles"]


def test_transformers_wrapper_offsets(world_tok_path, tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(world_tok_path), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(tmp_path)
    wrapped = TransformersTokenizer(str(tmp_path), context_length=32, lang=None)
    texts = world_corpus(3, seed=4)
    ids, offs = wrapped.encode_with_offsets(texts)
    assert torch.equal(ids, tok.encode(texts))
    assert wrapped.decode(ids) == texts
    s = make_sample(0, "train", 3)["json"]
    text, nouns = s["captions_bn"][0], s["nouns_bn"][0]
    ids, offs = wrapped.encode_with_offsets([text])
    for n, (a, b) in zip(nouns, token_spans(offs[0], [(n["start"], n["end"]) for n in nouns])):
        # a Bengali genitive is one token with its noun ("ক্রসের"): the span covers the word
        assert wrapped.decode([ids[0, a:b].tolist()])[0].startswith(n["text"])


def test_world_nouns_equal_scene_nouns():
    ex = NounExtractor("world")
    for i in range(100):
        meta = make_sample(0, "train", i)["json"]
        caps = meta["captions_en"]
        for cap, got, want in zip(caps, ex.batch(caps), meta["nouns"]):
            assert [(n.lemma, n.start, n.end) for n in got] == [
                (w["lemma"], w["start"], w["end"]) for w in want
            ], cap
            assert [n.text for n in got] == [cap[n.start : n.end] for n in got]


def test_missing_real_pipeline_says_how_to_install():
    with pytest.raises(RuntimeError, match="spacy download en_core_web_sm"):
        NounExtractor("en_core_web_sm")


def test_pipeline_without_tagger_is_refused(tmp_path):
    spacy.blank("en").to_disk(tmp_path / "blank")
    with pytest.raises(RuntimeError, match="found no noun"):
        NounExtractor(str(tmp_path / "blank"))


def test_loader_extracts_nouns_with_spacy_when_json_has_none(tmp_path, tok):
    """noun_source=spacy: the chunk's captions go through one ``nlp.pipe`` in ``collate``; each
    sample gets its own caption's nouns (reference: ``NounExtractor`` on each caption alone)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="JPEG")
    captions = ["Two red circles above a star.", "A small blue square.", "Nothing at all here.",
                "A cross left of three hexagons and a triangle."]  # fmt: skip
    with wds.TarWriter(str(tmp_path / "00000.tar")) as w:
        for i, caption in enumerate(captions):
            w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": caption, "json": {}})
    cfg = DataConfig(
        train_shards=str(tmp_path / "00000.tar"), noun_source="spacy", spacy_pipeline="world",
        batch_size=4, max_nouns=4,
    )  # fmt: skip
    (b,) = list(make_loader(cfg, tok, rank=0, world_size=1))
    extractor = NounExtractor("world")
    for row, sample_id in enumerate(b["sample_id"]):  # shuffled: the key names the caption
        want = [n.text for n in extractor(captions[int(sample_id.rpartition("#")[2])])]
        assert b["noun_mask"][row].tolist() == [True] * len(want) + [False] * (4 - len(want))
        spans = b["noun_spans"][row, : len(want)].tolist()
        assert [tok.decode([b["text"][row, s:e].tolist()])[0] for s, e in spans] == want
    assert sum(b["noun_mask"].flatten().tolist()) == 2 + 1 + 0 + 3
    assert not b["noun_has_box"].any()


def test_batch_noun_arrays_keep_the_first_max_nouns_the_tokenizer_kept(world_tok_path):
    # reference: the per-sample rule by hand (token_spans above is hand-checked): each sample's
    # nouns in caption order, those truncated away dropped, then the first max_nouns kept
    import numpy as np

    from bimac.data.loader import ShardDataset

    short = build_tokenizer(
        TokenizerConfig(kind="world", path=str(world_tok_path), context_length=8)
    )
    shard = world_tok_path.parent / "00000.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "k", "txt": "x", "jpg": b""})
    ds = ShardDataset(DataConfig(train_shards=str(shard), max_nouns=2), short, rank=0, world_size=1)
    text = "Two red circles above a star, a cross and a square."
    words = ["circles", "star", "cross", "square"]
    spans = [(text.index(x), text.index(x) + len(x)) for x in words]
    boxes = [[0.1, 0.2, 0.3, 0.4], None, [0.5, 0.5, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0]]
    image = np.zeros((8, 8, 3), np.uint8)
    items = [
        {"image": image, "text": text, "sample_id": "a", "nouns": [(*spans[i], boxes[i]) for i in (3, 0, 1)]},
        {"image": image, "text": "A star.", "sample_id": "b", "nouns": []},
        {"image": image, "text": text, "sample_id": "c", "nouns": [(*spans[i], boxes[i]) for i in (1, 2)]},
    ]  # fmt: skip
    batch = ds.collate(items)
    _, offsets = short.encode_with_offsets([it["text"] for it in items])
    for row, it in enumerate(items):
        tok = token_spans(offsets[row], [n[:2] for n in it["nouns"]])
        kept = [(s, n[2]) for s, n in zip(tok, it["nouns"]) if s is not None][:2]
        assert batch["noun_mask"][row].tolist() == [True] * len(kept) + [False] * (2 - len(kept))
        for j, (span, box) in enumerate(kept):
            assert tuple(batch["noun_spans"][row, j].tolist()) == span
            assert batch["noun_has_box"][row, j] == (box is not None)
            assert batch["noun_boxes"][row, j].tolist() == pytest.approx(box or [0.0] * 4)
    # the context of 8 tokens cuts "square" (and "cross"): row 0 keeps circles and star, the
    # latter without a box; row 2 keeps star alone
    assert batch["noun_mask"].tolist() == [[True, True], [False, False], [True, False]]
    assert short.decode(
        [batch["text"][0, slice(*batch["noun_spans"][0, 0].tolist())].tolist()]
    ) == ["circles"]


def test_open_clip_wrapper_equals_open_clip_on_unicode_punctuation_and_truncation():
    # reference: open_clip's own tokenizer (SimpleTokenizer, Python BPE). Random strings over an
    # alphabet with accents, a word-final sigma, CJK, emoji, digits, apostrophes and whitespace
    import random

    ref = open_clip.get_tokenizer("ViT-B-32")
    ours = OpenCLIPTokenizer("ViT-B-32", context_length=16)
    rng = random.Random(0)
    alphabet = "abcXYZ éüß'\".,!?-_0123456789 中😀ΣΟΦΟΣς"
    texts = world_corpus(100, seed=1) + [
        "A dog's ball, on the beach!", "I'M HERE, you're there; they'd've gone.",
        "ΣΟΦΟΣ ελληνικά", "İstanbul", "Straße", "3.14159 and 1,000,000", "x" * 100,
        "<start_of_text> literal <end_of_text>", "",
    ] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(2000)]  # fmt: skip
    want = ref(texts, context_length=16)
    ids, offsets = ours.encode_with_offsets(texts)
    assert torch.equal(ids, want)
    # each sub-word's characters lie inside one of open_clip's words of the lower-cased text
    for text, row, offs in zip(texts[:200], ids, offsets):
        words = [m.span() for m in ref.pat.finditer(text.lower())]
        for t, (s, e) in zip(row.tolist(), offs.tolist()):
            if t in (ours.bos_id, ours.eos_id, ours.pad_id):
                assert (s, e) == (0, 0)
            else:
                assert any(a <= s < e <= b for a, b in words), (text, s, e)
