"""What a folder held when it was finished, and whether it still holds it: sizes and SHA-256 per file.

A manifest maps each file's path (relative to the folder) to its size and
SHA-256. Checking a folder against it costs a `stat` per file: the size always,
and the hash only for a file whose (size, mtime, inode, ctime) differs from the
last time it was hashed, as DVC's state db does; those signatures live in a small
state file beside the manifest, rewritten when a file was hashed again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Iterable

from lowrank.io.files import read_json, write_json

READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _signature(status: os.stat_result) -> list[int]:
    # ctime too: a writer that restores the mtime (cp -p, touch -r) still moves the ctime.
    return [status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns]


def _files(folder: Path, skip: Iterable[str]) -> list[Path]:
    skipped = set(skip)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skipped)


def build_manifest(folder: str | Path, skip: Iterable[str] = (), state: str | Path | None = None) -> dict[str, dict]:
    """Size and SHA-256 of every file under `folder` except `skip`; the files' signatures go to `state`."""
    folder, files, seen = Path(folder), {}, {}
    for path in _files(folder, skip):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
        seen[rel] = _signature(path.stat())
    if state is not None:
        write_json(state, seen)
    return files


def manifest_digest(files: dict[str, dict]) -> str:
    """One hash for a whole manifest: what a reader of the folder records about it."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _read_state(state: Path) -> dict[str, list[int]]:
    try:
        found = read_json(state)
    except (OSError, ValueError):  # none yet, or damaged: every file is hashed again
        return {}
    return found if isinstance(found, dict) else {}


def verify(folder: str | Path, files: dict[str, dict], state: str | Path) -> str | None:
    """None when every file of the manifest is under `folder` with its size and hash, else what differs (naming the file)."""
    folder, state = Path(folder), Path(state)
    known, changed = _read_state(state), False
    for rel, expected in sorted(files.items()):
        path = folder / rel
        try:
            status = path.stat()
        except OSError:
            return f"{path} is missing"
        if not stat.S_ISREG(status.st_mode):
            return f"{path} is not a regular file"
        if status.st_size != expected["size"]:
            return f"{path} has {status.st_size} bytes, {expected['size']} were stored"
        if known.get(rel) == _signature(status):
            continue
        if file_sha256(path) != expected["sha256"]:
            return f"{path} changed since it was stored (SHA-256 differs)"
        known[rel], changed = _signature(path.stat()), True
    if changed:
        try:
            write_json(state, known)
        except OSError:  # a read-only store still verifies, only not faster next time
            pass
    return None


def make_read_only(folder: str | Path) -> None:
    """Drop the write bits of every file under `folder` (folders stay writable, so the entry can still be removed whole)."""
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(READ_ONLY)


_FICLONE = 0x40049409  # Linux ioctl: share the source's blocks copy-on-write (btrfs, XFS, bcachefs)


def copy_file(source: str | Path, target: str | Path) -> None:
    """A copy of `source` with its own inode: a reflink where the filesystem has them, else the bytes.

    Keeps the source's mtime (a later `same_copy` check compares it) and makes the copy writable:
    editing it never reaches the source.
    """
    source, target = Path(source), Path(target)
    done = False
    try:
        import fcntl

        with source.open("rb") as src, target.open("wb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            done = True
    except (ImportError, OSError) as err:
        if isinstance(err, OSError) and err.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.EBADF):
            raise
    if not done:
        shutil.copyfile(source, target)
    status = source.stat()
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))
    target.chmod(0o644)


def same_copy(source: Path, target: Path) -> bool:
    """Whether `target` is an untouched `copy_file` of `source` (same size and mtime, and not the same inode)."""
    try:
        a, b = source.stat(), target.stat()
    except OSError:
        return False
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns and a.st_ino != b.st_ino


def same_tree(source: Path, target: Path) -> bool:
    """Whether the folder `target` holds exactly `source`'s files, each an untouched copy."""
    if not target.is_dir():
        return False
    theirs = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    ours = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    return theirs == ours and all(same_copy(source / rel, target / rel) for rel in ours)
