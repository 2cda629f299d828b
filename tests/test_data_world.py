"""The embedded world: determinism, captions (EN and BN) true of the scene, splits, companions."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from bimac.data.world import (
    BINDING_CLUSTER,
    COLOURS,
    NUMBERS_BN,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    bn_genitive,
    class_names,
    make_sample,
)

EN_COUNT = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
BN_COUNT = {v: k for k, v in NUMBERS_BN.items()}
EN_SHAPE = {s: (s, 1) for s in SHAPES} | {pl: (s, 2) for s, (pl, _) in SHAPES.items()}
BN_SHAPE = {bn: s for s, (_, bn) in SHAPES.items()}
BN_COLOUR = {bn: c for c, (_, bn) in COLOURS.items()}
BN_SIZE = {bn: s for s, (_, bn) in SIZES.items()}
BN_REL = {bn: r for r, (_, _, bn) in RELATIONS.items()}
EN_REL = {en: r for r, (en, _, _) in RELATIONS.items()}


def _holds(rel: str, subj: list[dict], ref: list[dict]) -> bool:
    """Every subject box lies strictly on the ``rel`` side of every reference box."""
    return all(
        {"left": a[2] <= b[0], "right": a[0] >= b[2], "above": a[3] <= b[1], "below": a[1] >= b[3]}[
            rel
        ]
        for a in (o["box"] for o in subj)
        for b in (o["box"] for o in ref)
    )


def _check_np(
    objs: list[dict], count: int, size: str | None, colour: str, shape: str
) -> list[dict]:
    match = [o for o in objs if o["colour"] == colour and o["shape"] == shape]
    assert len(match) == count, (count, colour, shape, objs)
    assert size is None or all(o["size"] == size for o in match)
    return match


def check_en(caption: str, objs: list[dict], relation: str | None) -> None:
    words = re.findall(r"[a-z]+", caption.lower())
    nps, rel, pos_rel = [], None, None
    text = " ".join(words)
    for phrase, r in EN_REL.items():
        if phrase in text:
            rel, pos_rel = r, text.index(phrase)
    i = 0
    while i < len(words):
        if words[i] in EN_COUNT and i + 2 < len(words):
            j = i + 1
            size = words[j] if words[j] in SIZES else None
            j += size is not None
            colour, (shape, number) = words[j], EN_SHAPE[words[j + 1]]
            count = EN_COUNT[words[i]]
            assert (count == 1) == (number == 1), f"number agreement in {caption!r}"
            if words[i] in ("a", "an"):
                assert (words[i] == "an") == (words[i + 1][0] in "aeiou"), caption
            nps.append(
                (
                    text.index(" ".join(words[i : j + 2])),
                    _check_np(objs, count, size, colour, shape),
                )
            )
            i = j + 2
        else:
            i += 1
    assert sum(len(m) for _, m in nps) == len(objs), f"caption misses objects: {caption!r}"
    if relation is None:
        assert rel is None and len(nps) == 1
        return
    assert rel is not None and len(nps) == 2
    # "Rel B there be A" starts with the relation: the reference comes first
    (_, first), (_, second) = nps
    subj, ref = (second, first) if pos_rel == 0 else (first, second)
    assert _holds(rel, subj, ref), (caption, objs)


def check_bn(caption: str, objs: list[dict], relation: str | None) -> None:
    assert caption.endswith("।")
    words = caption.rstrip("।").split()
    nps = []
    for i, w in enumerate(words):
        if w in BN_COUNT:
            j = i + 1
            size = BN_SIZE.get(words[j])
            j += size is not None
            colour = BN_COLOUR[words[j]]
            noun = words[j + 1]
            genitive = noun not in BN_SHAPE
            shape = (
                BN_SHAPE[noun]
                if not genitive
                else next(v for k, v in BN_SHAPE.items() if bn_genitive(k) == noun)
            )
            nps.append((genitive, _check_np(objs, BN_COUNT[w], size, colour, shape)))
    assert sum(len(m) for _, m in nps) == len(objs), caption
    rels = [r for bn, r in BN_REL.items() if bn in caption]
    if relation is None:
        assert not rels and len(nps) == 1
        return
    assert len(rels) == 1 and len(nps) == 2 and sum(g for g, _ in nps) == 1, caption
    ref = next(m for g, m in nps if g)
    subj = next(m for g, m in nps if not g)
    assert _holds(rels[0], subj, ref), (caption, objs)


def test_bengali_genitive_forms():
    # hand-checked forms: -এর after a consonant, -র after a vowel sign
    assert bn_genitive("বৃত্ত") == "বৃত্তের"
    assert bn_genitive("তারা") == "তারার"
    assert bn_genitive("বর্গক্ষেত্র") == "বর্গক্ষেত্রের"


def test_rendering_is_deterministic_by_seed():
    a = make_sample(3, "train", 17, 64, triplet=True)
    b = make_sample(3, "train", 17, 64, triplet=True)
    c = make_sample(4, "train", 17, 64, triplet=True)
    assert a["jpg"] == b["jpg"] and a["syn.jpg"] == b["syn.jpg"] and a["json"] == b["json"]
    assert a["jpg"] != c["jpg"]


@pytest.mark.parametrize("split", ["train", "val", "retrieval"])
def test_every_caption_true_of_its_scene_en_and_bn(split):
    counts = {1: 0, 2: 0}
    for i in range(300):
        meta = make_sample(0, split, i)["json"]
        objs, rel = meta["objects"], meta["relation"]
        assert 1 <= len(objs) <= 4
        assert len(meta["captions_en"]) == 5 == len(set(meta["captions_en"]))
        assert len(meta["captions_bn"]) == 5 == len(set(meta["captions_bn"]))
        for cap in meta["captions_en"]:
            check_en(cap, objs, rel)
        for cap in meta["captions_bn"]:
            check_bn(cap, objs, rel)
        counts[1 + (rel is not None)] += 1
        for nouns, cap in zip(meta["nouns"], meta["captions_en"]):
            for n in nouns:
                assert cap[n["start"] : n["end"]] == n["text"]
                assert all(objs[k]["shape"] == n["lemma"] for k in n["objects"])
    assert min(counts.values()) > 50  # both one-group and related two-group scenes occur


def test_world_covers_the_required_vocabulary():
    seen = {"shape": set(), "colour": set(), "size": set(), "texture": set(), "rel": set()}
    for i in range(400):
        meta = make_sample(1, "train", i)["json"]
        for o in meta["objects"]:
            for k in ("shape", "colour", "size", "texture"):
                seen[k].add(o[k])
        seen["rel"].add(meta["relation"])
    # every word of the world's lexicon occurs in 400 training scenes, and nothing else does
    assert seen["shape"] == set(SHAPES) and len(SHAPES) == 10
    assert seen["colour"] == set(COLOURS) and len(COLOURS) == 10
    assert seen["size"] == set(SIZES) and len(SIZES) == 3
    assert seen["texture"] == set(TEXTURES) == {"solid", "stripes", "dots", "checker"}
    assert seen["rel"] == set(RELATIONS) | {None} == {"left", "right", "above", "below", None}


def test_pixels_show_the_objects_colour():
    checked = 0
    for i in range(100):
        s = make_sample(0, "cls_colour_shape", i, 64)
        o = s["json"]["objects"][0]
        if o["texture"] != "solid" or o["shape"] == "crescent":
            continue
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).astype(int)
        x0, y0, x1, y1 = o["box"]
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        # JPEG q90 with chroma subsampling: the centre pixel stays within 60 of the named RGB
        assert np.abs(img[cy, cx] - np.array(COLOURS[o["colour"]][0])).max() < 60, o
        checked += 1
    assert checked > 10


def test_classification_labels_match_objects():
    for split in ("cls_shape", "cls_colour_shape"):
        names = class_names(split)
        for i in range(50):
            meta = make_sample(0, split, i)["json"]
            (o,) = meta["objects"]
            want = o["shape"] if split == "cls_shape" else f"{o['colour']} {o['shape']}"
            assert meta["label"] == want == names[meta["label_index"]]
    assert len(class_names("cls_shape")) >= 8


def test_probe_pairs_swap_attributes_or_relation_order():
    kinds = set()
    for pair in range(20):
        a, b = (make_sample(0, "probe", 2 * pair + m) for m in (0, 1))
        ca, cb = a["json"]["captions_en"][0], b["json"]["captions_en"][0]
        assert ca != cb and a["jpg"] != b["jpg"]
        assert sorted(re.findall(r"\w+", ca.lower())) == sorted(re.findall(r"\w+", cb.lower()))
        check_en(cb, b["json"]["objects"], b["json"]["relation"])
        # each image is described by its own caption only
        with pytest.raises(AssertionError):
            check_en(ca, b["json"]["objects"], b["json"]["relation"])
        kinds.add(a["json"]["probe"]["kind"])
    assert kinds == {"attribute", "relation"}


def test_companion_keeps_the_caption_with_a_new_layout():
    for i in range(50):
        s = make_sample(2, "train", i, 64, triplet=True)
        meta, comp = s["json"], s["json"]["companion"]
        assert s["en.txt"] == meta["captions_en"][0] and s["bn.txt"] == meta["captions_bn"][0]
        check_en(s["en.txt"], comp["objects"], meta["relation"])
        assert s["syn.jpg"] != s["jpg"]
        assert [o["box"] for o in comp["objects"]] != [o["box"] for o in meta["objects"]]
    json.dumps(meta)  # serialisable


def test_binding_variant_objects_fill_whole_patches_of_its_lexicon():
    """The binding variant's objects are ones the tables' tower (64 px, 8 px patches) can tell
    apart: shapes of BINDING_SHAPES, solid, medium or large, one per group, each box on whole
    cells of the 8 x 8 grid less a 1 px margin; its classification splits label the same shapes
    (label_index into class_names(split, "binding")), the default's keep all ten."""
    from bimac.data.world import BINDING_GRID, BINDING_SHAPES, BINDING_SIZES, class_names

    cell = 64 / BINDING_GRID
    for split in ("train", "retrieval", "cls_shape", "cls_colour_shape"):
        for i in range(40):
            meta = make_sample(0, split, i, variant="binding")["json"]
            for o in meta["objects"]:
                assert o["shape"] in BINDING_SHAPES and o["size"] in BINDING_SIZES
                assert o["texture"] == "solid"
                x0, y0, x1, y1 = o["box"]
                assert (x0 - 1) % cell == 0 and (y0 - 1) % cell == 0
                assert (x1 - x0 + 2) % cell == 0 and x1 - x0 == y1 - y0 and x1 <= 63
            if split.startswith("cls"):
                assert class_names(split, "binding")[meta["label_index"]] == meta["label"]
            else:
                assert len(meta["objects"]) == 2  # one object per group
    assert class_names("cls_shape", "binding") == list(BINDING_SHAPES)
    assert class_names("cls_shape") == list(SHAPES) and len(SHAPES) == 10
    assert len(class_names("cls_colour_shape", "binding")) == len(COLOURS) * len(BINDING_SHAPES)


