"""Shared fixtures: a tiny BERT built from a config in code, and a tiny project.

Two sets. `make test` (plain `pytest`) runs the fast one: units and the tiny
pipeline in-process, a few minutes on 2 cores. Mark `@pytest.mark.slow` every
test that starts a server (Prefect, MLflow, Dask, `mlflow models serve`), runs
`lowrank` as a subprocess, kills processes or runs DVC; `make test-all` (or
`pytest -m "slow or not slow"`; `-m slow` for those alone) adds them. Every
test has `timeout` seconds (pyproject.toml), fixtures included; one that needs
more says so with `@pytest.mark.timeout(seconds)`. Tests check what was done,
never how fast (the machine is shared), and look only at processes they
started.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, here and in the processes tests start: tiny tensors gain nothing from more, and on a shared
# machine a second thread's waits made each training step ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Character-level WordPiece vocabulary: every word tokenizes without a hub download.
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-")
VOCAB = _SPECIAL + _CHARS + [f"##{c}" for c in _CHARS]


def tiny_bert_config(num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )


def save_tiny_model(folder: Path, num_labels: int = 2) -> Path:
    """A random tiny BERT classifier and a char-level tokenizer, saved like a hub model."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_labels)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR


def tiny_params(root: Path, model_dir: Path, glue_dir: Path, **sections: dict) -> Path:
    """Write a params.yaml for a seconds-long run of the whole pipeline under `root`."""
    params = {
        "paths": {"artifacts": str(root / "artifacts"), "metrics": str(root / "metrics")},
        "data": {"task": "sst2", "glue_dir": str(glue_dir), "max_train_samples": 48, "max_eval_samples": 24, "max_length": 24},
        "model": {"name": str(model_dir)},
        "train": {},  # dvc.yaml names the section: DVC needs it present
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
        "fisher": {"max_samples": 32, "batch_size": 16},
        "factorize": {"method": "fwsvd", "keep_ratio": 0.5},
        "finetune_compressed": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
        "evaluate": {"latency_batch_sizes": [1, 4], "latency_seq_len": 16, "latency_warmup": 1, "latency_repeats": 2},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "mlartifacts")},
    }
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lowrank_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LOWRANK_"))}
    env.update({"GLUE_DIR": str(GLUE_DIR), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


@contextlib.contextmanager
def serving(command: list[str], env: dict[str, str], health: str, what: str, cwd: Path | None = None):
    """A server process on loopback, up once `health` answers 200 (at most 2 minutes); stopped after the block."""
    import httpx

    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}  # servers start uvicorn from the PATH
    server = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if server.poll() is not None:
                    pytest.fail(f"{what} exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.2)
        else:
            pytest.fail(f"{what} did not answer within 2 minutes")
        yield server
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


@contextlib.contextmanager
def prefect_server(home: Path, **extra: str):
    """`prefect server start` on loopback (on SQLite under `home`, or the database `extra` names); yields its API URL."""
    port = _free_port()
    env = lowrank_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", **extra)
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with serving(command, env, f"{url}/health", "prefect server start"):
        yield url


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str):
    """`mlflow server` on loopback over the `backend` store, serving artifacts from `root`; yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
               (root / "mlartifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with serving(command, lowrank_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), f"{url}/health", "mlflow server"):
        yield url


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """One Prefect server for every run that needs one (its start is 15 s on a fresh home); tests that look at
    flow runs filter them by their own names, tags or projects."""
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


LOWRANK = [sys.executable, "-m", "flows.cli"]


def run_sweep(project: Path, env: dict[str, str], *args: str) -> tuple[int, dict, str]:
    """`lowrank --quiet sweep ARGS` in `project`: exit code, the JSON summary, stderr."""
    done = subprocess.run([*LOWRANK, "--quiet", "sweep", *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done.stderr


@pytest.fixture(scope="session")
def failing_sweep(tmp_path_factory: pytest.TempPathFactory, prefect_api: str):
    """Four configurations and a fifth that fails, tracked in the default SQLite store: run once for every test that reads it."""
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny_model(root / "model")
    sweep = {"grid": {"factorize.method": ["svd", "fwsvd"], "factorize.keep_ratio": [0.5, 0.3]},
             "configs": [{"factorize.targets": [r"no\.such\.layer"]}]}
    tiny_params(root, model, GLUE_DIR, evaluate={"latency": False}, sweep=sweep)
    env = lowrank_env(PREFECT_API_URL=prefect_api)
    code, summary, err = run_sweep(root, env, "--workers", "2", "--threads", "1")
    yield {"root": root, "env": env, "code": code, "summary": summary, "err": err, "uri": f"sqlite:///{root / 'mlflow.db'}"}
