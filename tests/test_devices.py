"""Where the stages run: LOWRANK_DEVICE parsing on any machine; the stages on CUDA where there is one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import GLUE_DIR, tiny_params
from lowrank.io.checkpoints import load_compressed
from lowrank.config import load_params
from lowrank.devices import DEVICE_ENV, default_device, model_device, to_device
from lowrank.pipeline import Layout, PreparedData, get_stage, pipeline, preflight

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_picks_cuda_only_when_there_is_one(monkeypatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert default_device() == torch.device("cpu")


@pytest.mark.parametrize("value", ["gpu0", "cuda:x"])
def test_bad_device_names_the_variable(monkeypatch, value: str) -> None:
    monkeypatch.setenv(DEVICE_ENV, value)
    with pytest.raises(ValueError, match=DEVICE_ENV):
        default_device()


def test_preflight_names_a_bad_device_before_any_work(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    params = load_params(tiny_params(tmp_path, tiny_model_dir, GLUE_DIR))
    monkeypatch.setenv(DEVICE_ENV, "tpu0")
    with pytest.raises(ValueError, match=DEVICE_ENV):
        preflight(params)
    assert not (tmp_path / "artifacts" / "prepare").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_one_fails_clearly(monkeypatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        default_device()


def test_to_device_moves_tensors_and_keeps_the_rest() -> None:
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "note": "kept"}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["note"] == "kept" and torch.equal(moved["input_ids"], batch["input_ids"])
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def _run_path(root: Path, model_dir: Path, device: str, monkeypatch, **sections) -> tuple[Layout, dict]:
    monkeypatch.setenv(DEVICE_ENV, device)
    root.mkdir(parents=True, exist_ok=True)
    params = load_params(tiny_params(root, model_dir, GLUE_DIR, **sections))
    preflight(params)
    layout = Layout.from_params(params)
    return layout, {name: get_stage(name).run(params, layout) for name in pipeline(params)}


def _logits(folder: Path, layout: Layout) -> torch.Tensor:
    batch = next(iter(PreparedData.open(layout.output("prepare", "data")).loader("validation", 24)))
    with torch.no_grad():
        return load_compressed(folder)(**batch).logits


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("path", ["factorize", "lpaf"])
def test_a_path_on_cuda_matches_the_cpu(tmp_path: Path, tiny_model_dir: Path, monkeypatch, path: str) -> None:
    """The same params on both devices give the same models, up to floating-point order."""
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    sections = {"orchestration": {"path": path}, "evaluate": {"latency": False}}
    if path == "lpaf":
        sections.update(
            factorize={"method": "sparse_tfwsvd", "keep_ratio": 0.4, "solver_steps": 10},
            prune={"warmup_ratio": 0.0, "cooldown_ratio": 0.2, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}},
            mrft={"p0": 0.3, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}},
        )
    cpu_layout, cpu = _run_path(tmp_path / "cpu", tiny_model_dir, "cpu", monkeypatch, **sections)
    gpu_layout, gpu = _run_path(tmp_path / "cuda", tiny_model_dir, "cuda", monkeypatch, **sections)
    final = pipeline(load_params(tmp_path / "cuda" / "params.yaml"))[-2]  # the stage before evaluate
    torch.testing.assert_close(
        _logits(gpu_layout.output(final), gpu_layout), _logits(cpu_layout.output(final), cpu_layout), atol=2e-3, rtol=1e-3
    )
    evaluate = pipeline(load_params(tmp_path / "cuda" / "params.yaml"))[-1]
    assert gpu[evaluate].metrics["task.score"] == pytest.approx(cpu[evaluate].metrics["task.score"], abs=1 / 24 + 1e-9)
