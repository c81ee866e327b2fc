"""Running one stage inside a flow: from the store, then its MLflow run."""

from __future__ import annotations

import sys
import time

from lowrank.config import Params
from lowrank.pipeline import StageResult
from lowrank.pipeline.store import StoreLayout
from tasks import tracking
from tasks.stages import run_stage


def progress(line: str) -> None:
    # Straight to stderr: inside the flow, print() is captured as a Prefect log (log_prints).
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def execute(name: str, params: Params, layout: StoreLayout, *, track: bool) -> tuple[StageResult, bool, float]:
    """Run a stage through Prefect; returns its result, whether the store had it, and the seconds it took."""
    started = time.perf_counter()
    progress(f"stage {name}: started")
    result, cached, _costs = run_stage.with_options(name=name)(name, params, layout, return_state=True).result()
    seconds = time.perf_counter() - started
    progress(f"stage {name}: {'cached' if cached else 'ran'}, {seconds:.1f} s")
    if track:
        tracking.log_stage(name, params, result, cached, layout)
    return result, cached, seconds
