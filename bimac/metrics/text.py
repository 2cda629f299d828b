"""Caption text preparation for the metrics: the one place where tokenisation is decided.

English follows the COCO caption pipeline: Stanford PTBTokenizer (the jar shipped with
pycocoevalcap), lower-cased, with the COCO punctuation list removed. We run the jar ourselves
because pycocoevalcap's wrapper writes its temporary file inside the installed package directory
(fails on read-only installs, races between concurrent jobs).

Bengali (``normalize_bn``) is done in Python, never with an English normaliser (Meteor's ``-norm``
and PTB split Bengali into code points):

1. Unicode NFC, so that composed and decomposed vowel signs / nukta forms compare equal;
2. the danda ``।`` (U+0964), double danda ``॥`` (U+0965) and every Unicode punctuation
   character (category ``P*``) become spaces; ZWJ/ZWNJ and Bengali digits are kept;
3. lower-casing (only affects embedded Latin text) and whitespace collapsed to single spaces.

The result is a whitespace-tokenised string, which every metric here consumes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Removed from PTB output, exactly as pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS.
COCO_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--"]
    + ["...", ";"]
)

DANDA = "\u0964"
DOUBLE_DANDA = "\u0965"


def java_available() -> bool:
    """True when a ``java`` executable runs (needed for PTB, METEOR and SPICE)."""
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def require_java(what: str) -> None:
    """Raise a clear error when Java is missing."""
    if not java_available():
        raise RuntimeError(
            f"{what} needs a Java runtime (>= 8) on PATH; none was found. "
            "Install one (e.g. `apt-get install default-jre`) or drop this metric."
        )


def normalize_bn(text: str) -> str:
    """Normalise one Bengali caption for metrics (see the module docstring for the rules)."""
    text = unicodedata.normalize("NFC", text)
    chars = [
        " " if ch in (DANDA, DOUBLE_DANDA) or unicodedata.category(ch).startswith("P") else ch
        for ch in text
    ]
    return " ".join("".join(chars).lower().split())


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__)))


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """PTB-tokenise English sentences as COCO does (lower-case, COCO punctuation removed)."""
    if not sentences:
        return []
    require_java("PTB tokenisation")
    jar = _pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    text = "\n".join(s.replace("\n", " ") for s in sentences)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "sentences.txt")
        Path(src).write_text(text, encoding="utf-8")
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
        cmd += ["-preserveLines", "-lowerCase", src]
        out = subprocess.run(cmd, capture_output=True, check=True).stdout.decode("utf-8")
    lines = out.split("\n")
    if len(lines) < len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} inputs")
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in COCO_PUNCTUATIONS)
        for line in lines[: len(sentences)]
    ]


def tokenize(sentences: Sequence[str], lang: str) -> list[str]:
    """Whitespace-tokenised, lower-cased captions for ``lang`` in ``{"en", "bn"}``."""
    if lang == "en":
        return ptb_tokenize(sentences)
    if lang == "bn":
        return [normalize_bn(s) for s in sentences]
    raise ValueError(f"unsupported language {lang!r}; expected 'en' or 'bn'")


def tokenize_groups(groups: Mapping[object, Sequence[str]], lang: str) -> dict[object, list[str]]:
    """Tokenise a ``{image_id: [captions]}`` mapping in one call (one JVM for English)."""
    keys = list(groups)
    flat = [c for k in keys for c in groups[k]]
    toks = iter(tokenize(flat, lang))
    return {k: [next(toks) for _ in groups[k]] for k in keys}
