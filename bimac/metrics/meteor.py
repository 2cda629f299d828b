"""METEOR 1.5 through the jar shipped with pycocoevalcap, one JVM kept alive across calls.

English uses the COCO settings (``-l en -norm``: exact, stem, synonym and paraphrase modules).
Bengali uses the jar's language-independent mode (``-l other -lower``: exact matching) on
captions normalised by :func:`bimac.metrics.text.normalize_bn` first; the English ``-norm``
tokeniser must not see Bengali (it splits it into code points).

    scorer = Meteor.shared("bn")            # one process per (language, jar), reused
    mean, per_caption = scorer.score(candidates, references)
"""

from __future__ import annotations

import atexit
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from bimac.metrics.text import _pycocoevalcap_dir, normalize_bn, require_java

_LANG_ARGS = {"en": ["-l", "en", "-norm"], "bn": ["-l", "other", "-lower"]}


def _clean(text: str) -> str:
    # The stdio protocol separates fields with '|||' and records with newlines.
    return " ".join(text.replace("|||", " ").split())


class Meteor:
    """A running METEOR 1.5 process for one language (``en`` or ``bn``)."""

    _shared: dict[tuple[str, str], Meteor] = {}

    def __init__(self, lang: str = "en", jar: str | Path | None = None, max_memory: str = "2G"):
        if lang not in _LANG_ARGS:
            raise ValueError(f"METEOR language {lang!r} unsupported; use one of {list(_LANG_ARGS)}")
        require_java("METEOR")
        self.lang = lang
        jar = Path(jar) if jar else _pycocoevalcap_dir() / "meteor" / "meteor-1.5.jar"
        if not jar.exists():
            raise FileNotFoundError(f"METEOR jar not found at {jar}")
        cmd = ["java", "-jar", f"-Xmx{max_memory}", str(jar), "-", "-", "-stdio"]
        self._proc = subprocess.Popen(
            cmd + _LANG_ARGS[lang],
            cwd=jar.parent,  # the English paraphrase table is found relative to the jar
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._lock = threading.Lock()
        atexit.register(self.close)

    @classmethod
    def shared(cls, lang: str = "en", jar: str | Path | None = None) -> Meteor:
        """The process-wide scorer for ``lang`` (started on first use)."""
        key = (lang, str(jar))
        scorer = cls._shared.get(key)
        if scorer is None or scorer._proc.poll() is not None:
            scorer = cls._shared[key] = cls(lang, jar)
        return scorer

    def _ask(self, line: str) -> str:
        self._proc.stdin.write((line + "\n").encode("utf-8"))
        self._proc.stdin.flush()
        out = self._proc.stdout.readline().decode("utf-8").strip()
        if not out:
            raise RuntimeError(f"METEOR process ended unexpectedly (exit {self._proc.poll()})")
        return out

    def score(
        self, candidates: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[float, list[float]]:
        """Corpus METEOR and per-candidate scores (text is normalised here for Bengali)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
        if not candidates:
            return 0.0, []
        prep = normalize_bn if self.lang == "bn" else _clean
        with self._lock:
            stats = []
            for cand, refs in zip(candidates, references):
                if not refs:
                    raise ValueError("every candidate needs at least one reference")
                fields = [_clean(prep(r)) for r in refs] + [_clean(prep(cand))]
                stats.append(self._ask(" ||| ".join(["SCORE", *fields])))
            per = [float(self._ask("EVAL ||| " + " ||| ".join(stats)))]
            per += [float(self._proc.stdout.readline()) for _ in range(len(stats))]
        # The jar answers EVAL with one line per segment, then the corpus score.
        return per[-1], per[:-1]

    def close(self) -> None:
        """Stop the JVM (also done at interpreter exit)."""
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.kill()
            self._proc.wait()
