"""Sweeps: the spec, the fingerprints configurations share, the store's lock, and `lowrank sweep` end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GLUE_DIR, lowrank_env, run_sweep as _sweep, save_tiny_model, tiny_params
from lowrank.config import ConfigError, InputError, SweepConfig, build, configurations, expand, load_params
from lowrank.pipeline import Layout, pipeline
from lowrank.pipeline.store import fingerprints

LOWRANK = [sys.executable, "-m", "flows.cli"]
GRID = {"factorize.method": ["svd", "fwsvd"], "factorize.keep_ratio": [0.5, 0.3]}


def _spec(**raw) -> SweepConfig:
    return build(SweepConfig, raw, "sweep")


def test_grid_product_then_configs() -> None:
    configs = expand(_spec(grid=GRID, configs=[{"factorize.method": "tfwsvd", "factorize.keep_ratio": 0.15}]))
    assert len(configs) == 5
    assert configs[0] == {"factorize.method": "svd", "factorize.keep_ratio": 0.5}
    assert configs[1] == {"factorize.method": "svd", "factorize.keep_ratio": 0.3}
    assert configs[-1] == {"factorize.method": "tfwsvd", "factorize.keep_ratio": 0.15}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"grid": {"factorize.rank": [4]}}, "sweep key factorize.rank is not a param"),
        ({"grid": {"factorise.method": ["svd"]}}, "sweep key factorise.method is not a param"),
        ({}, "the grid is empty"),
        ({"grid": {"factorize.method": []}}, "sweep.grid.factorize.method: give a non-empty list"),
        ({"grid": {"factorize.keep_ratio": [0.5, 1.5]}}, "sweep configuration 2 (keep_ratio=1.5): factorize.keep_ratio"),
        ({"configs": [{"factorize.method": "svd"}, {"factorize.method": "sparse_svd"}]}, "sweep configuration 2 (method=sparse_svd)"),
        ({"grid": {"data.seed": list(range(51))}}, "51 configurations (more than 50); pass --yes"),
    ],
)
def test_bad_sweeps_fail_with_one_line(tmp_path: Path, raw: dict, message: str) -> None:
    params = tiny_params(tmp_path, tmp_path / "model", GLUE_DIR)
    with pytest.raises(InputError) as err:
        configurations(params, _spec(**raw))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_more_than_fifty_configurations_with_yes(tmp_path: Path) -> None:
    params = tiny_params(tmp_path, tmp_path / "model", GLUE_DIR)
    assert len(configurations(params, _spec(grid={"data.seed": list(range(51))}), yes=True)) == 51


def test_configurations_share_the_stages_they_agree_on(tmp_path: Path) -> None:
    base = tiny_params(tmp_path, tmp_path / "model", GLUE_DIR)
    prints = []
    for _, params in configurations(base, _spec(grid=GRID)):
        prints.append(fingerprints(params, pipeline(params)))
    for shared in ("prepare", "finetune", "fisher", "evaluate_dense"):
        assert len({p[shared] for p in prints}) == 1, shared
    for own in ("factorize", "finetune_compressed", "evaluate_compressed", "summary_factorize"):
        assert len({p[own] for p in prints}) == 4, own
    # LPAF: pruning depends on the density (the keep ratio), not on the factorizer that follows it.
    lpaf = _spec(grid={"factorize.method": ["sparse_svd", "sparse_tfwsvd"], "factorize.keep_ratio": [0.5, 0.3]})
    prunes = [fingerprints(p, pipeline(p))["prune"] for _, p in configurations(base, lpaf, ["orchestration.path=lpaf"])]
    assert len(set(prunes)) == 2 and prunes[0] == prunes[2] and prunes[1] == prunes[3]


def test_factorize_only_path_stops_before_ft(tmp_path: Path) -> None:
    from lowrank.pipeline.plan import shipped

    params = load_params(tiny_params(tmp_path, tmp_path / "model", GLUE_DIR), ["orchestration.path=factorize_only"])
    assert pipeline(params) == ["prepare", "finetune", "evaluate_dense", "fisher", "factorize", "evaluate_factorized", "summary_factorize_only"]
    assert shipped("factorize_only") == ("evaluate_factorized", "factorize", "model")
    assert shipped("factorize") == ("evaluate_compressed", "finetune_compressed", "model")
    with pytest.raises(ConfigError, match="sparse_svd factorizes pruned matrices"):
        load_params(tiny_params(tmp_path, tmp_path / "model", GLUE_DIR), ["orchestration.path=factorize_only", "factorize.method=sparse_svd"])


def test_pareto_front_keeps_what_nothing_beats() -> None:
    from lowrank.pipeline.summary import pareto

    points = [(0.80, 0.5), (0.78, 0.3), (0.79, 0.5), (0.70, 0.15), (0.70, 0.3), (0.78, 0.3)]
    # (0.79, 0.5) loses to (0.80, 0.5); (0.70, 0.3) to (0.78, 0.3); equal points do not beat each other
    assert pareto(points) == [True, True, False, True, False, True]


def test_fingerprints_change_with_params_not_with_paths(tmp_path: Path) -> None:
    base = tiny_params(tmp_path, tmp_path / "model", GLUE_DIR)
    one = fingerprints(load_params(base), ["summary_factorize"])
    moved = fingerprints(load_params(base, ["paths.artifacts=elsewhere", "tracking.enabled=false"]), ["summary_factorize"])
    assert one == moved
    lr = fingerprints(load_params(base, ["finetune.lr=0.002"]), ["summary_factorize"])
    assert lr["prepare"] == one["prepare"] and lr["finetune"] != one["finetune"] and lr["factorize"] != one["factorize"]


LOCK_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from lowrank.config import load_params
from lowrank.pipeline import Layout
from lowrank.pipeline.store import fingerprints, run_stored
params = load_params(sys.argv[1])
layout = Layout.from_params(params, fingerprints(params, ["finetune"]))
ready = Path(sys.argv[2])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 2:  # both processes start the stages at the same moment, once both have imported
    time.sleep(0.01)
print(json.dumps({name: run_stored(name, params, layout)[1] for name in ("prepare", "finetune")}))
"""


