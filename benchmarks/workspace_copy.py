"""Benchmark (issue 34): what the workspace costs now that it holds copies of the store, not hard links.

Reads a finished run of `--params` (run `lowrank run -p PARAMS` first, same code version) and measures, for
its stages' workspace paths: the bytes the store holds, the bytes the copies add (allocated blocks of files
that share no inode with the store; a reflink shares blocks, so it adds ~0 on btrfs or XFS), and the seconds
to build the workspace from scratch with copies and with hard links, and to publish again when nothing
changed (the quick size-and-mtime check). Timings on a loaded machine are noise: run it on a quiet one.

    .venv/bin/python benchmarks/workspace_copy.py --params params.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from unittest import mock

from lowrank.config import load_params
from lowrank.pipeline import Layout, get_stage, pipeline
from lowrank.pipeline import workspace
from lowrank.pipeline.store import fingerprints, finished


def _files(paths: list[Path]) -> list[Path]:
    return [f for p in paths if p.exists() for f in ([p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()])]


def _clear(layout: Layout, names: list[str]) -> list[Path]:
    """Remove the stages' workspace paths; returns them."""
    paths = [p for name in names for p in (*get_stage(name).written_paths(layout.workspace()).values(),
                                           get_stage(name).metrics_path(layout.workspace()))]
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return paths


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    names = pipeline(params)
    layout = Layout.from_params(params, fingerprints(params, names))
    if any(finished(name, layout) is None for name in names):
        raise SystemExit(f"the store holds no finished run of {args.params}: run `lowrank run -p {args.params}` first")
    publish = lambda: workspace.publish(params, names, layout)  # noqa: E731
    paths = _clear(layout, names)
    copy_s = _timed(publish)
    stored = {os.stat(f).st_ino for name in names for f in layout.entry(name).rglob("*") if f.is_file()}
    copies = [f for f in _files(paths) if os.stat(f).st_ino not in stored]
    again_s = _timed(publish)
    _clear(layout, names)
    with mock.patch.object(workspace, "copy_file", os.link):  # the hard links of before, for comparison
        link_s = _timed(publish)
    _clear(layout, names)
    publish()
    report = {
        "params": args.params, "stages": len(names),
        "store_mib": round(sum(f.stat().st_size for name in names for f in layout.entry(name).rglob("*") if f.is_file()) / 2**20, 2),
        "workspace_files": len(copies),
        "workspace_allocated_mib": round(sum(os.stat(f).st_blocks * 512 for f in copies) / 2**20, 2),
        "publish_with_copies_s": round(copy_s, 3), "publish_with_hard_links_s": round(link_s, 3),
        "publish_again_unchanged_s": round(again_s, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
