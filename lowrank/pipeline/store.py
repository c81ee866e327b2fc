"""A content-addressed store of stage outputs: every configuration's artifacts kept side by side.

A stage's fingerprint hashes what its result depends on: its name, the params
sections it declares, the library's code, and its inputs, named by the
fingerprints of the stages that make them (those stand for their content: a
stage writes the same bytes for the same fingerprint). So the whole graph of a
configuration is known before anything runs, a sweep can see which stages its
configurations share, and each stage writes to
`<paths.artifacts>/store/<stage>/<fingerprint>/`, a folder no other
configuration writes to.

An entry is finished when its `result.json` exists, written last; a lock file
per fingerprint lets one process (of a sweep, a run, or two of them at once)
compute an entry while the others wait for it and then reuse it.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from filelock import FileLock

import lowrank
from lowrank.config import Params, select, to_dict
from lowrank.io.files import atomic_dir, read_json, write_json
from lowrank.pipeline.stage import Layout, StageResult, get_stage

STORE = "store"  # the store's folder under paths.artifacts
RECORD = "result.json"  # written last: an entry without it is unfinished
DIGEST_CHARS = 16  # of the fingerprint, in folder names (64 bits: no collision among a project's entries)


class _Docstrings(ast.NodeTransformer):
    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        # A string statement does nothing when run (a docstring, or a note after a field): it is not the code's meaning.
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return node


def source_digest(root: Path) -> str:
    """Hash of what the modules under `root` do: their syntax trees without docstrings or comments.

    Comments never reach the tree, and ast.dump leaves out line numbers, so
    rewording or moving text keeps every fingerprint; any changed expression
    gives new ones. (The dump's form follows the Python version: another
    Python reruns the stages, as it may change their numbers.)
    """
    hasher = hashlib.sha256(lowrank.__version__.encode())
    for file in sorted(root.rglob("*.py")):
        tree = _Docstrings().visit(ast.parse(file.read_bytes(), filename=str(file)))
        hasher.update(file.relative_to(root).as_posix().encode())
        hasher.update(ast.dump(tree).encode())
    return hasher.hexdigest()


@lru_cache(maxsize=1)
def code_digest() -> str:
    """The library's `source_digest`: a change to what `lowrank/` does gives every stage a new fingerprint."""
    return source_digest(Path(lowrank.__file__).parent)


def fingerprints(params: Params, names: Iterable[str]) -> dict[str, str]:
    """The fingerprint of each stage in `names` and of every stage upstream of them."""
    found: dict[str, str] = {}

    def visit(name: str) -> str:
        if name not in found:
            st = get_stage(name)
            facts = {
                "stage": name,
                "params": {key: to_dict(select(params, key)) for key in st.params},
                "inputs": {key: f"{visit(up)}/{out}" for key, (up, out) in st.input_refs().items()},
                "code": code_digest(),
            }
            sources = st.sources(params) if st.sources else {}
            if sources:  # only then: the fingerprints of stages without any stay as they were
                facts["sources"] = sources
            found[name] = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
        return found[name]

    for name in names:
        visit(name)
    return found


@dataclasses.dataclass(frozen=True)
class StoreLayout(Layout):
    """Each stage's paths inside its own store entry; `artifacts` and `metrics` stay the workspace's."""

    fingerprints: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def for_params(cls, params: Params, names: Iterable[str]) -> "StoreLayout":
        base = Layout.from_params(params)
        return cls(base.artifacts, base.metrics, fingerprints(params, names))

    def entry(self, stage: str) -> Path:
        return self.artifacts / STORE / stage / self.fingerprints[stage][:DIGEST_CHARS]

    def artifacts_of(self, stage: str) -> Path:
        return self.entry(stage)

    def metrics_of(self, stage: str) -> Path:
        return self.entry(stage) / "metrics"

    def workspace(self) -> Layout:
        return Layout(self.artifacts, self.metrics)


def _record(result: StageResult) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(result), default=str))


def finished(name: str, layout: StoreLayout) -> StageResult | None:
    """The stored result of an entry whose outputs are all still there, else None."""
    record = layout.entry(name) / RECORD
    if not record.is_file():
        return None
    if not all(path.exists() for path in get_stage(name).written_paths(layout).values()):
        return None  # someone deleted part of it: compute it again
    return StageResult(**read_json(record))


def run_stored(name: str, params: Params, layout: StoreLayout, refresh: bool = False) -> tuple[StageResult, bool]:
    """The stage's result from the store, computing it first if no process has; returns (result, cached).

    The lock is per fingerprint: two processes wanting the same entry compute it once.
    `refresh` computes it again whatever the store holds (`orchestration.cache: false`).
    """
    entry = layout.entry(name)
    if not refresh and (result := finished(name, layout)) is not None:
        return result, True
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if not refresh and (result := finished(name, layout)) is not None:
            return result, True
        if entry.exists():  # an attempt that died, or outputs someone deleted part of
            shutil.rmtree(entry)
        record = _record(get_stage(name).run(params, layout))
        write_json(entry / RECORD, record)
    return StageResult(**record), False  # the JSON form, as a later hit reads it


def _link_file(source: str | Path, target: str | Path) -> None:
    """Hard-link a file (a copy where links fail): the workspace view costs no space."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def materialize(name: str, layout: StoreLayout) -> None:
    """Put a stored stage's outputs, plots, reports and metrics at its workspace paths (what DVC and users read).

    Each path is replaced whole by a rename, so a reader sees the old or the new one, never a mix.
    Writers never modify a file in place, so the links cannot change the store behind its back.
    """
    st, workspace = get_stage(name), layout.workspace()
    stored, target = st.written_paths(layout), st.written_paths(workspace)
    moves = [(stored[key], target[key]) for key in stored] + [(st.metrics_path(layout), st.metrics_path(workspace))]
    for source, dest in moves:
        if not source.exists():
            continue
        if source.is_dir():
            with atomic_dir(dest) as tmp:
                tmp.rmdir()  # copytree makes it
                shutil.copytree(source, tmp, copy_function=_link_file)
        elif not (dest.exists() and os.path.samefile(source, dest)):
            # (renaming a link onto another link of the same file does nothing and would leave the temporary name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-link")
            tmp.unlink(missing_ok=True)
            _link_file(source, tmp)
            os.replace(tmp, dest)
