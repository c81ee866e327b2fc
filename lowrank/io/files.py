"""Atomic writes and content digests.

A crash must never leave a half-written artifact that a rerun would mistake
for a finished one: everything is written under a temporary name in the same
folder, then renamed into place (a rename within one filesystem is atomic).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file under a temporary name, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write pretty, key-sorted JSON (stable bytes for DVC and diffs)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write_bytes(path, text.encode())


def read_json(path: str | Path) -> Any:
    """Read JSON, naming the file if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected file not found: {path}")
    return json.loads(path.read_text())


def _file_sha256(path: Path, hasher: "hashlib._Hash") -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)


def digest(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's relative paths and file contents.

    Caches key on this, so it must not depend on mtimes or on the folder's location.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot hash missing artifact: {path}")
    hasher = hashlib.sha256()
    if path.is_file():
        _file_sha256(path, hasher)
        return hasher.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        hasher.update(file.relative_to(path).as_posix().encode() + b"\0")
        _file_sha256(file, hasher)
    return hasher.hexdigest()


def check_writable(folder: str | Path) -> None:
    """Fail early, naming the folder, if outputs could not be written there."""
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not os.access(probe_dir, os.W_OK):
        raise PermissionError(f"output folder is not writable: {folder} (checked {probe_dir})")
