"""How benchmarks run the product: as a sweep (`run_sweep`, a `lowrank sweep` subprocess on a spec under
benchmarks/specs/), or, for the scripts not yet written as specs (lpaf.py, distill.py), one stage on folders
of their own (`call_stage`, the stage code `lowrank run` runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank.config import Params
from lowrank.io.files import read_json
from lowrank.pipeline import StageIO, get_stage


def call_stage(
    name: str, params: Params, metrics: Path, inputs: dict[str, Path] | None = None, outputs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Run stage `name` reading `inputs` and writing `outputs` (by the keys its declaration names); its metrics go to `metrics`."""
    st = get_stage(name)
    inputs, outputs = dict(inputs or {}), dict(outputs or {})
    missing = (set(st.inputs) - set(inputs)) | (set(st.outputs) - set(outputs))
    if missing:
        raise ValueError(f"stage {name}: no path given for {sorted(missing)}")
    beside = lambda rel: metrics.with_name(f"{metrics.stem}.{rel}")  # noqa: E731  plots and reports next to the metrics
    io = StageIO(
        {k: Path(v) for k, v in inputs.items()}, {k: Path(v) for k, v in outputs.items()},
        {k: beside(rel) for k, rel in st.plots.items()}, {k: beside(rel) for k, rel in st.reports.items()}, metrics,
    )
    st.fn(params, io)
    return read_json(metrics)


def cached(path: Path, make) -> dict:
    """`make()` writes the metrics file `path`; skipped when it exists (resume)."""
    if not path.is_file():
        make()
    return read_json(path)


def dense_runs(out: Path, params: Params) -> tuple[Path, Path, Path, Path]:
    """A benchmark task folder's shared stages, run once: (data, dense model, Fisher, metrics folder)."""
    data, dense, fisher, metrics = out / "data", out / "finetune" / "model", out / "fisher", out / "metrics"
    if not data.exists():
        call_stage("prepare", params, metrics / "prepare.json", outputs={"data": data})
    if not dense.exists():
        call_stage("finetune", params, metrics / "finetune.json", {"data": data}, {"model": dense})
    if not fisher.exists():
        call_stage("fisher", params, metrics / "fisher.json", {"model": dense, "data": data}, {"importance": fisher})
    return data, dense, fisher, metrics


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
