"""MLflow logged models and the Model Registry: every model a run scores, loadable and servable; a sweep's champion.

Each model folder an evaluate stage scored is logged once per experiment (found again by its DVC md5, so the
dense model that every configuration of a sweep shares is one logged model) as a pyfunc (tasks/pyfunc_model.py,
logged as code: no pickle). Its evaluation metrics are logged against it, so its page in the UI shows them with
the dataset they were measured on. `register_champion` names a sweep's best configuration under a budget
(`sweep.select`) and registers its final model as `lowrank-<task>@champion`.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from lowrank.config import Params, SelectConfig
from lowrank.pipeline import EVALUATIONS, Layout, get_stage
from lowrank.pipeline.plan import shipped

from .lineage import stored_md5

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
MD5_TAG = "lowrank.md5"
MODEL_TAG = "model."  # on a run: model.<evaluation> = the logged model id of what that evaluation scored
CHAMPION = "champion"


def _signature(spec: Any) -> tuple[Any, dict]:
    """The pyfunc's signature and input example, as the task's kind declares them (a nested list: an array of objects)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    from lowrank.kinds import get_kind

    def column(kind: Any, name: str, required: bool = True) -> ColSpec:  # a third item: False for an optional input
        if isinstance(kind, list):
            return ColSpec(Array(Object([Property(n, t) for t, n in kind])), name)
        return ColSpec(kind, name, required=required)

    inputs, outputs, example = get_kind(spec.kind).serving_schema(spec)
    signature = ModelSignature(inputs=Schema([column(*c) for c in inputs]), outputs=Schema([column(*c) for c in outputs]))
    return signature, example


def _requirements() -> list[str]:
    # Written down, not inferred: MLflow's inference imports and runs the model in a subprocess, seconds per model.
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "transformers", "safetensors", "pandas", "mlflow", "seqeval")]


def model_name(params: Params, maker: str) -> str:
    """The logged model's name: the task and what made it (the dense model has no method); MLflow forbids dots."""
    if maker == "finetune":
        return f"{params.data.task}-dense"
    return f"{params.data.task}-{params.factorize.method}-keep{params.factorize.keep_ratio * 100:g}-{maker}".replace(".", "p")


def log_model(evaluation: str, params: Params, layout: Layout) -> str:
    """The logged model id of the folder `evaluation` scored: found by its md5 in the experiment, else logged now."""
    from lowrank.data.loading import resolve_task

    folder = get_stage(evaluation).input_paths(layout)["model"]
    md5 = stored_md5(str(folder))
    experiment = mlflow.active_run().info.experiment_id
    found = mlflow.search_logged_models([experiment], filter_string=f"tags.`{MD5_TAG}` = '{md5}'", max_results=20, output_format="list")
    for model in found:  # an upload that failed (a full disk) left a model that does not load: log it again
        if whole(model, folder):
            return model.model_id
    maker = EVALUATIONS[evaluation].split(".", 1)[0]
    spec = resolve_task(params.data)
    method = "dense" if maker == "finetune" else ("pruned" if maker == "prune" else params.factorize.method)
    with tempfile.TemporaryDirectory(prefix="lowrank-serving-") as folder_tmp:
        serving = Path(folder_tmp) / "serving.json"
        serving.write_text(json.dumps({"max_length": params.data.max_length, "batch_size": params.evaluate.batch_size,
                                       "text_pair": spec.is_pair, "method": method}))
        info = _log_pyfunc(maker, params, folder, serving, spec, md5, method)
    return info.model_id


def _artifact_sizes(client: Any, model_id: str, path: str | None = None) -> dict[str, int]:
    sizes = {}
    for info in client.list_logged_model_artifacts(model_id, path):
        if info.is_dir:
            sizes.update(_artifact_sizes(client, model_id, info.path))
        else:
            sizes[info.path] = info.file_size
    return sizes


def whole(model: Any, folder: Path) -> bool:
    """Whether a logged model can be reused for `folder`: READY, and every file of the folder uploaded at its size."""
    from mlflow.entities import LoggedModelStatus

    if model.status != LoggedModelStatus.READY:
        return False
    try:
        sizes = _artifact_sizes(mlflow.MlflowClient(), model.model_id)
    except (OSError, mlflow.MlflowException):  # its artifacts are gone or unreadable
        return False
    local = [(file.relative_to(folder).as_posix(), file.stat().st_size) for file in folder.rglob("*") if file.is_file()]
    return all(any(path.endswith(f"/{rel}") and size == want for path, size in sizes.items()) for rel, want in local)


def _log_pyfunc(maker: str, params: Params, folder: Path, serving: Path, spec: Any, md5: str, method: str) -> Any:
    signature, example = _signature(spec)
    return mlflow.pyfunc.log_model(
        name=model_name(params, maker),
        python_model=str(MODEL_CODE),
        artifacts={"model": str(folder), "serving": str(serving)},
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(),
        tags={MD5_TAG: md5, "task": params.data.task, "stage": maker, "method": method,
              "keep_ratio": "1.0" if method == "dense" else str(params.factorize.keep_ratio)},
    )


