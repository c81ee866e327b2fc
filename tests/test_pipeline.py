"""End to end on a tiny BERT and 48 SST-2 sentences: the library, Prefect, MLflow and DVC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

from conftest import LOWRANK, REPO, lowrank_env, tiny_params
from lowrank.config import load_params
from lowrank.pipeline import Layout, get_stage, pipeline, preflight


def _run_stages(params_path: Path, names: list[str]) -> dict:
    params = load_params(params_path)
    preflight(params)
    layout = Layout.from_params(params)
    return {name: get_stage(name).run(params, layout) for name in names}


def test_dense_stages_write_artifacts_and_metrics(tmp_path: Path, tiny_model_dir: Path, glue_dir: Path) -> None:
    params_path = tiny_params(tmp_path, tiny_model_dir, glue_dir)
    results = _run_stages(params_path, ["prepare", "finetune", "evaluate_dense"])
    assert results["prepare"].metrics["train.rows"] == 48
    assert results["prepare"].metrics["validation.rows"] == 24
    finetune = json.loads((tmp_path / "metrics" / "finetune.json").read_text())
    assert finetune["steps"] == 3  # 48 rows / batch 16, one epoch
    evaluation = json.loads((tmp_path / "metrics" / "evaluate_dense.json").read_text())
    assert 0.0 <= evaluation["task"]["accuracy"] <= 1.0
    # 2 blocks x (4 * 32*32 + 2 * 32*64) targeted weights in the tiny BERT
    assert evaluation["params"]["target_linear"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert (tmp_path / "artifacts" / "finetune" / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "artifacts").rglob("*.tmp-*")), "a temporary artifact was left behind"


def test_missing_glue_file_fails_before_work(tmp_path: Path, tiny_model_dir: Path) -> None:
    empty = tmp_path / "glue"
    (empty / "SST-2").mkdir(parents=True)
    params = load_params(tiny_params(tmp_path, tiny_model_dir, empty))
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        preflight(params)
    assert not (tmp_path / "artifacts").exists()


def test_missing_model_path_is_named(tmp_path: Path, glue_dir: Path) -> None:
    params = load_params(tiny_params(tmp_path, tmp_path / "no-such-model", glue_dir))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        preflight(params)


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_prefect_flow_caches_and_tracks(tmp_path: Path, tiny_model_dir: Path, glue_dir: Path, prefect_harness, monkeypatch) -> None:
    import mlflow

    from flows.compress import compress

    monkeypatch.chdir(tmp_path)
    params_path = tiny_params(tmp_path, tiny_model_dir, glue_dir)
    names = pipeline(load_params(params_path))

    first = compress(str(params_path))
    assert [first[n]["cached"] for n in names] == [False] * len(names)
    second = compress(str(params_path))
    assert [second[n]["cached"] for n in names] == [True] * len(names)
    assert second["evaluate_dense"]["metrics"] == first["evaluate_dense"]["metrics"]

    third = compress(str(params_path), ["evaluate.latency_repeats=3", "evaluate.latency_runtimes=[torch,onnxruntime]"])
    rerun = {n for n in names if not third[n]["cached"]}
    assert rerun == {n for n in names if n.startswith(("evaluate", "summary"))}  # the summary reads their metrics
    assert third["evaluate_compressed"]["metrics"]["latency_onnxruntime.batch_4.median_ms"] > 0
    assert "latency_onnxruntime.batch_4.median_ms" not in second["evaluate_compressed"]["metrics"]

    # The workspace is a view of the store: a deleted workspace artifact comes back from it, not by training again.
    workspace_model = tmp_path / "artifacts" / "finetune" / "model" / "model.safetensors"
    shutil.rmtree(tmp_path / "artifacts" / "finetune")
    fourth = compress(str(params_path), ["evaluate.latency_repeats=3", "evaluate.latency_runtimes=[torch,onnxruntime]"])
    assert fourth["finetune"]["cached"] is True and workspace_model.is_file()
    # A store entry deleted behind the cache's back is noticed and computed again, to the same bytes.
    before = workspace_model.read_bytes()
    (entry,) = [p for p in (tmp_path / "artifacts" / "store" / "finetune").iterdir() if p.is_dir()]
    shutil.rmtree(entry / "finetune")
    fourth = compress(str(params_path), ["evaluate.latency_repeats=3", "evaluate.latency_runtimes=[torch,onnxruntime]"])
    assert fourth["finetune"]["cached"] is False
    assert workspace_model.read_bytes() == before

    # Another method or ratio reuses the Fisher artifact: only factorizing and what follows rerun.
    fifth = compress(str(params_path), [
        "evaluate.latency_repeats=3", "evaluate.latency_runtimes=[torch,onnxruntime]", "factorize.keep_ratio=0.3", "factorize.method=tfwsvd"
    ])
    assert {n for n in names if not fifth[n]["cached"]} == {
        "factorize", "evaluate_factorized", "finetune_compressed", "evaluate_compressed", "summary_factorize"
    }
    summary = fifth["summary_factorize"]["metrics"]
    assert summary["compressed.params_kept"] == pytest.approx(
        fifth["evaluate_compressed"]["metrics"]["params.target_linear"] / fifth["evaluate_dense"]["metrics"]["params.target_linear"]
    )
    assert summary["compressed.speedup.onnxruntime.batch_4"] > 0
    assert fifth["factorize"]["metrics"]["keep_ratio_reached"] <= 0.3

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lowrank"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 4  # the second and the first fourth runs found every stage stored and a run that logged it
    stage_runs = [r for r in runs if r.data.tags.get("stage") == "finetune"]
    assert len(stage_runs) == 4
    tags = stage_runs[0].data.tags
    assert tags["lineage.output.model"].endswith(".dir")
    assert tags["lineage.input.data"].split("@")[1].endswith(".dir")
    assert "mlflow.source.git.commit" in parents[0].data.tags or not (REPO / ".git").exists()
    assert parents[0].data.params["finetune.lr"] == "0.001"
    assert "evaluate_dense.task.accuracy" in parents[0].data.metrics
    assert parents[0].data.tags["task"] == "sst2"
    assert parents[0].info.run_name == "sst2-tfwsvd-0.3-seed42"
    # MLflow 3 opens the experiment as model training, and each run shows the splits it trained and scored on.
    assert mlflow.get_experiment_by_name("lowrank").tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]) for d in parents[0].inputs.dataset_inputs}
    assert inputs == {("sst2-train", "training"), ("sst2-select", "validation"), ("sst2-validation", "evaluation")}
    # Lineage resolves: the first run's compressed model is still where its MLflow run says, with the hash it says,
    # although later runs replaced the workspace's model.
    from lowrank import load_compressed
    from tasks.lineage import dvc_md5

    first_ft = min((r for r in runs if r.data.tags.get("stage") == "finetune_compressed"), key=lambda r: r.info.start_time)
    path, md5 = first_ft.data.tags["lineage.output.model"].rsplit("@", 1)
    workspace = tmp_path / "artifacts" / "finetune_compressed" / "model"
    assert dvc_md5(path) == md5 != dvc_md5(workspace)
    ids = torch.randint(0, 20, (2, 8))  # inside the tiny vocabulary
    old, new = (load_compressed(p).eval()(input_ids=ids).logits for p in (path, workspace))
    assert old.shape == new.shape == (2, 2) and not torch.equal(old, new)

    train_uri = (glue_dir / "SST-2" / "train.tsv").resolve().as_uri()
    assert any(train_uri in d.dataset.source for d in parents[0].inputs.dataset_inputs)


def _dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _workspace(project: Path) -> dict[str, str]:
    """The bytes of every workspace file (what DVC tracks), by path; the store and the workspace's record left out."""
    import hashlib

    files = [p for root in ("artifacts", "metrics") for p in (project / root).rglob("*") if p.is_file()]
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if "store" not in p.relative_to(project).parts and not p.name.startswith((".", "WORKSPACE"))}


