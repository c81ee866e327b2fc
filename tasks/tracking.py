"""MLflow: one run per flow run, a nested run per stage, with lineage.

The library returns metrics and never logs them; this module is the one place
that talks to MLflow, so the tracking backend can change without touching it.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow

import lowrank

from lowrank.config import Params, TrackingConfig, flatten, select
from lowrank.methods import get_method
from lowrank.pipeline import Layout, StageResult, get_stage

from .lineage import dvc_md5, stored_md5
from .models import MODEL_TAG, log_results, run_goal

# MLflow caps a param value at 6000 characters.
_MAX_PARAM = 6000


# MLflow 3 opens an experiment on its GenAI overview unless told it holds model training.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "Compressed fine-tuned encoders from lowrank: one run per `lowrank run` (a nested run per stage) or per sweep "
        "configuration. Compare task.score against params kept and latency; the Dataset column names the splits each "
        "run trained and scored on, the lineage.* tags the exact artifacts in the store."
    ),
}


def configure(cfg: TrackingConfig) -> bool:
    """Point MLflow at the configured store; returns whether tracking is on."""
    if not cfg.enabled:
        return False
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    mlflow.set_tracking_uri(cfg.uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # A tracking server keeps the artifacts where it was told to (mlflow-artifacts:/); a local store, in the project.
        location = None if cfg.uri.startswith(("http://", "https://")) else Path(cfg.artifact_location).resolve().as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
    elif any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for key, value in EXPERIMENT_TAGS.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    mlflow.set_experiment(cfg.experiment)
    return True


def run_name(params: Params, label: str | None = None) -> str:
    """What a run is, as its name: task, path (other than factorize), method, keep ratio, seed, and a sweep's other varying values."""
    path = "" if params.orchestration.path == "factorize" else f"{params.orchestration.path}-"
    name = f"{params.data.task}-{path}{params.factorize.method}-{params.factorize.keep_ratio}-seed{params.train.seed}"
    extra = [part for part in (label or "").split() if not part.startswith(("method=", "keep_ratio=", "path="))]
    return " ".join([name, *extra])


def log_datasets(params: Params, layout: Layout) -> Any:
    """The task's splits as the active run's inputs (context training or evaluation), named by where they came from.

    The rows are the raw text of the subsample the run trained and scored on (what prepare tokenized); the
    digest is MLflow's, of those rows, so two runs on the same subsample show the same dataset. Returns the
    first evaluation split's dataset, which the evaluations' metrics are logged against.
    """
    import mlflow.data

    from lowrank.data.loading import HUB_DATASET, SELECT, load_raw_from_config, reads_from_hub, resolve_task
    from lowrank.data.catalog import split_path

    spec, glue_dir = resolve_task(params.data), params.data.resolved_glue_dir()
    scored = None
    for split, rows in load_raw_from_config(params.data, spec).items():
        text = rows.to_pandas()
        if reads_from_hub(spec, glue_dir):
            source = f"https://huggingface.co/datasets/{HUB_DATASET}"
        else:
            try:
                source = split_path(spec, split, glue_dir).resolve().as_uri()
            except ValueError:  # a split the task's files do not name (made by splitting another)
                source = Path(get_stage("prepare").output_paths(layout)["data"]).resolve().as_uri()
        target = "label" if "label" in text.columns else None
        with warnings.catch_warnings():  # the file URI is a local file (MLflow asks itself which kind); int labels are ids
            warnings.filterwarnings("ignore", message=".*(interpreted in multiple ways|integer column)", category=UserWarning)
            dataset = mlflow.data.from_pandas(text, source=source, targets=target, name=f"{spec.name}-{split}")
            mlflow.log_input(dataset, context={"train": "training", SELECT: "validation"}.get(split, "evaluation"))
        if split == spec.eval_splits[0]:
            scored = dataset
    return scored


def git_commit() -> dict[str, str]:
    """The commit the code ran at, and whether the tree had uncommitted changes.

    Asked of the repository holding the library, not of the working folder,
    which may be any project folder.
    """
    where = Path(lowrank.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty.strip())).lower()}


