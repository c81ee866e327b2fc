"""Stages declared once: the params sections each reads, the artifacts it reads and writes.

A stage is a plain function `(params, io) -> StageResult` registered with
`@stage(...)`. Its declaration is the one place its paths are written: outputs
as paths under `paths.artifacts`, inputs as `"<stage>.<output>"` of an upstream
stage, plots and reports as files under `paths.metrics`, and always
`metrics/<stage>.json`. The Prefect cache key, the cache's check of what is on
disk, MLflow's lineage tags and `dvc.yaml` (`lowrank dvc-yaml`) are all read
from these declarations.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lowrank.config import Params
from lowrank.io.files import write_json


@dataclass
class StageResult:
    """Paths a stage wrote and the numbers it measured (flat, for MLflow)."""

    outputs: dict[str, str]
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


STORE = "store"  # the content-addressed store's folder under paths.artifacts (lowrank.pipeline.store)
DIGEST_CHARS = 16  # of a fingerprint, in an entry's folder name (64 bits: no collision among a project's entries)


@dataclass(frozen=True)
class Layout:
    """Where every path hangs: the workspace, or with fingerprints, each stage's store entry.

    Without fingerprints a stage's outputs are under `paths.artifacts` and its metrics, plots and reports under
    `paths.metrics`: the workspace, the paths dvc.yaml declares. With them (`lowrank.pipeline.store.fingerprints`:
    a stage's and its upstream's), each of those stages keeps all of them in its own entry,
    `<paths.artifacts>/store/<stage>/<fingerprint>/`. `artifacts` and `metrics` stay the workspace's roots either way.
    """

    artifacts: Path
    metrics: Path
    fingerprints: Mapping[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_params(cls, params: Params, fingerprints: Mapping[str, str] | None = None) -> "Layout":
        return cls(Path(params.paths.artifacts), Path(params.paths.metrics), dict(fingerprints or {}))

    @property
    def stored(self) -> bool:
        """Whether the paths are store entries (else the workspace's)."""
        return bool(self.fingerprints)

    def workspace(self) -> "Layout":
        """The same roots without fingerprints: the workspace paths."""
        return Layout(self.artifacts, self.metrics)

    def entry(self, stage: str) -> Path:
        """The store entry of a stage this layout has the fingerprint of."""
        return self.artifacts / STORE / stage / self.fingerprints[stage][:DIGEST_CHARS]

    def artifacts_of(self, stage: str) -> Path:
        """The root of a stage's outputs."""
        return self.entry(stage) if self.stored else self.artifacts

    def metrics_of(self, stage: str) -> Path:
        """The folder of a stage's metrics, plots and reports."""
        return self.entry(stage) / "metrics" if self.stored else self.metrics

    def output(self, stage: str, key: str = "model") -> Path:
        """Where `stage` writes its output `key`, as its declaration says."""
        return get_stage(stage).output_paths(self)[key]


def numeric(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Keep the numbers of a nested dict, flattening keys with dots."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(numeric(value, f"{name}."))
        elif isinstance(value, (int, float)):  # a flag (collapsed) becomes 0 or 1
            flat[name] = float(value)
    return flat


@dataclass(frozen=True)
class StageIO:
    """A stage's resolved paths: what it reads, what it writes, where its metrics go."""

    inputs: dict[str, Path]
    outputs: dict[str, Path]
    plots: dict[str, Path]
    reports: dict[str, Path]
    metrics: Path

    def finish(self, metrics: dict[str, Any], info: dict[str, Any] | None = None) -> StageResult:
        """Write `metrics/<stage>.json` and return the result the drivers log."""
        write_json(self.metrics, metrics)
        info = dict(info or {})
        written = [path for path in (*self.plots.values(), *self.reports.values()) if path.is_file()]
        if written:
            info["plots"] = [str(path) for path in written]
        return StageResult({k: str(v) for k, v in self.outputs.items()}, numeric(metrics), info)


@dataclass(frozen=True)
class Stage:
    """One stage's declaration and function."""

    name: str
    fn: Callable[[Params, StageIO], StageResult]
    params: tuple[str, ...]  # params sections, or single dotted keys, that it reads
    inputs: dict[str, str]  # key -> "<stage>.<output>", or "<stage>.metrics" for its metrics file
    outputs: dict[str, str]  # key -> path under paths.artifacts
    plots: dict[str, str]  # key -> file under paths.metrics
    reports: dict[str, str]  # key -> JSON file under paths.metrics, beside the stage's metrics
    # the content hashes of files outside the pipeline it reads (a fine-tuned checkpoint), by name, from the params
    sources: Callable[[Params], dict[str, str]] | None = None
    trains: bool = False  # it trains a model: a sweep with --gpu runs it on a worker with a GPU
    ends_path: str | None = None  # the `orchestration.path` it is the last stage of (plan.path_ends)

    @property
    def after(self) -> tuple[str, ...]:
        """The stages whose outputs it reads, in declaration order."""
        return tuple(dict.fromkeys(ref.split(".", 1)[0] for ref in self.inputs.values()))

    def input_refs(self) -> dict[str, tuple[str, str]]:
        return {key: tuple(ref.split(".", 1)) for key, ref in self.inputs.items()}  # type: ignore[misc]

    def input_paths(self, layout: Layout) -> dict[str, Path]:
        return {key: get_stage(up).path_of(out, layout) for key, (up, out) in self.input_refs().items()}

    def path_of(self, output: str, layout: Layout) -> Path:
        """The path of one of its outputs, or of its metrics file (`metrics`)."""
        return self.metrics_path(layout) if output == METRICS else self.output_paths(layout)[output]

    def output_paths(self, layout: Layout) -> dict[str, Path]:
        return {key: layout.artifacts_of(self.name) / rel for key, rel in self.outputs.items()}

    def metrics_path(self, layout: Layout) -> Path:
        return layout.metrics_of(self.name) / f"{self.name}.json"

    def written_paths(self, layout: Layout) -> dict[str, Path]:
        """Every file it writes besides its metrics: what a cache hit must still find on disk."""
        metrics = layout.metrics_of(self.name)
        return {
            **self.output_paths(layout),
            **{f"plot.{k}": metrics / rel for k, rel in self.plots.items()},
            **{f"report.{k}": metrics / rel for k, rel in self.reports.items()},
        }

    def io(self, layout: Layout) -> StageIO:
        metrics = layout.metrics_of(self.name)
        return StageIO(
            self.input_paths(layout), self.output_paths(layout),
            {k: metrics / rel for k, rel in self.plots.items()},
            {k: metrics / rel for k, rel in self.reports.items()},
            self.metrics_path(layout),
        )

    def run(self, params: Params, layout: Layout | None = None) -> StageResult:
        """Run the stage on the paths `params` gives (or `layout`)."""
        layout = layout or Layout.from_params(params)
        try:
            return self.fn(params, self.io(layout))
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT) and not err.filename:  # datasets' and torch's writers name no file
                err.filename = str(layout.artifacts_of(self.name))
            raise


STAGES: dict[str, Stage] = {}
METRICS = "metrics"  # the output name of a stage's metrics file, for stages that read another's metrics


def stage(
    name: str,
    *,
    params: tuple[str, ...],
    inputs: Mapping[str, str] | None = None,
    outputs: Mapping[str, str] | None = None,
    plots: Mapping[str, str] | None = None,
    reports: Mapping[str, str] | None = None,
    sources: Callable[[Params], dict[str, str]] | None = None,
    trains: bool = False,
    ends_path: str | None = None,
) -> Callable[[Callable[[Params, StageIO], StageResult]], Callable[[Params, StageIO], StageResult]]:
    """Declare and register a stage; the function is returned unchanged, so one function may serve several stages.

    Names are unique (dvc.yaml and the flow refer to them) and inputs must name
    an output of a stage registered before, so the registry is in run order.
    `sources(params)` hashes what the stage reads from outside the pipeline; the hashes join its fingerprint.
    `trains` marks a stage that trains (it wants a GPU); `ends_path` names the `orchestration.path` it ends, whose
    run is then this stage's upstream and every evaluation of the models they make (`plan.path_stages`).
    """
    if name in STAGES:
        raise ValueError(f"stage {name!r} is registered twice")
    if ends_path is not None and (other := next((st.name for st in STAGES.values() if st.ends_path == ends_path), None)):
        raise ValueError(f"stage {name!r}: path {ends_path!r} already ends at stage {other!r}")
    for key, ref in (inputs or {}).items():
        upstream, _, output = ref.partition(".")
        if upstream not in STAGES or (output not in STAGES[upstream].outputs and output != METRICS):
            raise ValueError(f"stage {name!r}: input {key} = {ref!r} is not an output of a stage registered before it")

    def register(fn: Callable[[Params, StageIO], StageResult]) -> Callable[[Params, StageIO], StageResult]:
        STAGES[name] = Stage(
            name, fn, tuple(params), dict(inputs or {}), dict(outputs or {}), dict(plots or {}), dict(reports or {}), sources,
            trains, ends_path,
        )
        return fn

    return register


def get_stage(name: str) -> Stage:
    """The stage called `name`; the error lists the known ones."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name]