def _entries(project: Path) -> set[str]:
    """The store's finished entries."""
    return {str(p.parent.relative_to(project)) for p in (project / "artifacts" / "store").glob("*/*/result.json")}


def _lowrank_run(project: Path, api: str) -> dict:
    done = subprocess.run([*LOWRANK, "--quiet", "run"], cwd=project, env=lowrank_env(PREFECT_API_URL=api), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_dvc_repro_and_lowrank_run_find_each_other_s_work(tmp_path: Path, tiny_model_dir: Path, glue_dir: Path, prefect_api: str) -> None:
    """Both drivers run a stage through the store: each finds the other's work done; a second `dvc repro` is a no-op.

    The factorize_only path: the factorize path's kinds of stage (with a plot) at two stages fewer.
    """
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO / "lowrank", project / "lowrank", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")
    params_path = tiny_params(project, tiny_model_dir, glue_dir, orchestration={"path": "factorize_only"}, tracking={"enabled": False})
    params = yaml_load(params_path)
    params["paths"] = {"artifacts": "artifacts", "metrics": "metrics"}
    params["factorize"].update(targets=None, exclude=None)  # dvc.yaml names these keys: DVC needs them present
    params_path.write_text(json.dumps(params))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    _dvc(project, "init", "-q")
    _dvc(project, "config", "core.analytics", "false")
    end = "summary_factorize_only"

    out = _dvc(project, "repro", end)
    assert "Running stage 'finetune'" in out
    assert json.loads((project / "metrics" / "evaluate_dense.json").read_text())["task"]["accuracy"] >= 0
    assert (project / "metrics" / "factorize_phi.png").is_file()  # a plot, copied out of the store like the outputs
    out = _dvc(project, "repro", end)
    assert "Running stage" not in out

    # `lowrank run` after `dvc repro`: every stage a store hit, the workspace's bytes as DVC recorded them.
    workspace, entries = _workspace(project), _entries(project)
    summary = _lowrank_run(project, prefect_api)
    assert [name for name, row in summary.items() if not row["cached"]] == []
    assert _entries(project) == entries and _workspace(project) == workspace
    assert (project / "artifacts" / "WORKSPACE.json").is_file()
    assert "up to date" in _dvc(project, "status", end).lower()

    # `dvc repro` after `lowrank run`: DVC reruns what the params change touches, and each such stage only copies.
    params["evaluate"]["latency_repeats"] = 3
    params_path.write_text(json.dumps(params))
    summary = _lowrank_run(project, prefect_api)
    assert {name for name, row in summary.items() if not row["cached"]} == {"evaluate_dense", "evaluate_factorized", end}
    workspace, entries = _workspace(project), _entries(project)
    out = _dvc(project, "repro", end)
    assert "Running stage 'evaluate_dense'" in out
    assert "Running stage 'finetune'" not in out and "Running stage 'prepare'" not in out
    assert '"cached": true' in out and '"cached": false' not in out
    assert _entries(project) == entries and _workspace(project) == workspace
    assert not (project / "artifacts" / "WORKSPACE.json").exists()  # dvc.lock is the workspace's record now
    out = _dvc(project, "repro", end)
    assert "Running stage" not in out

    remote = tmp_path / "remote"
    _dvc(project, "remote", "add", "-d", "local", str(remote))
    _dvc(project, "push", "--with-deps", end)
    shutil.rmtree(project / "artifacts")
    shutil.rmtree(project / ".dvc" / "cache")
    _dvc(project, "pull", "--with-deps", end)
    assert (project / "artifacts" / "finetune" / "model" / "model.safetensors").is_file()
    out = _dvc(project, "status", "--with-deps", end)
    assert "up to date" in out.lower()

    # A pulled workspace and an empty store: a changed factorization reruns under DVC from the pulled fine-tuned
    # model, which the store takes from the workspace instead of fine-tuning again.
    params["factorize"]["keep_ratio"] = 0.3
    params_path.write_text(json.dumps(params))
    out = _dvc(project, "repro", end)
    assert "Running stage 'factorize'" in out and "Running stage 'finetune'" not in out
    assert "store: finetune: made from the workspace's files" in out
    assert json.loads((project / "metrics" / "factorize.json").read_text())["keep_ratio_target"] == 0.3


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)  # two whole pipelines, a process per stage, behind DVC's queue
def test_dvc_queue_runs_a_grid_and_exp_show_lists_it(tmp_path: Path, tiny_model_dir: Path, glue_dir: Path) -> None:
    """DVC's way to a sweep: `dvc exp run --queue -S ...` per configuration, `dvc queue start`, `dvc exp show`."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO / "lowrank", project / "lowrank", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, project / name)
    params_path = tiny_params(project, tiny_model_dir, glue_dir, evaluate={"latency": False}, tracking={"enabled": False})
    params = yaml_load(params_path)
    params["paths"] = {"artifacts": "artifacts", "metrics": "metrics"}
    params["factorize"].update(targets=None, exclude=None)  # dvc.yaml names these keys: DVC needs them present
    params_path.write_text(json.dumps(params))
    (project / ".gitignore").write_text("/artifacts\n")
    git = lambda *args: subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    _dvc(project, "init", "-q")
    _dvc(project, "config", "core.analytics", "false")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny project")

    # Up to the factorized model's evaluation: the stages after it (+ ft, its evaluation, the summary) add nothing
    # the queue does not already show, and each is a process start.
    for method in ("svd", "fwsvd"):
        _dvc(project, "exp", "run", "--queue", "evaluate_factorized", "-S", f"factorize.method={method}", "-S", "factorize.keep_ratio=0.3")
    # One queue worker: with -j 2, DVC's celery queue once left its second worker idle and the test waited out its limit.
    _dvc(project, "queue", "start", "-j", "1")
    for _ in range(300):
        status = _dvc(project, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(1)
    assert status.count("Success") == 2, status
    rows = json.loads(_exp_show(project))
    scores = {}
    for commit in rows:
        for exp in commit.get("experiments") or []:
            for revision in exp["revs"]:
                data = revision["data"]
                method = data["params"]["params.yaml"]["data"]["factorize"]["method"]
                scores[method] = data["metrics"]["metrics/evaluate_factorized.json"]["data"]["task"]["score"]
    assert set(scores) == {"svd", "fwsvd"} and all(0 <= s <= 1 for s in scores.values())


def _exp_show(project: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, env=env, capture_output=True, text=True, check=True)
    return done.stdout
