"""Fault injection: a run killed at each stage in turn resumes, ends as an uninterrupted run does, leaves nothing.

Every run here is a real `lowrank run` subprocess on the tiny pipeline. The
chain kills run k with SIGKILL as stage k starts; run k+1 must find stages
before k cached, and is itself killed at stage k+1; the last run completes
and must give the metrics of an uninterrupted run. A Prefect server started
once for the module serves them all (the temporary server's own orphan case
has a test of its own).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import GLUE_DIR, REPO, lowrank_env as _env, prefect_api, save_tiny_model, tiny_params  # noqa: F401  (a fixture)
from flows.lifecycle import still_running

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # kills processes: alone, so no other test's process is in its way
LOWRANK = [sys.executable, "-m", "flows.cli"]
TIMING = re.compile(r"(seconds|_s$|latency|_ms|samples_per_s|speedup)")


def _project(root: Path, model_dir: Path) -> Path:
    root.mkdir(parents=True)
    tiny_params(root, model_dir, GLUE_DIR, evaluate={"latency": False})
    return root


def _run(project: Path, env: dict[str, str], kill_at: str | None = None) -> tuple[dict[str, str], subprocess.Popen]:
    """`lowrank run` in `project`; with `kill_at`, SIGKILL it as that stage starts. Returns each stage's fate."""
    process = subprocess.Popen(
        [*LOWRANK, "--quiet", "run"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    fates: dict[str, str] = {}
    for line in process.stderr:
        match = re.match(r"stage (\w+): (started|cached|ran)", line)
        if match:
            fates[match[1]] = match[2]
            if match[1] == kill_at and match[2] == "started":
                process.send_signal(signal.SIGKILL)
                break
    process.wait(120)
    return fates, process


def _leftovers(project: Path) -> list[Path]:
    return [p for p in project.rglob(".*") if re.search(r"\.(tmp|old)-\d+", p.name)]


def _running_mlflow_runs(project: Path) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lowrank")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
    return [run.info.run_name for run in runs]


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if not TIMING.search(k)}
    return obj


def _running_in(root: Path) -> list[str]:
    """Command lines of the processes working in a folder under `root`: what this test started (children keep the
    folder), whatever else runs on the machine."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):  # (None where the process is not ours to read)
        if process.info["cwd"] and Path(process.info["cwd"]).is_relative_to(root):
            found.append(" ".join(process.info["cmdline"] or ()))
    return found


@pytest.mark.timeout(900)  # eight runs of the tiny pipeline
def test_killed_at_each_stage_the_run_resumes_and_ends_the_same(tmp_path: Path, prefect_api: str) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat()
    model_dir = save_tiny_model(tmp_path / "model")
    env = _env(PREFECT_API_URL=prefect_api)
    clean = _project(tmp_path / "uninterrupted", model_dir)
    fates, process = _run(clean, env)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    stages = list(fates)
    assert stages[-1] == "summary_factorize" and len(stages) == 9

    project = _project(tmp_path / "killed", model_dir)
    # One stage of each kind, not all nine: the store's entries end the same way whatever the stage (a run costs
    # its start-up, about 8 s, for each kill), and consecutive kills check that nothing before the last one reruns.
    kills = ["prepare", "finetune", "fisher", "factorize", "evaluate_factorized", "summary_factorize"]
    assert set(kills) <= set(stages)
    previous = 0
    for stage in kills:
        fates, process = _run(project, env, kill_at=stage)
        assert process.returncode == -signal.SIGKILL, f"the run ended before {stage}"
        # The stage killed in the previous run ran again in this one; all before it stay done.
        assert all(fates[s] == "cached" for s in stages[:previous]), (stage, fates)
        assert all(fates[s] == "ran" for s in stages[previous:stages.index(stage)]), (stage, fates)
        previous = stages.index(stage)
    fates, process = _run(project, env)
    assert process.returncode == 0
    assert fates[stages[0]] == "cached"
    summary = json.loads(process.stdout.read())  # stdout holds the JSON summary alone: `lowrank run | jq .` works
    assert set(summary) == set(stages)

    for name in ("evaluate_dense", "evaluate_compressed", "summary_factorize"):
        killed = json.loads((project / "metrics" / f"{name}.json").read_text())
        uninterrupted = json.loads((clean / "metrics" / f"{name}.json").read_text())
        assert _without_timings(killed) == _without_timings(uninterrupted), name
    assert _leftovers(project) == []
    assert _running_mlflow_runs(project) == []
    import httpx

    mine = {"state": {"type": {"any_": ["RUNNING"]}}, "start_time": {"after_": started}}  # the server is shared by the session
    running = httpx.post(f"{prefect_api}/flow_runs/filter", json={"flow_runs": mine}).json()
    assert running == []
    assert not [command for command in _running_in(tmp_path) if "flows.cli" in command]


def _servers(project: Path) -> list[psutil.Process]:
    """The temporary Prefect servers of runs in `project`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "create_app" in " ".join(process.info["cmdline"] or ()) and process.environ().get("PREFECT_HOME") == str(project / ".prefect"):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _flow_run_states(project: Path) -> list[str]:
    import sqlite3

    return sorted(s for (s,) in sqlite3.connect(project / ".prefect" / "prefect.db").execute("select state_type from flow_run"))


def test_a_killed_run_s_temporary_prefect_server_ends_with_it_and_the_next_run_recovers(tmp_path: Path) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    project = _project(tmp_path / "project", save_tiny_model(tmp_path / "model"))
    env = _env(PREFECT_HOME=str(project / ".prefect"))
    _, process = _run(project, env, kill_at="finetune")
    assert process.returncode == -signal.SIGKILL
    assert still_running(_servers(project), 15) == []  # the kernel ended the server with the process that started it (PR_SET_PDEATHSIG)
    fates, process = _run(project, env)
    assert process.returncode == 0 and fates["prepare"] == "cached"
    time.sleep(1)
    assert _servers(project) == []
    assert _running_mlflow_runs(project) == []
    assert _flow_run_states(project) == ["COMPLETED", "CRASHED"]


def test_a_signal_to_the_run_s_process_group_ends_it_promptly_and_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C in a terminal, or `kill -- -PGID`, reaches every process of the group at once."""
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    project = _project(tmp_path / "project", save_tiny_model(tmp_path / "model"))
    env = _env(PREFECT_HOME=str(project / ".prefect"))
    process = subprocess.Popen([*LOWRANK, "--quiet", "run"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in process.stderr:
        if line.startswith("stage finetune: started"):
            break
    os.killpg(process.pid, signal.SIGTERM)
    process.stderr.read()
    process.wait(120)
    assert process.returncode == 128 + signal.SIGTERM
    assert _servers(project) == []
    assert _leftovers(project) == []
    assert _running_mlflow_runs(project) == []
    # Recorded, so the server outlived the signal: when it took the signal too, the run retried this report for minutes.
    assert _flow_run_states(project) == ["CRASHED"]


def test_a_stage_dvc_runs_dies_with_dvc(tmp_path: Path) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    project = _project(tmp_path / "project", save_tiny_model(tmp_path / "model"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO / "lowrank", project / "lowrank", ignore=shutil.ignore_patterns("__pycache__"))
    params = project / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["paths"] = {"artifacts": "artifacts", "metrics": "metrics"}
    raw["finetune"]["epochs"] = 500
    raw["tracking"]["enabled"] = False
    params.write_text(yaml.safe_dump(raw))
    env = _env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=project, check=True, env=env)
    log = project / "dvc.log"
    with log.open("w") as sink:  # a file, not a pipe nobody reads: a full pipe would block the stage's writes
        dvc = subprocess.Popen(["dvc", "repro", "finetune"], cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT)
    for _ in range(600):
        if "Running stage 'finetune'" in log.read_text():
            break
        time.sleep(0.1)
    time.sleep(3)  # into the training
    stage = [p for p in psutil.Process(dvc.pid).children(recursive=True) if "finetune" in " ".join(p.cmdline())]
    assert stage, "the finetune stage did not start:\n" + log.read_text()
    dvc.send_signal(signal.SIGKILL)
    dvc.wait(10)
    assert still_running(stage, 10) == []
    assert _leftovers(project) == []
