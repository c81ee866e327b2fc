"""The `sweep` flow: many configurations, each stage job once, spread over a Prefect task runner.

The plan (lowrank.pipeline.sweep_plan) gives one job per distinct fingerprint; the
loop both flows share (`steps.run_jobs`) reads a store hit here and submits each
other job once, waiting for the jobs it reads, so configurations run in
parallel as far as the runner's workers allow and shared stages run once. A job
that fails fails only the configurations that need it. The flow process logs
each configuration to MLflow as it finishes, so the workers never write to the
tracking store.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow

from lowrank.config import InputError
from lowrank.pipeline import get_stage
from lowrank.pipeline.store import finished
from lowrank.pipeline.sweep_plan import Job, config_summary, plan, stage_counts, status, sweep_spec
from tasks import tracking
from tasks.models import register_champion
from tasks.stages import run_stage

from . import lifecycle
from .console import print_table, sweep_table
from .progress import SweepView
from .steps import run_jobs


def _gpu(name: str, gpu: bool):
    """Dask resource annotation: a training job (`stage(..., trains=True)`) runs only on a worker started with `--resources GPU=1`."""
    if not (gpu and get_stage(name).trains):
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


def _summaries(configs, jobs) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Per configuration with a summary stage (the `dense` path has none): its label, that stage and the stage's
    metrics (None unless it finished); the rows of the table."""
    rows = []
    for config in configs:
        name = next((name for name in config.names if name.startswith("summary_")), None)
        if name is not None:
            result = jobs[config.job(name)].result
            rows.append((config.label, name, result.metrics if result is not None else None))
    return rows


@flow(name="sweep", log_prints=True)
def sweep(
    params_path: str = "params.yaml", spec_path: str | None = None, overrides: list[str] | None = None,
    threads: int | None = None, gpu: bool = False, yes: bool = False, live: bool = True,
) -> dict[str, Any]:
    """Run every configuration of the sweep; returns each one's status, score and model, and per stage how often it ran."""
    started = time.perf_counter()
    overrides = list(overrides or [])
    spec = sweep_spec(params_path, spec_path, overrides)
    configs, jobs = plan(params_path, spec, overrides, yes=yes, check=False)
    lifecycle.crash_stale_flow_runs()
    track = tracking.configure(configs[0].params.tracking)
    sweep_id = uuid.uuid4().hex[:12]

    run_ids: dict[int, str | None] = {}

    def start(job: Job, upstream: list) -> Any:
        if job.params.orchestration.cache and (stored := finished(job.name, job.layout)) is not None:
            # A store hit is read here: sending it to a worker would cost a process start and a task run for a file read.
            job.result, job.cached, job.costs = stored, True, {"seconds": 0.0, "peak_rss_mib": None}
            return None
        with _gpu(job.name, gpu):
            return run_stage.with_options(name=job.name).submit(job.name, job.params, job.layout, threads, wait_for=upstream)

    def done(job: Job) -> None:  # each configuration that has just ended (completed or failed) gets its run, once
        for config in configs:
            if config.number in run_ids or status(config, jobs) not in ("completed", "failed"):
                continue
            run_ids[config.number] = None
            if track and status(config, jobs) == "completed":
                results = {n: (jobs[config.job(n)].result, bool(jobs[config.job(n)].cached)) for n in config.names}
                run_ids[config.number] = tracking.log_configuration(
                    config.params, config.label, config.overrides, results, config.layout, config.job(config.names[-1]), {"sweep": sweep_id},
                )
        view.update()

    with SweepView(configs, jobs, enabled=live) as view:
        run_jobs(jobs, start, done)
    summaries = []
    for config in configs:
        summaries.append({**config_summary(config, jobs), "mlflow_run_id": run_ids.get(config.number)})
    print_table(sweep_table(_summaries(configs, jobs)), "dense against compressed")
    sweep_run, champion = None, None
    if track and any(run_ids.values()):
        ids = [run_ids[number] for number in sorted(run_ids) if run_ids[number]]  # in configuration order, not finishing order
        try:
            champion = register_champion(spec.select, configs[0].params.data.task, ids)
        except InputError as err:  # a metric no configuration logged: the sweep's work stands, nothing is registered
            champion = {"registered": False, "error": str(err)}
        sweep_run = tracking.log_sweep(configs[0].params.tracking, sweep_id, ids, Path(configs[0].params.paths.metrics), champion)
    return {
        "sweep": sweep_id,
        "mlflow_sweep_run_id": sweep_run,
        "champion": champion,
        "configs": summaries,
        "stages": stage_counts(jobs),
        "seconds": round(time.perf_counter() - started, 2),
        "stage_seconds": round(sum(job.costs["seconds"] for job in jobs.values() if job.costs), 2),
    }
