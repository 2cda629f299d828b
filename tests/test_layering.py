"""The library does not depend on its entry points: ``bimac`` imports no module of ``cli``,
``pretrain``, ``finetune``, ``shards`` or ``slurm``, neither at import time nor lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_PACKAGES = ("cli", "pretrain", "finetune", "shards", "slurm")

# a subprocess where the entry packages cannot be imported, then every module of bimac is
IMPORT_ALL = f"""
import importlib, importlib.abc, pkgutil, sys
BLOCKED = {ENTRY_PACKAGES!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the library imported the entry package {{name}}")

sys.meta_path.insert(0, Block())
import bimac
names = [m.name for m in pkgutil.walk_packages(bimac.__path__, "bimac.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_library_module_imports_without_the_entry_packages():
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) > 40  # every module was walked, not an empty package


def _entry_references(path: Path, root: Path = REPO) -> list[str]:
    """Imports of entry packages anywhere in ``path`` (also inside functions), and module-name
    strings such as ``"finetune.{}"`` that ``importlib`` could load."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.split(".")[0] in ENTRY_PACKAGES else []
            names = [n for n in names if "." in n and " " not in n]
        else:
            continue
        found += [f"{path.relative_to(root)}:{node.lineno}: {n}" for n in names
                  if n.split(".")[0] in ENTRY_PACKAGES]  # fmt: skip
    return found


def test_no_library_module_refers_to_an_entry_package():
    found = [ref for f in sorted((REPO / "bimac").rglob("*.py")) for ref in _entry_references(f)]
    assert found == []


def test_the_reference_check_sees_lazy_and_importlib_imports(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text(
        "import importlib\n\ndef f():\n    from pretrain import launch_local\n"
        "    return importlib.import_module('finetune.caption')\n"
    )
    refs = _entry_references(module, tmp_path)
    assert refs == ["probe.py:4: pretrain", "probe.py:5: finetune.caption"]
