"""The tiny pipeline's numbers, pinned, and its bytes, repeatable.

`tests/data/tiny_pipeline_metrics.json` holds every stage's metrics (timings
left out) of the tiny factorize path (TFWSVD) and lpaf path (sparse TFWSVD),
recorded at b3a81df, before the layout changed, and again when every choice
moved to the selection split held out of the training rows (issue 32: the
training rows, the epochs chosen and the + ft start all changed). A refactor
that moves code must leave every number where it was. And a stage rerun on the same inputs
writes the same bytes, so a rerun never invalidates what follows it (DVC's and
Prefect's caches key on those bytes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GLUE_DIR, save_tiny_model, tiny_params
from lowrank.config import load_params
from lowrank.io.files import digest
from lowrank.pipeline import Layout, get_stage, pipeline

PINNED = Path(__file__).parent / "data" / "tiny_pipeline_metrics.json"
TIMING = re.compile(r"(seconds|_s$|latency|_ms|samples_per_s|size_bytes)")
RUNS = {
    "factorize": {"factorize": {"method": "tfwsvd", "keep_ratio": 0.5, "solver_steps": 3}},
    "lpaf": {
        "orchestration": {"path": "lpaf"},
        "factorize": {"method": "sparse_tfwsvd", "keep_ratio": 0.5, "solver_steps": 3},
        "prune": {"train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}},
        "mrft": {"train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}},
    },
}


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if not TIMING.search(k)}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(set(got) ^ set(want))}"
        for key in want:
            _close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12), where
    else:
        assert got == want, where


@pytest.mark.parametrize("path", list(RUNS))
def test_the_tiny_pipeline_gives_the_pinned_metrics(tmp_path: Path, path: str) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    model_dir = save_tiny_model(tmp_path / "model")
    # The pin predates length-grouped batches, which change every batch (and so every trained weight): it pins ungrouped runs.
    sections = {**RUNS[path], "evaluate": {"latency": False}, "data": {"group_by_length": False}}
    params = load_params(tiny_params(tmp_path, model_dir, GLUE_DIR, **sections))
    pinned = json.loads(PINNED.read_text())
    layout = Layout.from_params(params)
    digests = {}
    for name in pipeline(params):
        get_stage(name).run(params)
        got = _without_timings(json.loads((tmp_path / "metrics" / f"{name}.json").read_text()))
        if not name.startswith("summary"):  # newer than the pin: ratios of the pinned evaluations
            _close(got, pinned[f"{path}/{name}"], f"{path}/{name}")
        digests[name] = {key: digest(p) for key, p in get_stage(name).written_paths(layout).items() if p.exists()}
    # Each stage again, in another process (another hash seed), on the same inputs and as many threads (their count
    # changes a sum's rounding): every artifact, plot and report byte-identical.
    rerun = (
        "import sys, torch; from lowrank.config import load_params; from lowrank.pipeline import get_stage, pipeline\n"
        "torch.set_num_threads(int(sys.argv[2]))\np = load_params(sys.argv[1])\nfor name in pipeline(p): get_stage(name).run(p)"
    )
    threads = str(torch.get_num_threads())
    subprocess.run([sys.executable, "-c", rerun, str(tmp_path / "params.yaml"), threads], check=True, capture_output=True, cwd=tmp_path)
    for name in pipeline(params):
        again = {key: digest(p) for key, p in get_stage(name).written_paths(layout).items() if p.exists()}
        assert again == digests[name], f"{name} wrote other bytes the second time"