def run_tags(params: Params) -> dict[str, str]:
    """Tags to filter and compare runs by in the UI; what the method table says of the method among them."""
    method = get_method(params.factorize.method)
    return {
        "task": params.data.task,
        "model": params.model.name,
        "path": params.orchestration.path,
        "method": method.name,
        "method.importance": method.importance,
        "method.solver": method.solver_name(params.factorize.solver),
        "keep_ratio": str(params.factorize.keep_ratio),
        **owner_tag(),
        **git_commit(),
    }


OWNER_TAG = "lowrank.owner"


def owner_tag() -> dict[str, str]:
    """The process that owns a run (host:pid:start), so that a later run can close it if that process died."""
    owner = os.environ.get("LOWRANK_OWNER")
    return {OWNER_TAG: owner} if owner else {}


def close_stale_runs(cfg: TrackingConfig, alive: Callable[[str], bool]) -> list[str]:
    """Mark KILLED the runs still RUNNING whose owning process has died (a SIGKILL leaves them so)."""
    configure(cfg)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    runs = mlflow.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'", output_format="list",
    )
    client = mlflow.MlflowClient()
    closed = []
    for run in runs:
        owner = run.data.tags.get(OWNER_TAG)
        if owner and not alive(owner):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


REPORTED_TAG = "lowrank.failure_reported"


def failed_models(cfg: TrackingConfig) -> list[str]:
    """The logged models whose upload did not finish, each named once: "<name> (<id>)".

    A model still PENDING whose run has ended (its process died: `close_stale_runs` ran first) is marked
    FAILED; a FAILED model is never reused (`models.whole`), the next run that scores its folder logs it again.
    """
    from mlflow.entities import LoggedModelStatus

    configure(cfg)
    client, found = mlflow.MlflowClient(), []
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    for model in mlflow.search_logged_models([experiment.experiment_id], output_format="list"):
        if model.tags.get(REPORTED_TAG) or model.status not in (LoggedModelStatus.PENDING, LoggedModelStatus.FAILED):
            continue
        if model.status == LoggedModelStatus.PENDING:
            if model.source_run_id and client.get_run(model.source_run_id).info.status == "RUNNING":
                continue  # still being uploaded
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        client.set_logged_model_tags(model.model_id, {REPORTED_TAG: "true"})
        found.append(f"{model.name} ({model.model_id})")
    return found


def _param_value(value: Any) -> str:
    return "null" if value is None else str(value)[:_MAX_PARAM]


def _log_params(params: Params) -> None:
    mlflow.log_params({k: _param_value(v) for k, v in flatten(params).items()})


@contextlib.contextmanager
def flow_run(params: Params, run_name: str, extra_tags: dict[str, str] | None = None) -> Iterator[Any]:
    """The parent run of one flow run (or a standalone run for one DVC stage)."""
    with mlflow.start_run(run_name=run_name, tags={**run_tags(params), **(extra_tags or {})}) as run:
        _log_params(params)
        yield run


def lineage(name: str, layout: Layout) -> dict[str, str]:
    """DVC md5 of every input and output artifact of a stage, at its path in the store (or the workspace)."""
    stage = get_stage(name)
    md5 = (lambda path: stored_md5(str(path))) if layout.stored else dvc_md5
    tags = {}
    for kind, paths in (("input", stage.input_paths(layout)), ("output", stage.output_paths(layout))):
        for key, path in paths.items():
            tags[f"lineage.{kind}.{key}"] = f"{path}@{md5(path)}"
    return tags


