"""Which stages a run takes, and the checks that run before any of them.

A path is named by its last stage; it runs that stage's upstream stages and
every evaluation of a model they make, in registration order (which is run
order: a stage may only read what an earlier one wrote).
"""

from __future__ import annotations

from pathlib import Path

from lowrank.config import InputError, MissingInputError, Params, TrackingConfig
from lowrank.pipeline.stage import METRICS, STAGES, Layout, get_stage

# The last stage of each `orchestration.path`.
PATH_ENDS = {
    "dense": "evaluate_dense",
    "factorize": "summary_factorize",
    "factorize_only": "summary_factorize_only",  # factorize and score, no + ft: the cheap point of a sweep over targets or ranks
    "lpaf": "summary_lpaf",
}


def upstream(name: str) -> set[str]:
    """`name` and every stage it depends on, directly or not."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(get_stage(current).after)
    return seen


def path_stages(path: str) -> list[str]:
    """The stages of a path, in run order: the end's upstream, plus the evaluations of what they make."""
    chosen = upstream(PATH_ENDS[path])
    for name, st in STAGES.items():
        if not st.outputs and name not in PATH_ENDS.values() and set(st.after) <= chosen:  # another path's end is not an evaluation
            chosen.add(name)
    return [name for name in STAGES if name in chosen]


def shipped(path: str) -> tuple[str, str, str]:
    """The path's final model: (the stage that evaluates it, the stage that makes it, that stage's output key)."""
    evaluation = get_stage(PATH_ENDS[path])
    if "model" not in evaluation.inputs:  # a summary: its last metrics input is the evaluation of the final model
        metrics = [source for source in evaluation.inputs.values() if source.endswith(f".{METRICS}")]
        evaluation = get_stage(metrics[-1].split(".", 1)[0])
    maker, key = evaluation.inputs["model"].split(".", 1)
    return evaluation.name, maker, key


def pipeline(params: Params) -> list[str]:
    """The stages of the configured path, in the order they run."""
    return path_stages(params.orchestration.path)


def preflight(params: Params) -> None:
    """Check every input the run names (data files, model, output folders) before any work."""
    from lowrank.data.loading import check_sources, resolve_task
    from lowrank.devices import default_device
    from lowrank.io.files import check_writable
    from lowrank.io.models import check_head, check_model

    check_writable(params.paths.artifacts, "paths.artifacts")
    check_writable(params.paths.metrics, "paths.metrics")
    check_model(params.model)
    check_sources(params.data)
    if params.model.finetuned:
        check_head(params.model, resolve_task(params.data))
    check_tracking(params.tracking)
    try:
        default_device()  # a bad LOWRANK_DEVICE fails here, not at the first stage that trains
    except ValueError as err:
        raise InputError(str(err)) from None


def check_tracking(cfg: TrackingConfig, timeout: float = 3.0) -> None:
    """A tracking server or database named by host must answer now, not after the first hour of training."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(cfg.uri)
    if not cfg.enabled or not parsed.hostname:  # sqlite:///file, a folder: nothing to reach
        return
    port = parsed.port or {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306}.get(parsed.scheme.split("+")[0])
    if port is None:
        return
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise InputError(f"tracking.uri: {cfg.uri} does not answer ({err.strerror or err})") from None


def preflight_stage(name: str, params: Params) -> None:
    """For one stage: its upstream artifacts must exist (else say which stage makes them)."""
    st = get_stage(name)
    if name == "prepare":
        preflight(params)
    for key, path in st.input_paths(Layout.from_params(params)).items():
        if not Path(path).exists():
            raise MissingInputError(f"stage {name}: input {key} not found at {path}; run {', '.join(st.after)} first")
