"""The `compress` flow: data, dense fine-tuning, compression, evaluation.

One configuration's plan, run through the sweep's loop (`steps.run_jobs`), not
through the `sweep` flow itself: `lowrank run` runs its stages in this process,
one after another, each a Prefect task run (`Cached` for a store hit), with a
line on stderr as each starts and ends and a nested MLflow run as each ends,
while the sweep spreads its jobs over worker processes and logs one flat run per
configuration. Those differences are this flow's two hooks; the loop is the same.
"""

from __future__ import annotations

import contextlib

from prefect import flow

from lowrank.config import SweepConfig, load_params
from lowrank.pipeline import preflight
from lowrank.pipeline.store import finished
from lowrank.pipeline.sweep_plan import Job, plan
from lowrank.pipeline.workspace import publish
from tasks import tracking
from tasks.models import log_results

from . import lifecycle
from .steps import execute, run_jobs


@flow(name="compress", log_prints=True)
def compress(params_path: str = "params.yaml", overrides: list[str] | None = None, checked: bool = False) -> dict:
    """Run the pipeline that `params.yaml` describes; every stage is cached in the store, then all are copied into the workspace.

    Returns, per stage, whether it came from the cache, its wall-clock seconds and its metrics.
    """
    params = load_params(params_path, overrides or [])  # loaded alone first: an error names the key, not "sweep configuration 1"
    if not checked:  # `lowrank run` checked every input before Prefect started; a served deployment has not
        preflight(params)
    lifecycle.crash_stale_flow_runs()
    (config,), jobs = plan(params_path, SweepConfig(configs=[{}]), overrides or [], check=False)  # a sweep of one
    params, names, layout = config.params, config.names, config.layout
    track = tracking.configure(params.tracking)
    fingerprint = config.job(names[-1])  # of the last stage: it covers every stage, params and code
    if track and params.orchestration.cache and all(finished(name, layout) for name in names):
        # The store holds every stage: a run that logged this result already says all a new one would (as a sweep's
        # configuration does), so nothing is added to MLflow; the Prefect flow run is still recorded.
        track = tracking.finished_run(fingerprint) is None
    seconds: dict[str, float] = {}
    scored = None

    def start(job: Job, _upstream: list) -> None:  # in this process, in order: the previous job has ended
        seconds[job.name] = execute(job)

    def done(job: Job) -> None:
        nonlocal scored
        if track:
            tracking.log_stage(job.name, params, job.result, job.cached, layout)
            if job.name == "prepare":  # the splits as inputs, as soon as they exist
                scored = tracking.log_datasets(params, layout)

    parent = tracking.flow_run(params, tracking.run_name(params), {tracking.FINGERPRINT_TAG: fingerprint}) if track else None
    with parent or contextlib.nullcontext():
        run_jobs(jobs, start, done)
        results = {name: jobs[config.job(name)].result for name in names}
        publish(params, names, layout)  # as a whole, at the end: the workspace is one configuration's (WORKSPACE.json)
        if track:  # every stage's metrics, each evaluation's against the model it scored (on the evaluation split)
            log_results(results, params, layout, scored)
    return {name: {"cached": jobs[config.job(name)].cached, "seconds": seconds[name], "metrics": results[name].metrics} for name in names}
