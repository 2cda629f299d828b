"""Noun extraction with spaCy: nouns of a caption with token and character spans.

``NounExtractor("en_core_web_sm")`` loads a trained spaCy pipeline for real captions (a clear
error says how to install it when missing; a pipeline that cannot tag nouns is refused, so a real
sentence never silently yields nothing). ``NounExtractor("world")`` is offline: ``spacy.blank("en")``
plus an attribute ruler that tags the embedded world's shape nouns (plurals lemmatised).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)
INSTALL_HINT = (
    "spaCy pipeline {name!r} is not installed. Install it with `python -m spacy download {name}` "
    "(or pip install the wheel from https://github.com/explosion/spacy-models/releases), or use "
    "the offline pipeline 'world' for the embedded world's captions."
)
_PROBE = ("A dog runs along the beach with a red ball.", {"dog", "beach", "ball"})


@dataclass(frozen=True)
class Noun:
    text: str
    lemma: str
    start: int  # character span [start, end)
    end: int
    token_start: int  # spaCy token span [token_start, token_end)
    token_end: int


def world_nlp():
    """``spacy.blank("en")`` + an attribute ruler tagging the world's shape nouns."""
    import spacy

    from bimac.data.world import SHAPES

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    for singular, (plural, _) in SHAPES.items():
        for form in (singular, plural):
            ruler.add([[{"LOWER": form}]], {"POS": "NOUN", "LEMMA": singular})
    return nlp


class NounExtractor:
    """``extractor(text) -> list[Noun]``; ``extractor.batch(texts)`` uses ``nlp.pipe``."""

    def __init__(self, pipeline: str = "world") -> None:
        self.pipeline = pipeline
        if pipeline == "world":
            self.nlp = world_nlp()
            return
        import spacy

        try:
            self.nlp = spacy.load(pipeline, exclude=["ner", "parser", "textcat"])
        except OSError as err:
            raise RuntimeError(INSTALL_HINT.format(name=pipeline)) from err
        found = {n.lemma for n in self(_PROBE[0])}
        if not found & _PROBE[1]:
            raise RuntimeError(
                f"spaCy pipeline {pipeline!r} found no noun in {_PROBE[0]!r} "
                f"(pipes: {self.nlp.pipe_names}); it needs a tagger or morphologizer"
            )

    @staticmethod
    def _nouns(doc) -> list[Noun]:
        return [
            Noun(t.text, (t.lemma_ or t.text).lower(), t.idx, t.idx + len(t.text), t.i, t.i + 1)
            for t in doc
            if t.pos_ in ("NOUN", "PROPN")
        ]

    def __call__(self, text: str) -> list[Noun]:
        return self._nouns(self.nlp(text))

    def batch(self, texts: list[str]) -> list[list[Noun]]:
        return [self._nouns(d) for d in self.nlp.pipe(texts)]