def test_binding_variant_clusters_differ_only_in_binding_and_relation():
    """world variant ``binding``: every scene two groups; each cluster of BINDING_CLUSTER scenes
    shares the {colour, shape, count} sets and holds distinct (binding, relation) configurations,
    so colour or count alone cannot tell a cluster's scenes apart; captions stay true."""
    from bimac.data.samples import iter_samples

    for cluster in range(25):
        metas = [
            make_sample(0, "retrieval", cluster * BINDING_CLUSTER + m, variant="binding")["json"]
            for m in range(BINDING_CLUSTER)
        ]
        configs, colour_sets, shape_sets, count_sets = set(), set(), set(), set()
        for meta in metas:
            objs, rel = meta["objects"], meta["relation"]
            assert rel is not None and meta["variant"] == "binding"
            for cap in meta["captions_en"]:
                check_en(cap, objs, rel)
            for cap in meta["captions_bn"]:
                check_bn(cap, objs, rel)
            groups = [(g["shape"], g["colour"]) for g in {o["shape"]: o for o in objs}.values()]
            colour_sets.add(frozenset(o["colour"] for o in objs))
            shape_sets.add(frozenset(o["shape"] for o in objs))
            count_sets.add(len(objs))
            configs.add((frozenset(groups), rel, objs[0]["shape"]))
        assert len(colour_sets) == len(shape_sets) == 1  # the same two colours and shapes
        assert len(configs) == BINDING_CLUSTER  # ...bound or related differently in each scene
        assert len(next(iter(colour_sets))) == len(next(iter(shape_sets))) == 2
    # the eval's spec world:SPLIT:N:VARIANT renders the same samples; the default is unchanged
    spec = list(iter_samples("world:retrieval:3:binding"))
    assert [s["jpg"] for s in spec] == [
        make_sample(0, "retrieval", i, variant="binding")["jpg"] for i in range(3)
    ]
    assert make_sample(0, "train", 5, variant="default") == make_sample(0, "train", 5)
    assert make_sample(0, "probe", 5, variant="binding") != make_sample(0, "probe", 5)  # names it
    assert make_sample(0, "probe", 5, variant="binding")["jpg"] == make_sample(0, "probe", 5)["jpg"]
    with pytest.raises(ValueError, match="unknown world variant 'nope'"):
        make_sample(0, "train", 0, variant="nope")


def test_world_spec_takes_a_seed_and_a_variant_in_either_order():
    """``world:SPLIT:N[:SEED][:VARIANT]``: classification's seeded specs (``world:cls_shape:512:1``
    in configs/finetune/classification/tiny.yaml) still read as a seed, a name as the variant."""
    from bimac.data.samples import iter_samples, world_options

    assert world_options("world:cls_shape:512:1") == (1, "default")
    assert world_options("world:retrieval:1000:binding") == (None, "binding")
    assert world_options("world:retrieval:8:3:binding") == (3, "binding")
    assert world_options("world:val") == (None, "default")
    seeded = [s["json"]["label_index"] for s in iter_samples("world:cls_shape:4:1", seed=1)]
    assert len(seeded) == 4
    binding = list(iter_samples("world:retrieval:2:binding"))
    assert [s["json"]["variant"] for s in binding] == ["binding", "binding"]
