"""The claims map cannot rot: every test or benchmark that README.md, RELIABILITY.md,
BENCHMARKS.md or RESULTS.md names as the proof of a claim must exist.

A reference is written ``tests/FILE.py::test_name`` (``::other_test`` right after it reuses
FILE; a bare ``test_x.py`` is refused, so every citation reads the same); a benchmark target
names ``benchmarks/NAME.py`` and, where it has one, its JSON key as ``benchmarks/NAME.py:key``
(the key must appear in that benchmark's source).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "RELIABILITY.md", "BENCHMARKS.md", "RESULTS.md")
TEST_REF = re.compile(r"(?:(tests/test_\w+\.py)|(?<![\w/])(test_\w+\.py))?::(test_\w+)")
BARE_FILE = re.compile(r"(?<![\w/.])test_\w+\.py")
BENCH_REF = re.compile(r"benchmarks/(\w+\.(?:py|sh))(?::([\w.@/{},-]+))?")


@cache
def defined_tests(path: Path) -> frozenset[str]:
    """Names of the test functions in a test module, methods of test classes included."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith(
            "test"
        ):
            names.add(node.name)
    return frozenset(names)


def named_tests(text: str) -> list[tuple[str, str]]:
    """``(file, test)`` pairs named in ``text``; a bare ``::name`` reuses the file before it."""
    refs, last = [], None
    for full, bare, name in TEST_REF.findall(text):
        if full or bare:
            last = full or f"tests/{bare}"
        if last is None:
            raise AssertionError(f"'::{name}' names no file before it")
        refs.append((last, name))
    return refs


def documented_refs() -> list[tuple[str, str, str]]:
    out = []
    for doc in DOCUMENTS:
        path = REPO / doc
        if path.is_file():
            out += [(doc, f, n) for f, n in named_tests(path.read_text())]
    return out


def test_reference_parser_reads_full_bare_and_continued_names():
    text = "`tests/test_a.py::test_x`, `::test_y`; `test_b.py::test_z` and test_c.py"
    assert named_tests(text) == [
        ("tests/test_a.py", "test_x"),
        ("tests/test_a.py", "test_y"),
        ("tests/test_b.py", "test_z"),
    ]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_documents_cite_test_files_by_their_path(doc):
    text = (REPO / doc).read_text()
    assert BARE_FILE.findall(text) == [], f"{doc}: write tests/test_x.py, not test_x.py"


def test_the_documents_name_tests():
    # the map must exist at all: RELIABILITY.md alone names dozens of proving tests
    assert len(documented_refs()) >= 20


@pytest.mark.parametrize("doc,file,name", documented_refs())
def test_every_named_test_exists(doc, file, name):
    path = REPO / file
    assert path.is_file(), f"{doc} names {file}::{name}, but {file} does not exist"
    assert name in defined_tests(path), f"{doc} names {file}::{name}, which {file} does not define"


def benchmark_refs() -> list[tuple[str, str, str]]:
    out = []
    for doc in DOCUMENTS:
        path = REPO / doc
        if path.is_file():
            out += [(doc, b, key) for b, key in BENCH_REF.findall(path.read_text())]
    return sorted(set(out))


@pytest.mark.parametrize("doc,bench,key", benchmark_refs())
def test_every_named_benchmark_and_key_exists(doc, bench, key):
    path = REPO / "benchmarks" / bench
    assert path.is_file(), f"{doc} names benchmarks/{bench}, which does not exist"
    if key:
        leaf = key.split(".")[-1]
        assert leaf in path.read_text(), f"{doc} names key {key!r} that {bench} never writes"
