"""Bengali normalisation, METEOR (jar, one JVM), SPICE availability, BERTScore wrapper."""

from __future__ import annotations

import unicodedata

import pytest

from bimac.metrics.meteor import Meteor
from bimac.metrics.spice import SpiceUnavailable, spice, spice_unavailable_reason
from bimac.metrics.text import java_available, normalize_bn

needs_java = pytest.mark.skipif(not java_available(), reason="no Java runtime: METEOR needs one")


def test_normalize_bn_nfc_danda_punctuation():
    decomposed = unicodedata.normalize("NFD", "কোথায়")  # o-kar and nukta forms decomposed
    assert normalize_bn(f"{decomposed}? আমি  ভাত খাই। ভালো॥ OK,") == "কোথায় আমি ভাত খাই ভালো ok"
    assert normalize_bn(decomposed) == unicodedata.normalize("NFC", "কোথায়")


@needs_java
def test_meteor_bengali_identical_one_unrelated_zero_and_one_jvm():
    scorer = Meteor.shared("bn")
    assert Meteor.shared("bn") is scorer  # the JVM is reused across calls
    mean, per = scorer.score(
        ["একটি লাল বল টেবিলের উপর।", "একটি নীল ঘনক"],
        [["একটি লাল বল টেবিলের উপর"], ["সবুজ বিড়াল ঘুমায়"]],
    )
    assert per[0] == pytest.approx(1.0, abs=1e-9)  # danda stripped by the normaliser
    assert per[1] == pytest.approx(0.0, abs=1e-9)
    _, per2 = scorer.score(["একটি লাল বল"], [["একটি লাল বল"]])
    assert per2 == [pytest.approx(1.0)]
    assert scorer._proc.poll() is None


def test_missing_java_gives_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="needs a Java runtime"):
        Meteor("bn")


def test_spice_reports_unavailable_instead_of_a_number():
    reason = spice_unavailable_reason()
    if reason is None:
        pytest.skip("SPICE models are installed here; the unavailable path cannot be exercised")
    with pytest.raises(SpiceUnavailable, match="missing|Java"):
        spice(["a dog"], [["a dog"]])


def test_bertscore_local_tiny_model_unrescaled(tmp_path):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from bimac.metrics.bertscore import bertscore

    words = [
        "a",
        "dog",
        "cat",
        "runs",
        "sits",
        "on",
        "the",
        "mat",
        "red",
        "blue",
        "একটি",
        "লাল",
        "বল",
    ]
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    tokenizer = BertTokenizer(vocab=str(tmp_path / "vocab.txt"), strip_accents=False)
    assert "[UNK]" not in tokenizer.tokenize("একটি লাল বল a dog runs")
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=1.0,  # large weights: distinct token states
    )
    BertModel(config).save_pretrained(tmp_path)
    out = bertscore(
        ["একটি লাল বল", "a dog runs"],
        [["একটি লাল বল"], ["the blue mat", "cat sits"]],
        lang="bn",
        model=tmp_path,
        layer=2,
        device="cpu",
    )
    assert out["per_caption_F1"][0] == pytest.approx(1.0, abs=1e-5)
    assert out["per_caption_F1"][1] < 0.99
    assert out["rescaled"] is False and out["note"].startswith("unrescaled")
    with pytest.raises(ValueError, match="layer"):
        bertscore(["a"], [["a"]], lang="bn", model=tmp_path)


@needs_java
def test_ptb_tokenize_equals_pycocoevalcap_without_writing_into_the_package():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from bimac.metrics.text import _pycocoevalcap_dir, ptb_tokenize

    sentences = ["A man's dog, running -- fast!", "Two (red) cats sit on the mat.", ""]
    package = _pycocoevalcap_dir() / "tokenizer"
    before = set(package.iterdir())
    ours = ptb_tokenize(sentences)
    assert set(package.iterdir()) == before
    theirs = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    assert ours == [theirs[i][0] for i in range(len(sentences))]
    assert ours[0] == "a man 's dog running fast"


@pytest.mark.slow  # two JVMs load the English paraphrase table (~1 min)
def test_meteor_english_equals_pycocoevalcap():
    """English METEOR against pycocoevalcap's own wrapper of the same jar (the COCO settings):
    per-caption and corpus scores equal to 1e-6 (the jar prints them with limited digits)."""
    from pycocoevalcap.meteor.meteor import Meteor as CocoMeteor

    candidates = [
        "a red circle left of a blue square",
        "two green triangles on a white background",
        "the dogs are running quickly across the field",
        "something else entirely",
    ]
    references = [
        ["a red circle to the left of a blue square", "red circle and blue square"],
        ["two green triangles", "a pair of green triangles on white"],
        ["a dog runs across a grassy field", "dogs running in a field"],
        ["a yellow star above a purple hexagon"],
    ]
    ours, ours_per = Meteor.shared("en").score(candidates, references)
    coco = CocoMeteor()
    try:
        gts = {i: refs for i, refs in enumerate(references)}
        res = {i: [c] for i, c in enumerate(candidates)}
        theirs, theirs_per = coco.compute_score(gts, res)
    finally:
        with coco.lock:
            coco.meteor_p.stdin.close()
            coco.meteor_p.kill()
            coco.meteor_p.wait()
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert ours_per == pytest.approx(list(theirs_per), abs=1e-6)
    assert min(ours_per[:3]) > 0 and ours_per[0] > ours_per[3]  # a real spread, not all zeros
