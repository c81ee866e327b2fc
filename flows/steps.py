"""Running one stage: inside a flow (from the store, then its MLflow run), or alone, for DVC (from the store, then into the workspace)."""

from __future__ import annotations

import os
import sys
import time

from lowrank.config import Params
from lowrank.pipeline import Layout, StageResult
from lowrank.pipeline.store import run_stored
from lowrank.pipeline.workspace import publish_stage
from tasks import tracking


def progress(line: str) -> None:
    # Straight to stderr: inside the flow, print() is captured as a Prefect log (log_prints).
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def execute(name: str, params: Params, layout: Layout, *, track: bool) -> tuple[StageResult, bool, float]:
    """Run a stage through Prefect; returns its result, whether the store had it, and the seconds it took."""
    from tasks.stages import run_stage  # here, not above: a stage run alone, under DVC, never imports Prefect (seconds)

    started = time.perf_counter()
    progress(f"stage {name}: started")
    result, cached, _costs = run_stage.with_options(name=name)(name, params, layout, return_state=True).result()
    seconds = time.perf_counter() - started
    progress(f"stage {name}: {'cached' if cached else 'ran'}, {seconds:.1f} s")
    if track:
        tracking.log_stage(name, params, result, cached, layout)
    return result, cached, seconds


def run_alone(name: str, params: Params, layout: Layout, computed: list[str]) -> tuple[StageResult, bool]:
    """Run a stage into its store entry as `compress` does (no Prefect: DVC is the driver), then copy its files to the
    paths dvc.yaml declares; `computed` are the upstream stages the store lacks, which it computes first."""
    # Under `dvc repro`, DVC has made sure the workspace holds its upstream stages' current files: the store takes
    # those it lacks from there (lowrank.pipeline.store.from_workspace) rather than compute them again.
    under_dvc = "DVC_STAGE" in os.environ
    if computed:
        how = "made from the workspace's files where DVC has them, else computed" if under_dvc else "computed"
        progress(f"stage {name}: {', '.join(computed)} not in the store {layout.artifacts / 'store'}; {how} first")
    result, cached = run_stored(name, params, layout, refresh=not params.orchestration.cache, trusted_workspace=under_dvc)
    publish_stage(name, layout)
    return result, cached
