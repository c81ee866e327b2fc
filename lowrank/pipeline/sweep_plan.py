"""A sweep's plan: its configurations, each one's stages and fingerprints, and the jobs they share.

Two configurations that give a stage the same fingerprint share its job: it
runs once and both read its store entry. The jobs are listed in an order
where every job comes after the jobs it reads (the stages' registration order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lowrank.config import Params, SweepConfig, configurations, label, load_params, load_spec
from lowrank.pipeline.plan import pipeline, preflight, shipped
from lowrank.pipeline.stage import STAGES, Layout, StageResult, get_stage
from lowrank.pipeline.store import fingerprints


@dataclass
class Configuration:
    """One configuration of a sweep: its overrides, params, stages (in run order) and store layout."""

    number: int
    overrides: dict[str, Any]
    params: Params
    names: list[str]
    layout: Layout
    varying: tuple[str, ...] = ()  # the keys whose values differ between the sweep's configurations

    @property
    def label(self) -> str:
        """Its values of the keys that vary (a one-value list in a grid fixes a setting and would only add noise)."""
        return label({k: v for k, v in self.overrides.items() if k in self.varying})

    def job(self, name: str) -> str:
        """The job id of one of its stages: the stage's fingerprint."""
        return self.layout.fingerprints[name]


@dataclass
class Job:
    """One stage run, shared by every configuration that gives it the same fingerprint."""

    id: str
    name: str
    params: Params
    layout: Layout
    after: list[str]  # the jobs it reads
    result: StageResult | None = None
    cached: bool | None = None
    costs: dict[str, float | None] | None = None  # seconds, peak_rss_mib (of the worker process while it ran)
    error: str | None = None


def sweep_spec(params_path: str | Path, spec_path: str | Path | None, overrides: Sequence[str]) -> SweepConfig:
    """The spec file if given, else the `sweep:` section of params.yaml."""
    return load_spec(spec_path) if spec_path else load_params(params_path, overrides).sweep


def plan(params_path: str | Path, spec: SweepConfig, overrides: Sequence[str] = (), *, yes: bool = False, check: bool = True) -> tuple[list[Configuration], dict[str, Job]]:
    """Every configuration validated (and its inputs checked, once per distinct data and model), and the jobs."""
    configs = []
    checked: set[str] = set()
    for number, (override, params) in enumerate(configurations(params_path, spec, overrides, yes=yes), 1):
        key = repr((params.data, params.model, params.paths))
        if check and key not in checked:
            preflight(params)
            checked.add(key)
        names = pipeline(params)
        configs.append(Configuration(number, override, params, names, Layout.from_params(params, fingerprints(params, names))))
    keys = {key for config in configs for key in config.overrides}
    varying = tuple(sorted(k for k in keys if len({repr(c.overrides.get(k)) for c in configs}) > 1))
    for config in configs:
        config.varying = varying
    jobs: dict[str, Job] = {}
    for name in STAGES:  # registration order is run order
        for config in configs:
            if name not in config.names:
                continue
            job_id = config.job(name)
            if job_id not in jobs:
                after = [config.job(up) for up in get_stage(name).after]
                jobs[job_id] = Job(job_id, name, config.params, config.layout, after)
    return configs, jobs


def status(config: Configuration, jobs: dict[str, Job]) -> str:
    """completed, failed, or the stage it is at."""
    for name in config.names:
        job = jobs[config.job(name)]
        if job.error is not None:
            return "failed"
        if job.result is None:
            return name
    return "completed"


def config_summary(config: Configuration, jobs: dict[str, Job]) -> dict[str, Any]:
    """What `lowrank sweep` reports of one configuration."""
    evaluation, maker, key = shipped(config.params.orchestration.path)
    done = {name: jobs[config.job(name)] for name in config.names}
    state = status(config, jobs)
    reached = next(
        (job.result.metrics["keep_ratio_reached"] for job in done.values() if job.result and "keep_ratio_reached" in job.result.metrics),
        None,
    )
    summary: dict[str, Any] = {
        "overrides": config.overrides,
        "status": "completed" if state == "completed" else "failed",
        "score": done[evaluation].result.metrics.get("task.score") if done[evaluation].result else None,
        "keep_ratio_reached": reached,
        "scores": {  # every model the configuration evaluated, the dense one included
            name: job.result.metrics.get("task.score") for name, job in done.items() if job.result and name.startswith("evaluate")
        },
        "model": str(get_stage(maker).output_paths(config.layout)[key]),
        "stages": {name: {"cached": job.cached, **(job.costs or {"seconds": None})} for name, job in done.items()},
    }
    errors = [f"{job.name}: {job.error}" for job in done.values() if job.error]
    if errors:
        summary["error"] = errors[0]
    return summary


def stage_counts(jobs: dict[str, Job]) -> dict[str, dict[str, int]]:
    """Per stage: how many of its jobs ran and how many the store already had."""
    counts: dict[str, dict[str, int]] = {}
    for job in jobs.values():
        row = counts.setdefault(job.name, {"ran": 0, "cached": 0, "failed": 0})
        row["failed" if job.error else "cached" if job.cached else "ran"] += job.error is not None or job.result is not None
    return counts
