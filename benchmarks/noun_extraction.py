"""CPU milliseconds per caption of the loader's spaCy noun extraction (``data.noun_source:
spacy``, the paper config's CC data, whose shards carry no nouns): one ``nlp(text)`` call per
caption, as a loader worker ran it sample by sample, against one ``nlp.pipe`` over a chunk of 64
captions, as it runs now (``ShardDataset.collate``). The nouns of both are checked equal first.

Pipelines:
- ``sm_architecture``: the tok2vec + tagger of spaCy's English "efficiency" config, which is
  en_core_web_sm's (hash embeddings of NORM/PREFIX/SUFFIX/SHAPE, 5000/1000/2500/2500 rows, a
  maxout window encoder of width 96 and depth 4), with random weights: its speed is the trained
  pipeline's, without the download (its tags are noise, so its nouns are too);
- ``world``: the embedded world's offline pipeline (``NounExtractor("world")``);
- ``--pipeline NAME``: an installed pipeline too (e.g. en_core_web_sm), as the loader loads it.

Captions: the embedded world's English captions (``world_corpus``), in chunks of 64 as a loader
worker collates them; each timing is the median of ``--repeats`` passes, the two ways taking turns
chunk by chunk.
``.venv/bin/python benchmarks/noun_extraction.py [--n 1280] [--pipeline en_core_web_sm] [--json out.json]``
"""

from __future__ import annotations

import argparse

import spacy
from spacy.cli.init_config import init_config
from spacy.training import Example
from tokenize_captions import report, us_per_caption

from bimac.data.nouns import NounExtractor
from bimac.data.world import world_corpus


def sm_architecture() -> spacy.language.Language:
    """en_core_web_sm's tok2vec + tagger, random weights (initialised from one tagged sentence)."""
    nlp = spacy.util.load_model_from_config(
        init_config(lang="en", pipeline=["tagger"], optimize="efficiency", gpu=False),
        auto_fill=True,
    )
    doc = nlp.make_doc("A dog runs along the beach.")
    tags = ["DT", "NN", "VBZ", "IN", "DT", "NN", "."]
    nlp.initialize(lambda: [Example.from_dict(doc, {"tags": tags})])
    return nlp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1280, help="captions")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pipeline", action="append", default=[], help="an installed pipeline too")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    texts = [t for t in world_corpus(a.n, seed=1) if t.isascii()][: a.n]
    chunks = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    pipelines = {"sm_architecture": sm_architecture(), "world": NounExtractor("world").nlp}
    pipelines |= {name: NounExtractor(name).nlp for name in a.pipeline}
    result = {}
    nouns = NounExtractor._nouns  # what the loader keeps of a parsed caption
    for name, nlp in pipelines.items():

        def one_call_each(chunk: list[str], nlp=nlp) -> list:
            return [nouns(nlp(t)) for t in chunk]

        def one_pipe_per_chunk(chunk: list[str], nlp=nlp) -> list:
            return [nouns(d) for d in nlp.pipe(chunk)]

        assert one_call_each(texts[:256]) == one_pipe_per_chunk(texts[:256]), name
        us = us_per_caption(
            {"one_call_each": one_call_each, "one_pipe_per_chunk": one_pipe_per_chunk},
            chunks,
            a.repeats,
        )
        result[name] = {k: v / 1000 for k, v in us.items()}  # ms per caption
    rows = []
    for name, r in result.items():
        each, piped = r["one_call_each"], r["one_pipe_per_chunk"]
        rows.append(f"| {name} | {each:.3f} | {piped:.3f} | {each / piped:.2f} |")
    header = "| pipeline | one call per caption, ms | one nlp.pipe per chunk of 64, ms | speedup |"
    report(texts, header, rows, result, a.json, spacy=spacy.__version__)


if __name__ == "__main__":
    main()
