"""The `compress` flow: data, dense fine-tuning, compression, evaluation."""

from __future__ import annotations

import contextlib

from prefect import flow

from lowrank.config import load_params
from lowrank.pipeline import Layout, pipeline, preflight
from lowrank.pipeline.store import fingerprints, finished
from lowrank.pipeline.workspace import publish
from tasks import tracking
from tasks.models import log_results

from . import lifecycle
from .steps import execute


@flow(name="compress", log_prints=True)
def compress(params_path: str = "params.yaml", overrides: list[str] | None = None, checked: bool = False) -> dict:
    """Run the pipeline that `params.yaml` describes; every stage is cached in the store, then all are copied into the workspace.

    Returns, per stage, whether it came from the cache, its wall-clock seconds and its metrics.
    """
    params = load_params(params_path, overrides or [])
    if not checked:  # `lowrank run` checked every input before Prefect started; a served deployment has not
        preflight(params)
    lifecycle.crash_stale_flow_runs()
    track = tracking.configure(params.tracking)
    names = pipeline(params)
    layout = Layout.from_params(params, fingerprints(params, names))
    fingerprint = layout.fingerprints[names[-1]]  # of the last stage: it covers every stage, params and code
    if track and params.orchestration.cache and all(finished(name, layout) for name in names):
        # The store holds every stage: a run that logged this result already says all a new one would (as a sweep's
        # configuration does), so nothing is added to MLflow; the Prefect flow run is still recorded.
        track = tracking.finished_run(fingerprint) is None
    summary: dict[str, dict] = {}
    results, scored = {}, None
    parent = tracking.flow_run(params, tracking.run_name(params), {tracking.FINGERPRINT_TAG: fingerprint}) if track else None
    with parent or contextlib.nullcontext():
        for name in names:
            results[name], cached, seconds = execute(name, params, layout, track=track)
            summary[name] = {"cached": cached, "seconds": seconds, "metrics": results[name].metrics}
            if track and name == "prepare":  # the splits as inputs, as soon as they exist
                scored = tracking.log_datasets(params, layout)
        publish(params, names, layout)  # as a whole, at the end: the workspace is one configuration's (WORKSPACE.json)
        if track:  # every stage's metrics, each evaluation's against the model it scored (on the evaluation split)
            log_results(results, params, layout, scored)
    return summary

