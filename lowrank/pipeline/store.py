"""A content-addressed store of stage outputs: every configuration's artifacts kept side by side.

A stage's fingerprint hashes what its result depends on: its name, the params
sections it declares, the library's code, and its inputs, named by the
fingerprints of the stages that make them (those stand for their content: a
stage writes the same bytes for the same fingerprint). So the whole graph of a
configuration is known before anything runs, a sweep can see which stages its
configurations share, and each stage writes to
`<paths.artifacts>/store/<stage>/<fingerprint>/`, a folder no other
configuration writes to: a `Layout` given the fingerprints puts its paths there.

An entry is finished when its `result.json` exists, written last, and its
files still have the sizes and SHA-256 hashes it lists, and the entries it read
still hold the bytes it records it read (so a damaged entry, once rebuilt,
reaches everything below it). Finished files are read-only. A lock file per
fingerprint lets one process (of a sweep, a run, or two of them at once)
compute an entry while the others wait for it and then reuse it.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from filelock import FileLock

import lowrank
from lowrank.config import Params, select, to_dict
from lowrank.io.files import read_json, write_json
from lowrank.io.manifest import READ_ONLY, build_manifest, copy_file, make_read_only, manifest_digest, verify
from lowrank.pipeline.plan import upstream
from lowrank.pipeline.stage import STAGES, Layout, StageResult, get_stage, numeric

RECORD = "result.json"  # written last: an entry without it is unfinished
STATE = ".verified.json"  # each file's stat when it was last hashed (lowrank.io.manifest)


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


def _record(result: StageResult) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(result), default=str))


def _result(record: dict) -> StageResult:
    return StageResult(**{field.name: record[field.name] for field in dataclasses.fields(StageResult) if field.name in record})


def check_entry(name: str, layout: Layout, seen: dict | None = None) -> tuple[dict | None, str | None]:
    """The entry's record if it, and every entry upstream of it, still holds what it recorded; else why not.

    Returns (record, None) when whole, (None, None) when never finished, and
    (None, problem) when finished once but no longer to be trusted: a file
    missing, resized or changed (the hash is computed only for files whose stat
    changed since they were last hashed), or an upstream entry whose bytes are
    not those this one was computed from. So a damaged entry can never leave
    the entries below it looking finished.
    """
    seen = {} if seen is None else seen
    if name in seen:
        return seen[name]
    entry = layout.entry(name)
    try:
        record = read_json(entry / RECORD)
    except FileNotFoundError:
        found: tuple[dict | None, str | None] = (None, None)
    except (OSError, ValueError) as err:
        found = (None, f"{entry / RECORD} is unreadable ({err})")
    else:
        found = (record, _problem(name, layout, record, seen))
        if found[1]:
            found = (None, found[1])
    seen[name] = found
    return found


def _problem(name: str, layout: Layout, record: dict, seen: dict) -> str | None:
    entry, st = layout.entry(name), get_stage(name)
    if not isinstance(record, dict) or "files" not in record:
        return f"{entry / RECORD} lists no file hashes (an older lowrank wrote it)"
    if problem := verify(entry, record["files"], entry / STATE):
        return problem
    if missing := [str(p) for p in st.written_paths(layout).values() if not p.exists()]:
        return f"{missing[0]} is missing"
    for key, (up, _) in st.input_refs().items():
        upstream, _ = check_entry(up, layout, seen)
        if upstream is None:
            return f"its input entry {layout.entry(up)} is not finished"
        if input_digest(name, key, layout, upstream) != record.get("inputs", {}).get(key):
            return f"its input {key} ({st.input_paths(layout)[key]}) holds other bytes than it was computed from"
    return None


def input_digest(name: str, key: str, layout: Layout, upstream: dict) -> str:
    """The hash of what stage `name` reads as input `key`: the manifest rows of that output in its upstream's record.

    Only what it reads: the upstream's metrics file holds timings, which differ from one computation to the next.
    """
    up, _ = get_stage(name).input_refs()[key]
    prefix = get_stage(name).input_paths(layout)[key].relative_to(layout.entry(up)).as_posix()
    return manifest_digest({rel: row for rel, row in upstream["files"].items() if rel == prefix or rel.startswith(prefix + "/")})


def finished(name: str, layout: Layout) -> StageResult | None:
    """The stored result of an entry that, with everything upstream of it, still holds what it recorded; else None."""
    record, _ = check_entry(name, layout)
    return None if record is None else _result(record)


def unfinished_upstream(name: str, layout: Layout) -> list[str]:
    """The stages `name` reads, directly or not, whose entries are not finished (in run order): what it computes first."""
    above = upstream(name) - {name}
    seen: dict = {}
    return [up for up in STAGES if up in above and check_entry(up, layout, seen)[0] is None]


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_stored(
    name: str, params: Params, layout: Layout, refresh: bool = False, trusted_workspace: bool = False,
) -> tuple[StageResult, bool]:
    """The stage's result from the store, computing it first if no process has; returns (result, cached).

    The lock is per fingerprint: two processes wanting the same entry compute it once.
    `refresh` computes it again whatever the store holds (`orchestration.cache: false`).
    An entry that fails its check is said so, naming the file, and computed again, after its inputs.
    `trusted_workspace` (under `dvc repro`): an upstream entry the store lacks is made from the workspace's files of
    that stage when they are all there, not computed again (see `from_workspace`); the stage itself is always computed.
    """
    return _stored(name, params, layout, refresh, adopt=False, adopt_upstream=trusted_workspace)


def _stored(name: str, params: Params, layout: Layout, refresh: bool, adopt: bool, adopt_upstream: bool) -> tuple[StageResult, bool]:
    entry, st = layout.entry(name), get_stage(name)
    if not refresh and (result := finished(name, layout)) is not None:
        return result, True
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        # Inputs first: one damaged since the caller checked it is computed again (locks go downstream to upstream
        # only), and if it comes back with the bytes this entry was computed from, the entry stands.
        inputs = {key: input_digest(name, key, layout, _record_of(up, params, layout, adopt_upstream))
                  for key, (up, _) in st.input_refs().items()}
        record, problem = check_entry(name, layout)
        if not refresh and record is not None:
            return _result(record), True
        if problem:
            _say(f"store: {name}: {problem}; computing it again")
        if entry.exists():  # an attempt that died, a damaged entry, or outputs someone deleted part of
            shutil.rmtree(entry)
        result = from_workspace(name, layout) if adopt else None
        if result is not None:
            _say(f"store: {name}: made from the workspace's files (DVC checked them against dvc.lock), not computed again")
        record = _record(result if result is not None else st.run(params, layout))
        make_read_only(entry)  # first: the chmod moves each file's ctime, which the manifest's state records
        record.update(files=build_manifest(entry, skip=(RECORD, STATE), state=entry / STATE), inputs=inputs)
        write_json(entry / RECORD, record)  # last: the entry counts as finished from here
        (entry / RECORD).chmod(READ_ONLY)
    return _result(record), False  # the JSON form, as a later hit reads it


def from_workspace(name: str, layout: Layout) -> StageResult | None:
    """Copy the workspace's files of stage `name` into its (empty) store entry; None when any of them is missing.

    Only under `dvc repro`, for a stage upstream of the one DVC runs: DVC runs a stage after making sure every
    stage above it is up to date, so the workspace's files of those stages are what their params and code give
    (DVC checked them against dvc.lock's hashes when it pulled or checked them out). On a machine whose store is
    empty (a clone, then `dvc pull`), computing them again would cost the fine-tuning the remote already holds.
    """
    st, workspace = get_stage(name), layout.workspace()
    pairs = list(zip([*st.written_paths(workspace).values(), st.metrics_path(workspace)],
                     [*st.written_paths(layout).values(), st.metrics_path(layout)]))
    if not all(source.exists() for source, _ in pairs):
        return None
    for source, dest in pairs:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, copy_function=copy_file)
        else:
            copy_file(source, dest)
    io = st.io(layout)
    plots = [str(path) for path in (*io.plots.values(), *io.reports.values()) if path.is_file()]
    return StageResult({k: str(v) for k, v in io.outputs.items()}, numeric(read_json(io.metrics)),
                       {"from_workspace": True, **({"plots": plots} if plots else {})})


def _record_of(name: str, params: Params, layout: Layout, adopt: bool = False) -> dict:
    _stored(name, params, layout, refresh=False, adopt=adopt, adopt_upstream=adopt)
    record, problem = check_entry(name, layout)
    if record is None:
        raise RuntimeError(f"store: {name}: {problem or 'not finished'} right after it was computed")
    return record
