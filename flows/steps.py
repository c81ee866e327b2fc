"""Running stages: a plan's jobs (the one loop of both flows), one job in this process, or one stage alone, for DVC."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from lowrank.config import Params
from lowrank.pipeline import Layout, StageResult
from lowrank.pipeline.stage import STORE
from lowrank.pipeline.store import run_stored
from lowrank.pipeline.sweep_plan import Job
from lowrank.pipeline.workspace import publish_stage


def progress(line: str) -> None:
    # Straight to stderr: inside the flow, print() is captured as a Prefect log (log_prints).
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error_line(err: BaseException) -> str:
    """A job's error as one line: the last of its message (a worker's traceback ends with what went wrong)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[-1][:500]


def run_jobs(jobs: dict[str, Job], start: Callable[[Job, list[Any]], Any], done: Callable[[Job], None]) -> None:
    """Run every job of a plan once, each after the jobs it reads; `done(job)` as each one ends.

    `start(job, upstream)` either finishes the job in this process (it sets the job's result, cached and costs,
    and returns None: `lowrank run`'s stages, a sweep's store hits) or submits it to the flow's task runner,
    waiting for `upstream` (the futures of the jobs it reads that were submitted), and returns its future.
    An error raised by `start` ends the loop (a `lowrank run` stops at its failing stage); a submitted job's
    error is kept on the job, and fails only the jobs that wait for it.
    """
    futures = {}
    for job in jobs.values():  # the plan lists every job after the jobs it reads
        future = start(job, [futures[up] for up in job.after if up in futures])
        if future is None:
            done(job)
        else:
            futures[job.id] = future
    if not futures:
        return
    from prefect.futures import as_completed  # here: a stage run alone, under DVC, never imports Prefect (seconds)

    owner = {id(future): job_id for job_id, future in futures.items()}
    for future in as_completed(list(futures.values())):
        job = jobs[owner[id(future)]]
        try:
            job.result, job.cached, job.costs = future.result()
        except BaseException as err:  # noqa: BLE001  a failed job (or its upstream) fails its configurations only
            job.error = error_line(err)
        done(job)


def execute(job: Job) -> float:
    """Run a job's stage in this process through Prefect, a line on stderr as it starts and as it ends; returns its seconds."""
    from tasks.stages import run_stage  # here, not above: a stage run alone, under DVC, never imports Prefect (seconds)

    started = time.perf_counter()
    progress(f"stage {job.name}: started")
    state = run_stage.with_options(name=job.name)(job.name, job.params, job.layout, return_state=True)
    job.result, job.cached, job.costs = state.result()
    seconds = time.perf_counter() - started
    progress(f"stage {job.name}: {'cached' if job.cached else 'ran'}, {seconds:.1f} s")
    return seconds


def run_alone(name: str, params: Params, layout: Layout, computed: list[str]) -> tuple[StageResult, bool]:
    """Run a stage into its store entry as `compress` does (no Prefect: DVC is the driver), then copy its files to the
    paths dvc.yaml declares; `computed` are the upstream stages the store lacks, which it computes first."""
    # Under `dvc repro`, DVC has made sure the workspace holds its upstream stages' current files: the store takes
    # those it lacks from there (lowrank.pipeline.store.from_workspace) rather than compute them again.
    under_dvc = "DVC_STAGE" in os.environ
    if computed:
        how = "made from the workspace's files where DVC has them, else computed" if under_dvc else "computed"
        progress(f"stage {name}: {', '.join(computed)} not in the store {layout.artifacts / STORE}; {how} first")
    result, cached = run_stored(name, params, layout, refresh=not params.orchestration.cache, trusted_workspace=under_dvc)
    publish_stage(name, layout)
    return result, cached
