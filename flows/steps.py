"""Running one stage inside a flow: cache check, output verification, MLflow run."""

from __future__ import annotations

import sys
import time

from lowrank.config import Params
from lowrank.pipeline import StageResult
from tasks import tracking
from tasks.stages import output_digests, run_stage


def _progress(line: str) -> None:
    # Straight to stderr: inside the flow, print() is captured as a Prefect log (log_prints).
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def execute(name: str, params: Params, *, use_cache: bool, track: bool) -> tuple[StageResult, bool, float]:
    """Run a stage through Prefect; returns its result, whether it came from the cache, and the seconds it took.

    A cache hit is trusted only while the stage's outputs on disk are still the
    ones it recorded: another run (or `dvc checkout`) may have replaced them.
    Without `use_cache` the stage runs and its result replaces the cached one,
    so the next cached run finds it.
    """
    started = time.perf_counter()
    _progress(f"stage {name}: started")
    state = run_stage.with_options(name=name, refresh_cache=not use_cache)(name, params, return_state=True)
    result: StageResult = state.result()
    cached = state.name == "Cached"
    if cached and result.info.get("output_digests") != output_digests(name, params):
        state = run_stage.with_options(name=name, refresh_cache=True)(name, params, return_state=True)
        result, cached = state.result(), False
    seconds = time.perf_counter() - started
    _progress(f"stage {name}: {'cached' if cached else 'ran'}, {seconds:.1f} s")
    if track:
        tracking.log_stage(name, params, result, cached)
    return result, cached, seconds
