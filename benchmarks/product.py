"""How benchmarks run the product: as a sweep (`run_sweep`, a `lowrank sweep` subprocess on a spec under
benchmarks/specs/ or one a script writes), so that every benchmark shares the store, the cache and the
engines a user's sweep has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank.pipeline.sweep_plan import Configuration, plan, sweep_spec


# params.yaml's + ft distils from the dense model in two stages (issue 32); a benchmark that measures N epochs of
# plain + ft, as the earlier tables did, turns the teacher off.
PLAIN_FT = ["finetune_compressed.distill.enabled=false"]


def spec_path(text: str) -> Path:
    """argparse type of a script's --spec: resolved, so that its report can name it relative to the repository."""
    return Path(text).resolve()


def configurations(spec: Path, overrides: list[str]) -> list[Configuration]:
    """The configurations `run_sweep(spec, overrides)` ran, in its summary's order, with their store layouts
    (where each stage's metrics are)."""
    configs, _ = plan("params.yaml", sweep_spec("params.yaml", spec, overrides), overrides, check=False)
    return configs


def run_sweep(spec: Path, overrides: list[str], options: list[str] = ()) -> tuple[dict[str, Any], float]:
    """`lowrank sweep --spec SPEC -S ...` in a subprocess, as a user runs it; returns its JSON summary and the command's seconds.

    A configuration that failed stops the benchmark with its error: a table with a hole would mislead.
    """
    import json
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    command = [str(root / ".venv" / "bin" / "lowrank"), "--quiet", "sweep", "--spec", str(spec), *options]
    for override in overrides:
        command += ["-S", override]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    summary = json.loads(done.stdout) if done.stdout.strip() else {}
    if done.returncode != 0:
        failed = [f"{c['overrides']}: {c.get('error')}" for c in summary.get("configs", []) if c["status"] != "completed"]
        sys.exit(f"lowrank sweep failed ({done.returncode}): {failed or done.stderr[-4000:]}")
    return summary, seconds