def test_two_processes_compute_each_store_entry_once(tmp_path: Path, glue_dir: Path) -> None:
    params = tiny_params(tmp_path, save_tiny_model(tmp_path / "model"), glue_dir)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = lowrank_env()
    processes = [
        subprocess.Popen([sys.executable, "-c", LOCK_SCRIPT, str(params), str(ready)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    cached = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for name in ("prepare", "finetune"):
        assert sorted(c[name] for c in cached) == [False, True], name  # one computed it, the other waited and reused it
    loaded = load_params(params)
    layout = Layout.from_params(loaded, fingerprints(loaded, ["finetune"]))
    entries = [p for p in (tmp_path / "artifacts" / "store" / "finetune").iterdir() if p.is_dir()]
    assert entries == [layout.entry("finetune")]


@pytest.mark.slow
def test_sweep_shares_stages_keeps_every_model_and_fails_one_configuration_alone(failing_sweep: dict) -> None:
    import mlflow

    tmp_path, env, code, summary, err = (failing_sweep[k] for k in ("root", "env", "code", "summary", "err"))
    assert code == 1, err[-3000:]  # the fifth configuration fails, alone
    configs = summary["configs"]
    assert [c["status"] for c in configs] == ["completed"] * 4 + ["failed"]
    assert "fisher" in configs[4]["error"] and "no.such.layer" in configs[4]["error"].replace("\\", "")
    stages = summary["stages"]
    for shared in ("prepare", "finetune", "evaluate_dense"):
        assert stages[shared] == {"ran": 1, "cached": 0, "failed": 0}, shared
    assert stages["fisher"] == {"ran": 1, "cached": 0, "failed": 1}
    assert stages["factorize"]["ran"] == 4 and stages["summary_factorize"]["ran"] == 4
    models = [Path(c["model"]) for c in configs[:4]]
    assert len(set(models)) == 4 and all((m / "model.safetensors").is_file() for m in models)
    assert all(0 <= c["score"] <= 1 for c in configs[:4])
    assert [c["keep_ratio_reached"] <= c["overrides"]["factorize.keep_ratio"] for c in configs[:4]] == [True] * 4
    assert summary["engine"] == {"runner": "local", "workers": 2, "threads": 1, "address": None}
    finetune = configs[0]["stages"]["finetune"]
    assert finetune["cached"] is False and finetune["seconds"] > 0 and finetune["peak_rss_mib"] > 100  # torch alone is more

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {c["mlflow_run_id"]: c for c in configs[:4]}
    for run_id, config in runs.items():
        run = client.get_run(run_id)
        assert run.data.tags["sweep.factorize.method"] == config["overrides"]["factorize.method"]
        assert run.data.metrics["evaluate_compressed.task.score"] == config["score"]
        assert run.data.tags["finetune_compressed.lineage.output.model"].startswith(config["model"])
        method, ratio = config["overrides"]["factorize.method"], config["overrides"]["factorize.keep_ratio"]
        assert run.info.run_name == f"sst2-{method}-{ratio}-seed42"
        assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["sst2-select", "sst2-train", "sst2-validation"]

    # The sweep's own run: the table (also metrics/sweep.json, for DVC) and the Pareto plot.
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_sweep_run_id"])}
    assert {"sweep.json", "sweep_pareto.png", "sweep_table.json"} <= artifacts
    assert len(json.loads((tmp_path / "metrics" / "sweep.json").read_text())["configurations"]) == 4

    # `lowrank compare` reads the sweep back from MLflow: the completed configurations, the Pareto front marked.
    done = subprocess.run([*LOWRANK, "compare", "--format", "csv"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import csv

    table = list(csv.DictReader(done.stdout.splitlines()))
    assert {r["status"] for r in table} == {"FINISHED"}  # a FAILED run or model would say so here
    assert sorted(r["run"] for r in table) == sorted(f"sst2-{c['overrides']['factorize.method']}-{c['overrides']['factorize.keep_ratio']}-seed42" for c in configs[:4])
    for row in table:
        beaten = any(float(o["score"]) >= float(row["score"]) and float(o["params_kept"]) <= float(row["params_kept"])
                     and (float(o["score"]), float(o["params_kept"])) != (float(row["score"]), float(row["params_kept"])) for o in table)
        assert row["pareto"] == str(not beaten)

    # A rerun computes only what failed; every finished configuration comes from the store, with its MLflow run.
    code, again, _ = _sweep(tmp_path, env, "--workers", "2")
    assert code == 1
    assert again["stages"]["fisher"] == {"ran": 0, "cached": 1, "failed": 1}
    assert all(row["ran"] == 0 for row in again["stages"].values())
    assert [c["mlflow_run_id"] for c in again["configs"][:4]] == list(runs)
    assert [c["score"] for c in again["configs"]] == [c["score"] for c in configs]


@pytest.mark.slow
def test_sweep_on_a_local_dask_cluster_gives_the_same_bytes(tmp_path: Path, prefect_api: str) -> None:
    model = save_tiny_model(tmp_path / "model")
    env = lowrank_env(PREFECT_API_URL=prefect_api)
    results = {}
    for runner in ("local", "dask"):
        project = tmp_path / runner
        project.mkdir()
        tiny_params(project, model, GLUE_DIR, evaluate={"latency": False}, tracking={"enabled": False},
                    sweep={"grid": {"factorize.method": ["svd", "fwsvd"]}})
        # --gpu: the training stages ask for the worker resource GPU=1, which each worker of the local cluster has
        options = ["--gpu"] if runner == "dask" else []
        code, summary, err = _sweep(project, env, "--runner", runner, "--workers", "2", "--threads", "1", *options)
        assert code == 0, err[-3000:]
        results[runner] = summary
    assert results["dask"]["engine"]["runner"] == "dask"
    for local, dask in zip(results["local"]["configs"], results["dask"]["configs"]):
        assert local["score"] == dask["score"]
        local_model, dask_model = Path(local["model"]), Path(dask["model"])
        assert local_model.relative_to(tmp_path / "local") == dask_model.relative_to(tmp_path / "dask")  # same fingerprint
        assert (local_model / "model.safetensors").read_bytes() == (dask_model / "model.safetensors").read_bytes()


def test_a_scheduler_that_does_not_answer_fails_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    tiny_params(tmp_path, tmp_path / "model", GLUE_DIR, sweep={"grid": GRID})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWRANK_DEBUG", "")  # as a user runs it, whatever an earlier in-process `--debug` left
    done = CliRunner().invoke(app, ["sweep", "--runner", "dask", "--address", f"tcp://127.0.0.1:{port}"])  # in-process
    assert done.exit_code == 2
    assert done.stderr.strip().splitlines() == [f"error: --address tcp://127.0.0.1:{port}: no scheduler answers (Connection refused)"]
    assert done.stdout == "" and not (tmp_path / "artifacts").exists()


def _postgres_databases(*names: str):
    """Fresh databases on the machine's PostgreSQL (trust auth), or a skip that says why there are none."""
    try:
        import psycopg2

        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except Exception as err:  # noqa: BLE001  no server, no driver, no trust: the test cannot run here
        pytest.skip(f"no PostgreSQL answers at 127.0.0.1:5432 as user postgres ({str(err).strip().splitlines()[0]})")
    admin.autocommit = True
    with admin.cursor() as cursor:
        for name in names:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cursor.execute(f'CREATE DATABASE "{name}"')
    return admin


def _task_runs(api: str) -> list[dict]:
    import httpx

    return httpx.post(f"{api}/task_runs/filter", json={"limit": 200}, timeout=30).json()


@pytest.mark.slow
def test_parallel_sweep_on_an_mlflow_server_over_postgresql_loses_no_run(tmp_path: Path) -> None:
    """Prefect's server and `mlflow server` both on PostgreSQL; what the UI shows is checked over MLflow's REST API."""
    import httpx

    from conftest import mlflow_server, prefect_server

    suffix = f"{os.getpid()}_{int(time.time())}"
    mlflow_db, prefect_db = f"lowrank_mlflow_{suffix}", f"lowrank_prefect_{suffix}"
    admin = _postgres_databases(mlflow_db, prefect_db)
    try:
        model = save_tiny_model(tmp_path / "model")
        backend = f"postgresql://postgres@127.0.0.1:5432/{mlflow_db}"
        database = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}"
        with mlflow_server(tmp_path, backend) as uri, prefect_server(tmp_path / "prefect-home", PREFECT_SERVER_DATABASE_CONNECTION_URL=database) as api:
            tiny_params(tmp_path, model, GLUE_DIR, evaluate={"latency": False}, tracking={"uri": uri}, sweep={"grid": GRID})
            code, summary, err = _sweep(tmp_path, lowrank_env(PREFECT_API_URL=api), "--workers", "2")
            assert code == 0, err[-3000:]
            ran = sum(row["ran"] for row in summary["stages"].values())
            task_runs = _task_runs(api)
            assert len(task_runs) == ran == 4 + 4 * 5  # prepare, finetune, evaluate_dense, fisher; five stages per configuration
            assert {run["state"]["type"] for run in task_runs} == {"COMPLETED"}

            rest = f"{uri}/api/2.0/mlflow"
            experiment = httpx.get(f"{rest}/experiments/get-by-name", params={"experiment_name": "lowrank"}).json()["experiment"]
            runs = httpx.post(f"{rest}/runs/search", json={"experiment_ids": [experiment["experiment_id"]], "max_results": 100}).json()["runs"]
            sweep_runs = [r["info"]["run_id"] for r in runs if any(t["key"] == "lowrank.sweep_run" for t in r["data"].get("tags", []))]
            assert sweep_runs == [summary["mlflow_sweep_run_id"]]
            assert sorted(r["info"]["run_id"] for r in runs if r["info"]["run_id"] not in sweep_runs) == sorted(c["mlflow_run_id"] for c in summary["configs"])
            assert {r["info"]["status"] for r in runs} == {"FINISHED"}

            # The champion, its metrics and its datasets, as the UI reads them.
            champion = summary["champion"]
            best = max(summary["configs"], key=lambda c: (c["score"], -c["keep_ratio_reached"]))  # a tie: the smaller model
            version = httpx.get(f"{rest}/registered-models/alias", params={"name": "lowrank-sst2", "alias": "champion"}).json()["model_version"]
            tags = {t["key"]: t["value"] for t in version["tags"]}
            assert champion["registered"] and version["version"] == str(champion["version"])
            assert tags["source_run"] == best["mlflow_run_id"] and float(tags["task.score"]) == best["score"]
            run = httpx.get(f"{rest}/runs/get", params={"run_id": best["mlflow_run_id"]}).json()["run"]
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert metrics["evaluate_compressed.task.score"] == best["score"]
            assert sorted(d["dataset"]["name"] for d in run["inputs"]["dataset_inputs"]) == ["sst2-select", "sst2-train", "sst2-validation"]
            assert {o["model_id"] for o in run["outputs"]["model_outputs"]} >= {champion["model_id"]}

            import mlflow
            import pandas as pd

            mlflow.set_tracking_uri(uri)  # the weights come back through the server's artifact proxy
            predicted = mlflow.pyfunc.load_model("models:/lowrank-sst2@champion").predict(pd.DataFrame({"text": ["a fine film"]}))
            assert list(predicted.columns) == ["label", "score"] and 0.5 <= predicted["score"][0] <= 1
    finally:
        with admin.cursor() as cursor:
            for name in (mlflow_db, prefect_db):
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.mark.slow
def test_a_served_sweep_deployment_runs_to_completion(tmp_path: Path, prefect_api: str) -> None:
    import httpx

    model = save_tiny_model(tmp_path / "model")
    tiny_params(tmp_path, model, GLUE_DIR, evaluate={"latency": False}, tracking={"enabled": False},
                sweep={"grid": {"factorize.keep_ratio": [0.5, 0.3]}})
    env = lowrank_env(PREFECT_API_URL=prefect_api)
    server = subprocess.Popen([*LOWRANK, "--quiet", "serve", "--sweep", "--cron", "0 3 * * *", "--workers", "2"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            found = httpx.post(f"{prefect_api}/deployments/filter", json={"deployments": {"name": {"any_": ["scheduled"]}}}).json()
            if found:
                break
            assert server.poll() is None, server.stderr.read()[-3000:]
            time.sleep(0.5)
        (deployment,) = found
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: prefect_api}):
            run = run_deployment(f"sweep/{deployment['name']}", timeout=300)  # the serve process picks it up
        state = run.state.type.value
        message = run.state.message
        assert state == "COMPLETED", message
    finally:
        server.terminate()
        server.wait(60)
    entries = [p for p in (tmp_path / "artifacts" / "store" / "finetune_compressed").iterdir() if p.is_dir()]
    assert len(entries) == 2 and all((e / "finetune_compressed" / "model" / "model.safetensors").is_file() for e in entries)
