"""A stage's fingerprint follows what the library's code does, not how it is worded.

Each test edits a copy of `lowrank/` (every docstring, every comment, or one
number) and computes the fingerprints of the whole pipeline from that copy.
"""

from __future__ import annotations

import ast
import io
import shutil
import tokenize
from pathlib import Path

import pytest

import lowrank
from conftest import GLUE_DIR, tiny_params
from lowrank.config import load_params
from lowrank.pipeline import pipeline
from lowrank.pipeline import store


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    """A copy of the library's source."""
    copy = tmp_path / "lowrank"
    shutil.copytree(Path(lowrank.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _fingerprints(tmp_path: Path, monkeypatch, package: Path) -> dict[str, str]:
    """Every stage's fingerprint of the tiny pipeline, with `package` as the library's code."""
    digest = store.source_digest(package)
    monkeypatch.setattr(store, "code_digest", lambda: digest)
    params = load_params(tiny_params(tmp_path, tmp_path / "model", GLUE_DIR))
    return store.fingerprints(params, pipeline(params))


def _reworded(source: str) -> str:
    """`source` with every comment and docstring reworded, and a comment line above it all (moving every line)."""
    lines = source.splitlines(keepends=True)
    comments = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    for token in reversed(comments):  # from the end: an edit leaves the positions before it in place
        (row, col), (_, end) = token.start, token.end
        lines[row - 1] = lines[row - 1][:col] + "# reworded" + lines[row - 1][end:]
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
            doc = node.body[0].value
            line = lines[doc.lineno - 1]
            if line[doc.col_offset:doc.col_offset + 3] in ('"""', "'''"):
                lines[doc.lineno - 1] = line[:doc.col_offset + 3] + "Reworded. " + line[doc.col_offset + 3:]
    return "# a new first line\n" + "".join(lines)


def test_docstrings_and_comments_keep_every_fingerprint(tmp_path: Path, monkeypatch, package: Path) -> None:
    before = _fingerprints(tmp_path, monkeypatch, package)
    for file in package.rglob("*.py"):
        file.write_text(_reworded(file.read_text()))
    assert store.source_digest(package) == store.source_digest(Path(lowrank.__file__).parent)
    assert _fingerprints(tmp_path, monkeypatch, package) == before


def test_an_edited_expression_gives_every_stage_a_new_fingerprint(tmp_path: Path, monkeypatch, package: Path) -> None:
    before = _fingerprints(tmp_path, monkeypatch, package)
    # The first integer written in the library, plus one.
    file, number = min(
        ((file, n) for file in package.rglob("*.py") for n in ast.walk(ast.parse(file.read_text()))
         if isinstance(n, ast.Constant) and type(n.value) is int),
        key=lambda found: (str(found[0]), found[1].lineno, found[1].col_offset),
    )
    lines = file.read_text().splitlines(keepends=True)
    line = lines[number.lineno - 1]
    lines[number.lineno - 1] = line[:number.col_offset] + str(number.value + 1) + line[number.end_col_offset:]
    file.write_text("".join(lines))
    after = _fingerprints(tmp_path, monkeypatch, package)
    assert set(after) == set(before) and all(after[name] != before[name] for name in before)
