"""SPICE (Anderson et al. 2016) through pycocoevalcap's jar, English only, when its Stanford
CoreNLP models are present; otherwise :class:`SpiceUnavailable` (never a made-up number).

The models (``stanford-corenlp-3.6.0.jar`` and ``...-models.jar``) go in pycocoevalcap's
``spice/lib`` (``python -m pycocoevalcap.spice.get_stanford_models`` on a machine with network).
Temporary files and the parse cache live outside the package directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bimac.metrics.text import _pycocoevalcap_dir, java_available

CORENLP = "stanford-corenlp-3.6.0"


class SpiceUnavailable(RuntimeError):
    """SPICE cannot run here; the message says why."""


def spice_unavailable_reason() -> str | None:
    """None when SPICE can run, else the reason it cannot."""
    lib = _pycocoevalcap_dir() / "spice" / "lib"
    missing = [
        f"{CORENLP}{s}.jar" for s in ("", "-models") if not (lib / f"{CORENLP}{s}.jar").exists()
    ]
    if missing:
        return f"Stanford CoreNLP models missing from {lib}: {', '.join(missing)}"
    if not java_available():
        return "no Java runtime on PATH"
    return None


def spice(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    cache_dir: str | Path | None = None,
) -> tuple[float, list[float]]:
    """Mean SPICE F-score and per-candidate scores (English)."""
    reason = spice_unavailable_reason()
    if reason:
        raise SpiceUnavailable(reason)
    jar = _pycocoevalcap_dir() / "spice" / "spice-1.0.jar"
    cache = Path(cache_dir or Path.home() / ".cache" / "bimac" / "spice")
    cache.mkdir(parents=True, exist_ok=True)
    data = [
        {"image_id": i, "test": c, "refs": list(r)}
        for i, (c, r) in enumerate(zip(candidates, references))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        Path(src).write_text(json.dumps(data))
        cmd = ["java", "-jar", "-Xmx8G", str(jar), src, "-cache", str(cache), "-out", dst]
        subprocess.run(cmd + ["-subset", "-silent"], check=True, cwd=jar.parent)
        results = json.loads(Path(dst).read_text())
    by_id = {r["image_id"]: float(r["scores"]["All"]["f"]) for r in results}
    per = [by_id[i] for i in range(len(data))]
    return (sum(per) / len(per) if per else 0.0), per