def log_stage(name: str, params: Params, result: StageResult, cached: bool, layout: Layout, nested: bool = True) -> None:
    """A run for one stage: its metrics, its metrics file and the hashes of what it read and wrote (the parent run
    gets the metrics of all stages at the end, with the models: `models.log_results`)."""
    tags = {"stage": name, "cached": str(cached).lower(), **owner_tag(), **lineage(name, layout)}
    with mlflow.start_run(run_name=name, nested=nested, tags=tags):
        section = {key: select(params, key) for key in get_stage(name).params}
        mlflow.log_params({k: _param_value(v) for k, v in flatten(section).items()})
        if result.metrics:
            mlflow.log_metrics(result.metrics)
        for row in result.info.get("history", []):
            step = int(row.get("step", 0))
            mlflow.log_metrics({f"eval.{k}": v for k, v in row.items() if k not in ("step",)}, step=step)
        metrics_file = get_stage(name).metrics_path(layout)
        if metrics_file.is_file():
            mlflow.log_artifact(str(metrics_file))
        for plot in result.info.get("plots", []):
            mlflow.log_artifact(plot)


FINGERPRINT_TAG = "lowrank.fingerprint"


def finished_run(fingerprint: str) -> str | None:
    """The id of a finished run that logged the result of this fingerprint (its last stage's), if any."""
    found = mlflow.search_runs(
        filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and attributes.status = 'FINISHED'",
        max_results=1, output_format="list",
    )
    return found[0].info.run_id if found else None


def log_configuration(
    params: Params, name: str, overrides: dict[str, Any], results: dict[str, tuple[StageResult, bool]], layout: Layout,
    fingerprint: str, tags: dict[str, str],
) -> str:
    """One run per sweep configuration: its params, every stage's metrics as `<stage>.<metric>`, the lineage of each artifact.

    One flat run per configuration (not a nested run per stage, as `lowrank run` logs) keeps a sweep's
    runs side by side in one table of the UI, each with the overrides that set it apart as tags. A
    configuration the store held whole keeps the run it already has (found by its last stage's
    fingerprint), so rerunning a sweep does not fill the table with copies.
    """
    if all(cached for _, cached in results.values()) and (found := finished_run(fingerprint)):
        return found
    tags = {**tags, FINGERPRINT_TAG: fingerprint}
    override_tags = {f"sweep.{key}": _param_value(value) for key, value in overrides.items()}
    with mlflow.start_run(run_name=run_name(params, name), tags={**run_tags(params), **override_tags, **tags}) as run:
        _log_params(params)
        scored = log_datasets(params, layout)
        log_results({name: result for name, (result, _) in results.items()}, params, layout, scored)
        lineage_tags = {f"{name}.{k}": v for name in results for k, v in lineage(name, layout).items()}
        cached = [name for name, (_, was_cached) in results.items() if was_cached]
        mlflow.set_tags({**lineage_tags, "cached_stages": ",".join(cached)})
        return run.info.run_id


SWEEP_RUN_TAG = "lowrank.sweep_run"  # marks a sweep's own run
SWEEP_RUNS_TAG = "lowrank.sweep_runs"  # on it: its configurations' run ids (a rerun reuses runs an earlier sweep made)
CHAMPION_TAG = "lowrank.champion_run"  # on it: the configuration run registered as the champion