def log_results(results: dict[str, Any], params: Params, layout: Layout, dataset: Any = None) -> dict[str, str]:
    """Every stage's metrics on the active run as `<stage>.<metric>`; each evaluation's against the model it scored
    (logged or found first) and `dataset`. Returns the model id of each evaluation.

    The models come first: logging a model links every metric its run already has to it, and the metrics of
    other stages go in as plain run metrics (MLflow's fluent call would link them to the run's models too).
    """
    import time

    from mlflow.entities import LoggedModelOutput, Metric

    client, run = mlflow.MlflowClient(), mlflow.active_run()
    ids = {name: log_model(name, params, layout) for name in results if name in EVALUATIONS}
    outputs = {output.model_id for output in (client.get_run(run.info.run_id).outputs.model_outputs or [])}
    found = [LoggedModelOutput(model_id, step=0) for model_id in dict.fromkeys(ids.values()) if model_id not in outputs]
    if found:  # a model an earlier run logged: an output of this run too, in its Models column
        client.log_outputs(run.info.run_id, found)
    now = int(time.time() * 1000)
    plain = [Metric(f"{name}.{k}", v, now, 0) for name, result in results.items() if name not in ids for k, v in result.metrics.items()]
    if plain:
        client.log_batch(run.info.run_id, metrics=plain)
    for name, model_id in ids.items():
        mlflow.log_metrics({f"{name}.{k}": v for k, v in results[name].metrics.items()}, model_id=model_id, dataset=dataset)
    mlflow.set_tags({f"{MODEL_TAG}{name}": model_id for name, model_id in ids.items()})
    return ids


# ---- the champion --------------------------------------------------------------------------------------------------


def _value(run: Any, metric: str) -> float | None:
    value = run.data.metrics.get(f"{shipped(run.data.tags['path'])[0]}.{metric}")
    return None if value is None or math.isnan(value) else value


def choose(select: SelectConfig, runs: list[Any]) -> tuple[Any | None, str]:
    """The best run under the budgets, and why (or why none); a metric that no run logged is an error."""
    from lowrank.config import ConfigError

    if not any(_value(run, select.metric) is not None for run in runs):
        raise ConfigError(f"sweep.select.metric: no configuration logged {select.metric}")
    within = [run for run in runs if _value(run, select.metric) is not None]
    if select.max_keep_ratio is not None:
        within = [run for run in within if float(run.data.tags["keep_ratio"]) <= select.max_keep_ratio + 1e-9]
    if select.max_latency_ms is not None:
        if not any(_value(run, select.latency_metric) is not None for run in runs):
            raise ConfigError(f"sweep.select.max_latency_ms: no configuration logged {select.latency_metric} (is evaluate.latency on?)")
        within = [run for run in within if (_value(run, select.latency_metric) or math.inf) <= select.max_latency_ms]
    budget = ", ".join(f"{k}={getattr(select, k)}" for k in ("max_keep_ratio", "max_latency_ms") if getattr(select, k) is not None)
    if not within:
        return None, f"no configuration meets {budget}: nothing registered"
    goal = select.goal_for(run_goal(runs[0]))
    sign = 1 if goal == "max" else -1  # a tie goes to the smaller model, then to the earlier configuration
    best = max(within, key=lambda run: (sign * _value(run, select.metric), -(_value(run, "params.target_linear") or 0)))
    return best, f"best {select.metric} ({goal}) of {len(within)} configuration(s)" + (f" within {budget}" if budget else "")


def run_goal(run: Any) -> str:
    """Whether a higher or a lower task score is better in a configuration run: its task kind's goal, from its params."""
    from lowrank.kinds import task_goal

    params = getattr(run.data, "params", None) or {}  # a run logged without its params: the defaults' task
    return task_goal(params.get("data.task", "sst2"), params.get("data.custom.kind"))


def register_champion(select: SelectConfig, task: str, run_ids: list[str]) -> dict[str, Any]:
    """Choose among the sweep's configuration runs and register the winner's final model with the alias `champion`."""
    client = mlflow.MlflowClient()
    runs = [client.get_run(run_id) for run_id in run_ids]
    best, reason = choose(select, runs)
    if best is None:
        sys.stderr.write(f"warning: sweep.select: {reason}\n")
        return {"registered": False, "reason": reason}
    evaluation = shipped(best.data.tags["path"])[0]
    report = {"run_id": best.info.run_id, "run": best.info.run_name, "metric": select.metric,
              "value": _value(best, select.metric), "reason": reason, "registered": False}
    if not select.register:
        return report
    name = select.name or f"lowrank-{task}"
    model_id = best.data.tags[f"{MODEL_TAG}{evaluation}"]
    version = mlflow.register_model(f"models:/{model_id}", name, tags=_champion_tags(best, evaluation, select))
    client.set_registered_model_alias(name, CHAMPION, version.version)
    client.update_model_version(name, version.version, description=f"{best.info.run_name}: {reason}; {select.metric} {report['value']:.4g}")
    return {**report, "registered": True, "name": name, "version": version.version, "model_id": model_id,
            "uri": f"models:/{name}@{CHAMPION}"}


def _champion_tags(run: Any, evaluation: str, select: SelectConfig) -> dict[str, str]:
    """What the registry shows of a version: method, keep ratio, score, parameters, latency, and the lineage hashes."""
    metric = lambda key: run.data.metrics.get(f"{evaluation}.{key}")  # noqa: E731
    tags = {
        "method": run.data.tags.get("method"), "keep_ratio": run.data.tags.get("keep_ratio"),
        "task.score": metric("task.score"), "params.target_linear": metric("params.target_linear"),
        "params.total": metric("params.total"), select.latency_metric: metric(select.latency_metric),
        "selected_by": f"{select.goal_for(run_goal(run))} {select.metric}", "source_run": run.info.run_id, "sweep": run.data.tags.get("sweep"),
    }
    maker = shipped(run.data.tags["path"])[1]
    tags["lineage.model"] = run.data.tags.get(f"{maker}.lineage.output.model")  # path@md5 of the weights, and of the data
    tags["lineage.data"] = run.data.tags.get("prepare.lineage.output.data")
    return {k: str(v) for k, v in tags.items() if v is not None}
