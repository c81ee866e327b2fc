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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


# Temporary names carry the writer's pid, so that a later run can tell a dead writer's leftovers
# (SIGKILL leaves them) from a live one's: `.model.tmp-<pid>-<random>`, `.model.old-<pid>`.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def _temporary_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders that writers which have died left under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [
        path for path in folder.rglob(".*")
        if (match := _TEMPORARY.match(path.name)) and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))
    ]
    for path in stale:  # listed first: the walk must not step into a folder being removed
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final), dir=final.parent))
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
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# safetensors writes its metadata map in hash order, which changes from one process to the next;
# one key holding sorted JSON keeps the file's bytes the same for the same content.
METADATA_KEY = "lowrank"


def safetensors_bytes(tensors: dict[str, Any], info: dict[str, Any]) -> bytes:
    """A safetensors file's bytes, with `info` as its (single-key) metadata: the same inputs, the same bytes."""
    from safetensors.torch import save

    return save(tensors, metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})


@contextlib.contextmanager
def _readable_safetensors(path: str | Path) -> Iterator[None]:
    """A truncated or corrupt safetensors file is one line naming it (an InputError), not safetensors' traceback."""
    from safetensors import SafetensorError

    from lowrank.config.base import InputError

    try:
        yield
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())})") from None


def safetensors_info(path: str | Path) -> dict[str, Any]:
    """The metadata `safetensors_bytes` wrote (older files: their plain key-value metadata)."""
    from safetensors import safe_open

    with _readable_safetensors(path), safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else dict(metadata)


def load_tensors(path: str | Path) -> dict[str, Any]:
    """Every tensor of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    with _readable_safetensors(path):
        return load_file(str(path))


def check_safetensors(path: str | Path) -> None:
    """Read a safetensors file's header (not its tensors): fails, naming the file, on a truncated or corrupt one."""
    from safetensors import safe_open

    with _readable_safetensors(path), safe_open(str(path), "pt") as handle:
        handle.keys()


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


def check_writable(folder: str | Path, key: str = "paths") -> None:
    """Fail early, naming the key and folder, unless a file can be created (and removed) there.

    Probes the folder, or its nearest existing parent when it does not exist
    yet, by creating a file: `os.access` says yes to /proc and to read-only
    mounts, where every write then fails.
    """
    from lowrank.config.base import InputError

    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(f"{probe_dir} is not a folder")
        with tempfile.NamedTemporaryFile(prefix=".lowrank-probe-", dir=probe_dir):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise InputError(f"{key}: cannot write in {folder} (tried {probe_dir}: {reason})") from None
