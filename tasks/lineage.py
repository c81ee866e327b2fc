"""Artifact hashes for lineage, computed the way DVC computes them.

With the same md5 (`<hash>.dir` for folders) as `dvc.lock`, an MLflow run
points at the exact data and model in DVC's cache, whichever driver made it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from dvc_data.hashfile.build import build
from dvc_data.hashfile.db import HashFileDB
from dvc_objects.fs.local import LocalFileSystem
from dvc_objects.fs.memory import MemoryFileSystem


def dvc_md5(path: str | Path) -> str | None:
    """DVC's md5 of a file or folder, or None if it does not exist."""
    path = Path(path).resolve()
    if not path.exists():
        return None
    odb = HashFileDB(MemoryFileSystem(), "/lowrank-lineage")
    _, _, obj = build(odb, str(path), LocalFileSystem(), "md5", dry_run=True)
    return obj.hash_info.value


@functools.lru_cache(maxsize=None)
def stored_md5(path: str) -> str | None:
    """`dvc_md5` of a store entry's artifact, taken once per process.

    A finished store entry never changes (computed again, it has the same bytes): the dense model that
    every configuration of a sweep reads is not hashed again for each of them.
    """
    return dvc_md5(path)
