"""The workspace: one configuration's artifacts at the paths `params.yaml` names, copied out of the store.

DVC and users read `artifacts/<stage>/...` and `metrics/<stage>.json`. A run
swaps them all at once, at its end, under one lock, and then writes
`artifacts/WORKSPACE.json` naming its configuration and the store entries the
files come from: two runs in one folder leave the workspace of the one that
finished last, never a mix, and a swap cut short leaves no `WORKSPACE.json`.
`lowrank stage NAME` (what `dvc repro` runs) puts one stage's files there
(`publish_stage`) and removes `WORKSPACE.json`: the workspace is then DVC's.
The files are copies (reflinks where the filesystem has them), not links:
editing one never reaches the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from filelock import FileLock

from lowrank.config import Params, flatten
from lowrank.io.files import atomic_dir, write_json
from lowrank.io.manifest import copy_file, same_copy, same_tree
from lowrank.pipeline.stage import Layout, get_stage

RECORD = "WORKSPACE.json"  # under paths.artifacts
LOCK = ".workspace.lock"


def materialize(name: str, layout: Layout) -> None:
    """Put a stored stage's outputs, plots, reports and metrics at its workspace paths.

    Each path is replaced whole by a rename, so a reader sees the old or the new one, never a mix;
    a path that already holds an untouched copy of the entry is left as it is.
    """
    st, workspace = get_stage(name), layout.workspace()
    stored, target = st.written_paths(layout), st.written_paths(workspace)
    moves = [(stored[key], target[key]) for key in stored] + [(st.metrics_path(layout), st.metrics_path(workspace))]
    for source, dest in moves:
        if not source.exists():
            continue
        if source.is_dir():
            if not same_tree(source, dest):
                with atomic_dir(dest) as tmp:
                    tmp.rmdir()  # copytree makes it
                    shutil.copytree(source, tmp, copy_function=copy_file)
        elif not same_copy(source, dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-copy")
            tmp.unlink(missing_ok=True)
            copy_file(source, tmp)
            os.replace(tmp, dest)


def publish(params: Params, names: Iterable[str], layout: Layout) -> Path:
    """Swap the workspace to this configuration as a whole: every stage's files, then `WORKSPACE.json`."""
    names = list(names)
    layout.artifacts.mkdir(parents=True, exist_ok=True)
    with FileLock(str(layout.artifacts / LOCK)):
        (layout.artifacts / RECORD).unlink(missing_ok=True)  # a swap cut short (a kill, a full disk) claims no configuration
        for name in names:
            materialize(name, layout)
        values = flatten(params)
        return write_json(layout.artifacts / RECORD, {
            "configuration": hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest(),
            "params": values,
            "stages": {name: {"fingerprint": layout.fingerprints[name], "entry": str(layout.entry(name))} for name in names},
        })


def publish_stage(name: str, layout: Layout) -> None:
    """Put one stored stage's files at the workspace paths dvc.yaml declares, for `lowrank stage NAME`."""
    layout.artifacts.mkdir(parents=True, exist_ok=True)
    with FileLock(str(layout.artifacts / LOCK)):
        # Once DVC runs stages one at a time, the workspace is no longer one run's configuration: `dvc exp run -S`
        # or a `dvc checkout` swaps some stages' files and not others, and lowrank never hears of it. dvc.lock records
        # what each stage's files are (params and hashes) and DVC keeps it true; a WORKSPACE.json beside it, even one
        # updated a row at a time, would go stale at the first checkout. So a stage run removes it (the next
        # `lowrank run` writes it again) rather than leave a claim on a whole configuration nobody keeps.
        (layout.artifacts / RECORD).unlink(missing_ok=True)
        materialize(name, layout)