def sweep_rows(cfg: TrackingConfig, sweep: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A sweep's configurations as MLflow has them (the last sweep by default): score, parameters kept, latency, Pareto mark."""
    configure(cfg)
    where = f"tags.`{SWEEP_RUN_TAG}` = 'true'" + (f" and tags.sweep = '{sweep}'" if sweep else "")
    found = mlflow.search_runs(filter_string=where, order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not found:
        raise LookupError(f"no sweep{' ' + sweep if sweep else ''} in experiment {cfg.experiment} at {cfg.uri}")
    return found[0].data.tags["sweep"], configuration_rows(found[0].data.tags[SWEEP_RUNS_TAG].split(","))


def _status(client: Any, run: Any, evaluation: str) -> str:
    """The run's status, and its model's where that is not READY (an upload that failed: the model does not load)."""
    model_id = run.data.tags.get(f"{MODEL_TAG}{evaluation}")
    try:
        model = client.get_logged_model(model_id) if model_id else None
    except mlflow.MlflowException:
        return f"{run.info.status}, model {model_id} missing"
    state = getattr(getattr(model, "status", None), "value", "READY")
    return run.info.status if state == "READY" else f"{run.info.status}, model {state}"


def configuration_rows(run_ids: list[str]) -> list[dict[str, Any]]:
    """One row per configuration run, and whether it is on the Pareto front of score against parameters kept."""
    from lowrank.pipeline.plan import shipped
    from lowrank.pipeline.summary import pareto

    client, rows, goal = mlflow.MlflowClient(), [], "max"
    for run in (client.get_run(run_id) for run_id in run_ids):
        metrics, evaluation, goal = run.data.metrics, shipped(run.data.tags["path"])[0], run_goal(run)  # one task: one goal
        dense = metrics.get("evaluate_dense.params.target_linear")
        rows.append({
            "run": run.info.run_name, "run_id": run.info.run_id, "status": _status(client, run, evaluation),
            "method": run.data.tags.get("method"),
            "keep_ratio": float(run.data.tags.get("keep_ratio", "nan")),
            "score": metrics.get(f"{evaluation}.task.score"),
            "dense_score": metrics.get("evaluate_dense.task.score"),
            **{f"dense_latency_ms.batch_{b}": metrics.get(f"evaluate_dense.latency.batch_{b}.median_ms") for b in (1, 32)},
            "params_kept": metrics[f"{evaluation}.params.target_linear"] / dense if dense else None,
            **{f"latency_ms.batch_{b}": metrics.get(f"{evaluation}.latency.batch_{b}.median_ms") for b in (1, 32)},
        })
    worst = 0.0 if goal == "max" else math.inf  # what a configuration without a score counts as
    marks = pareto([(worst if r["score"] is None else r["score"], r["params_kept"] or 1.0) for r in rows], goal)
    for row, mark in zip(rows, marks):
        row["pareto"] = mark
    return rows


def log_sweep(cfg: TrackingConfig, sweep: str, run_ids: list[str], metrics_dir: Path, champion: dict[str, Any] | None = None) -> str:
    """The sweep's own run: its configurations as an MLflow table and `metrics/sweep.json` (for DVC), the Pareto plots."""
    from lowrank.io.files import write_json
    from lowrank.pipeline.plots import plot_pareto

    from lowrank.pipeline.summary import pareto

    rows = configuration_rows(run_ids)
    dense = next((r["dense_score"] for r in rows if r["dense_score"] is not None), None)
    table = write_json(metrics_dir / "sweep.json", {"sweep": sweep, "configurations": rows, "champion": champion})
    scored = [r for r in rows if r["score"] is not None and r["params_kept"] is not None]
    goal = run_goal(mlflow.MlflowClient().get_run(run_ids[0])) if run_ids else "max"
    plots = [plot_pareto(scored, dense, metrics_dir / "sweep_pareto.png")]
    for batch in (1, 32):  # the trade-off against CPU latency, where the evaluations measured it
        x = f"latency_ms.batch_{batch}"
        timed = [r for r in scored if r[x] is not None]
        if timed:
            front = pareto([(r["score"], r[x]) for r in timed], goal)
            dense_x = next((r[f"dense_{x}"] for r in timed if r[f"dense_{x}"] is not None), None)
            plots.append(plot_pareto(timed, dense, metrics_dir / f"sweep_latency_batch_{batch}.png", x=x,
                                     xlabel=f"CPU latency at batch {batch} (ms, eager PyTorch)", front=front, dense_x=dense_x))
    tags = {"sweep": sweep, SWEEP_RUN_TAG: "true", SWEEP_RUNS_TAG: ",".join(run_ids), **owner_tag()}
    if champion and champion.get("registered"):
        tags[CHAMPION_TAG] = champion["run_id"]
    with mlflow.start_run(run_name=f"sweep {sweep}", tags=tags) as run:
        mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, "sweep_table.json")
        mlflow.log_artifact(str(table))
        for plot in plots:
            mlflow.log_artifact(str(plot))
        mlflow.log_metrics({"configurations": len(rows), "pareto": sum(r["pareto"] for r in rows)})
        return run.info.run_id
