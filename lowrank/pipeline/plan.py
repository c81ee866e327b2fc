"""Which stages a run takes, and the checks that run before any of them.

A path is named by its last stage; it runs that stage's upstream stages and
every evaluation of a model they make, in registration order (which is run
order: a stage may only read what an earlier one wrote).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

from lowrank.config import InputError, Params, TrackingConfig
from lowrank.pipeline.stage import METRICS, STAGES, get_stage

def path_ends() -> dict[str, str]:
    """The last stage of each `orchestration.path`, as the stages declare it (`stage(..., ends_path=...)`)."""
    return {st.ends_path: name for name, st in STAGES.items() if st.ends_path is not None}


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
    chosen = upstream(path_ends()[path])
    for name, st in STAGES.items():
        if not st.outputs and st.ends_path is None and set(st.after) <= chosen:  # another path's end is not an evaluation
            chosen.add(name)
    return [name for name in STAGES if name in chosen]


def shipped(path: str) -> tuple[str, str, str]:
    """The path's final model: (the stage that evaluates it, the stage that makes it, that stage's output key)."""
    evaluation = get_stage(path_ends()[path])
    if "model" not in evaluation.inputs:  # a summary: its last metrics input is the evaluation of the final model
        metrics = [source for source in evaluation.inputs.values() if source.endswith(f".{METRICS}")]
        evaluation = get_stage(metrics[-1].split(".", 1)[0])
    maker, key = evaluation.inputs["model"].split(".", 1)
    return evaluation.name, maker, key


def pipeline(params: Params) -> list[str]:
    """The stages of the configured path, in the order they run."""
    return path_stages(params.orchestration.path)


def preflight(params: Params, run_remote_code: bool = False) -> None:
    """Check every input the run names (data files, model, output folders, target patterns) before any work.

    A model with `trust_remote_code` has its config read (running its checkpoint's code) only with `run_remote_code`.
    """
    from lowrank.data.loading import check_sources, resolve_task
    from lowrank.devices import default_device
    from lowrank.io.files import check_writable
    from lowrank.io.models import check_head, check_model

    with os_errors("paths.artifacts"):
        check_writable(params.paths.artifacts, "paths.artifacts")
    with os_errors("paths.metrics"):
        check_writable(params.paths.metrics, "paths.metrics")
    with os_errors("model.name"):
        config = check_model(params.model, run_remote_code)
    if config is not None and params.model.finetuned:  # a head of another kind: that, before its targets are looked for
        check_head(params.model, resolve_task(params.data))
    if config is not None and params.orchestration.path != "dense":
        check_targets(config, params)
    with os_errors("data"):
        check_sources(params.data)
    check_tracking(params.tracking)
    try:
        default_device()  # a bad LOWRANK_DEVICE fails here, not at the first stage that trains
    except ValueError as err:
        raise InputError(str(err)) from None


@contextlib.contextmanager
def os_errors(key: str) -> Iterator[None]:
    """An OS error on a path `key` names (too long, not a folder, no permission, a device) is a one-line InputError."""
    try:
        yield
    except InputError:
        raise
    except OSError as err:
        name = str(err.filename or "")
        name = name if len(name) <= 120 else f"{name[:60]}...{name[-40:]} ({len(name)} characters)"
        raise InputError(f"{key}: {name + ': ' if name else ''}{err.strerror or err}") from None


def check_targets(config: object, params: Params) -> None:
    """`factorize.targets` must select some Linear layer of the model: matched against its module names, built
    on the meta device from its config, so a pattern that selects nothing fails before fine-tuning, not after."""
    from lowrank.data.loading import resolve_task
    from lowrank.io.models import meta_model
    from lowrank.modules.matching import find_targets

    cfg = params.factorize
    model = meta_model(config, resolve_task(params.data))
    if not find_targets(model, cfg.targets or None, cfg.exclude or None):
        linear = [name for name, module in model.named_modules() if type(module).__name__ == "Linear"]
        raise InputError(
            f"factorize.targets: {cfg.targets!r} (less factorize.exclude) matches no Linear layer of {params.model.name}; "
            f"its Linear layers are named like {', '.join(linear[:2])}"
        )


def check_tracking(cfg: TrackingConfig, timeout: float = 3.0) -> None:
    """A tracking server or database named by host must answer now, not after the first hour of training."""
    import socket
    from urllib.parse import urlparse

    from lowrank.io.files import check_writable

    parsed = urlparse(cfg.uri)
    if cfg.enabled and parsed.scheme == "sqlite":  # a local database file: its folder must take it
        with os_errors("tracking.uri"):
            check_writable(Path(cfg.uri.removeprefix("sqlite:///")).parent, "tracking.uri")
    if not cfg.enabled or not parsed.hostname:  # sqlite:///file, a folder: nothing to reach
        return
    port = parsed.port or {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306}.get(parsed.scheme.split("+")[0])
    if port is None:
        return
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise InputError(f"tracking.uri: {cfg.uri} does not answer ({err.strerror or err})") from None


def preflight_stage(name: str, params: Params, computed: Iterable[str] = ()) -> None:
    """For one stage run alone: the whole run's checks when it prepares the data (itself, or among `computed`, the
    upstream stages it computes first because the store lacks them); the other stages read only the store."""
    if "prepare" in (name, *computed):
        preflight(params)
