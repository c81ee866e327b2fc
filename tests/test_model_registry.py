"""MLflow as the place models ship from: logged pyfunc models, the registered champion, serving, the choice under a budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import _free_port, save_tiny_model, serving
from lowrank.config import ConfigError, SelectConfig


def _completed(summary: dict) -> list[dict]:
    return [c for c in summary["configs"] if c["status"] == "completed"]


def _best(summary: dict) -> dict:
    """The best score; a tie goes to the smaller model, then the earlier configuration."""
    return max(_completed(summary), key=lambda c: (c["score"], -c["keep_ratio_reached"]))


@pytest.mark.slow
def test_every_scored_model_is_logged_once_and_the_best_is_the_champion(failing_sweep: dict) -> None:
    import mlflow

    summary = failing_sweep["summary"]
    client = mlflow.MlflowClient(tracking_uri=failing_sweep["uri"])
    experiment = client.get_experiment_by_name("lowrank").experiment_id
    models = client.search_logged_models([experiment])
    stages = sorted(m.tags["stage"] for m in models)
    # the dense model all four configurations share is one logged model; each factorized and + ft model its own
    assert stages == ["factorize"] * 4 + ["finetune"] + ["finetune_compressed"] * 4
    for config in _completed(summary):
        run = client.get_run(config["mlflow_run_id"])
        final = client.get_logged_model(run.data.tags["model.evaluate_compressed"])
        assert final.tags["method"] == config["overrides"]["factorize.method"]
        linked = {m.key: m.value for m in final.metrics}
        assert linked["evaluate_compressed.task.score"] == config["score"]  # the model page shows its metrics
        assert {m.dataset_name for m in final.metrics} == {"sst2-validation"}

    champion = summary["champion"]
    best = _best(summary)
    assert champion["registered"] and champion["name"] == "lowrank-sst2" and champion["value"] == best["score"]
    version = client.get_model_version_by_alias("lowrank-sst2", "champion")
    assert version.tags["method"] == best["overrides"]["factorize.method"]
    assert float(version.tags["keep_ratio"]) == best["overrides"]["factorize.keep_ratio"]
    assert float(version.tags["task.score"]) == best["score"]
    assert version.tags["lineage.model"].startswith(best["model"])
    assert client.get_run(summary["mlflow_sweep_run_id"]).data.tags["lowrank.champion_run"] == best["mlflow_run_id"]


def _validation(failing_sweep: dict, config: dict):
    """The champion configuration's validation rows as raw text, and its prepared (tokenized) split."""
    from lowrank.config import load_params
    from lowrank.config.sweep_spec import as_overrides
    from lowrank.data.loading import load_raw_from_config
    from lowrank.pipeline import Layout, PreparedData, get_stage, pipeline
    from lowrank.pipeline.store import fingerprints

    params = load_params(failing_sweep["root"] / "params.yaml", as_overrides(config["overrides"]))
    layout = Layout.from_params(params, fingerprints(params, pipeline(params)))
    prepared = PreparedData.open(get_stage("prepare").output_paths(layout)["data"])
    return load_raw_from_config(params.data)["validation"].to_pandas(), prepared


