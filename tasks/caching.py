"""Cache keys for stage tasks: params section + upstream content + library code.

Prefect's stock policies do not fit: `INPUTS` hashes a path as its string, not
the file behind it, and `TASK_SOURCE` hashes the task's few lines, not the
library they call. So the key is built from the same three things DVC tracks.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import lowrank
from lowrank.config import Params, select, to_dict
from lowrank.io.files import digest
from lowrank.pipeline import Layout, get_stage


@lru_cache(maxsize=1)
def code_digest() -> str:
    """Hash of the library's source: any change to `lowrank/` invalidates every stage."""
    root = Path(lowrank.__file__).parent
    hasher = hashlib.sha256(lowrank.__version__.encode())
    for file in sorted(root.rglob("*.py")):
        hasher.update(file.relative_to(root).as_posix().encode())
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def stage_fingerprint(name: str, params: Params) -> dict[str, Any]:
    """The facts a stage's result depends on, in a JSON-able form."""
    stage = get_stage(name)
    layout = Layout.from_params(params)
    return {
        "stage": name,
        "params": {key: to_dict(select(params, key)) for key in stage.params},
        "inputs": {key: digest(path) for key, path in stage.input_paths(layout).items()},
        "outputs": {key: str(path) for key, path in stage.written_paths(layout).items()},
        "code": code_digest(),
    }


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: sha256 of `stage_fingerprint`."""
    fingerprint = stage_fingerprint(parameters["name"], parameters["params"])
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
