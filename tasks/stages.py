"""One Prefect task that runs any registered stage, cached on what the stage depends on."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from lowrank.config import Params
from lowrank.io.files import digest
from lowrank.pipeline import Layout, StageResult, get_stage

from .caching import stage_cache_key


def output_digests(name: str, params: Params) -> dict[str, str | None]:
    """Current content hashes of a stage's outputs (None where missing)."""
    outputs = get_stage(name).written_paths(Layout.from_params(params))
    return {key: digest(path) if Path(path).exists() else None for key, path in outputs.items()}


def _run(name: str, params: Params) -> StageResult:
    result = get_stage(name).run(params, Layout.from_params(params))
    result.info["output_digests"] = output_digests(name, params)
    return result


@task(cache_key_fn=stage_cache_key, persist_result=True, task_run_name="{name}")
def run_stage(name: str, params: Params) -> StageResult:
    """Run stage `name`; a cache hit returns the stored result without running it."""
    return _run(name, params)