@pytest.mark.slow
def test_the_champion_predicts_what_the_pipeline_scored(failing_sweep: dict) -> None:
    import mlflow
    import numpy as np
    import pandas as pd

    from lowrank import load_compressed
    from lowrank.evaluation import predict

    summary = failing_sweep["summary"]
    best = _best(summary)
    raw, prepared = _validation(failing_sweep, best)
    mlflow.set_tracking_uri(failing_sweep["uri"])
    served = mlflow.pyfunc.load_model("models:/lowrank-sst2@champion").predict(pd.DataFrame({"text": raw["text_a"]}))

    model = load_compressed(best["model"])
    predicted = predict(model, prepared.loader("validation", 64))
    logits, labels = predicted["logits"], predicted["labels"]
    probs = logits.softmax(-1)
    names = model.config.id2label  # SST-2's: negative, positive
    assert served["label"].tolist() == [names[i] for i in probs.argmax(-1).tolist()]
    np.testing.assert_allclose(served["score"].to_numpy(), probs.max(-1).values.numpy(), atol=1e-6)
    ids = {name: i for i, name in names.items()}
    accuracy = float((served["label"].map(ids).to_numpy() == labels.numpy()).mean())
    assert accuracy == pytest.approx(best["score"], abs=1e-12)


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(failing_sweep: dict) -> None:
    import httpx
    import mlflow
    import pandas as pd

    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/lowrank-sst2@champion", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    env = {**failing_sweep["env"], "MLFLOW_TRACKING_URI": failing_sweep["uri"]}
    with serving(command, env, f"http://127.0.0.1:{port}/ping", "mlflow models serve", cwd=failing_sweep["root"]):
        texts = ["a gripping , funny film", "the plot goes nowhere", "dull"]
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                            json={"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}})
        assert answer.status_code == 200, answer.text
        mlflow.set_tracking_uri(failing_sweep["uri"])
        local = mlflow.pyfunc.load_model("models:/lowrank-sst2@champion").predict(pd.DataFrame({"text": texts}))
        assert answer.json()["predictions"] == local.to_dict(orient="records")


def _run(path: str, keep_ratio: float, score: float | None, latency: float | None = None):
    metrics = {"evaluate_compressed.params.target_linear": keep_ratio * 1000}
    if score is not None:
        metrics["evaluate_compressed.task.score"] = score
    if latency is not None:
        metrics["evaluate_compressed.latency.batch_1.median_ms"] = latency
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={"path": path, "keep_ratio": str(keep_ratio)}))


def test_select_takes_the_best_within_the_budget() -> None:
    from tasks.models import choose

    runs = [_run("factorize", 0.5, 0.9, 4.0), _run("factorize", 0.3, 0.8, 3.0), _run("factorize", 0.15, 0.7, 2.0)]
    assert choose(SelectConfig(), runs)[0] is runs[0]
    assert choose(SelectConfig(max_keep_ratio=0.3), runs)[0] is runs[1]
    assert choose(SelectConfig(max_latency_ms=2.5), runs)[0] is runs[2]
    assert choose(SelectConfig(metric="latency.batch_1.median_ms", goal="min"), runs)[0] is runs[2]
    tied = [_run("factorize", 0.5, 0.8), _run("factorize", 0.3, 0.8), _run("factorize", 0.3, 0.8)]
    assert choose(SelectConfig(), tied)[0] is tied[1]  # a tie goes to the smaller model, then the earlier configuration
    best, reason = choose(SelectConfig(max_keep_ratio=0.1), runs)
    assert best is None and reason == "no configuration meets max_keep_ratio=0.1: nothing registered"
    with pytest.raises(ConfigError, match="sweep.select.metric: no configuration logged task.f1"):
        choose(SelectConfig(metric="task.f1"), runs)
    with pytest.raises(ConfigError, match="max_latency_ms: no configuration logged"):
        choose(SelectConfig(max_latency_ms=1.0), [_run("factorize", 0.5, 0.9)])


def test_the_pyfunc_loader_refuses_a_folder_without_the_recipe(tmp_path: Path) -> None:
    import importlib

    module = importlib.import_module("tasks.pyfunc_model")
    dense = save_tiny_model(tmp_path / "dense")
    model = module.LowrankClassifier()

    def context(folder: Path, **serving) -> SimpleNamespace:
        (tmp_path / "serving.json").write_text(json.dumps(serving))
        return SimpleNamespace(artifacts={"model": str(folder), "serving": str(tmp_path / "serving.json")})

    with pytest.raises(ValueError, match="config.json: no lowrank recipe"):
        model.load_context(context(dense, method="svd"))
    with pytest.raises(ValueError, match="not a lowrank model folder"):
        model.load_context(context(tmp_path, method="dense"))
    model.load_context(context(dense, method="dense", max_length=16))
    assert list(model.predict(None, {"text": ["abc", "de"]}).columns) == ["label", "score"]
