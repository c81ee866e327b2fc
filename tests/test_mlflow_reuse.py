"""MLflow reuses only a logged model that is whole; a model whose upload failed is named, never reused."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.entities import LoggedModelStatus

from lowrank.config import TrackingConfig
from tasks import tracking
from tasks.models import whole


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    model = tmp_path / "upload" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    return model


@pytest.fixture()
def cfg(tmp_path: Path) -> TrackingConfig:
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "mlartifacts"))
    tracking.configure(cfg)
    return cfg


def _logged(folder: Path, status: LoggedModelStatus, run_id: str | None = None):
    model = mlflow.initialize_logged_model(name="m", source_run_id=run_id)
    mlflow.MlflowClient().log_model_artifacts(model.model_id, str(folder.parent))
    mlflow.MlflowClient().finalize_logged_model(model.model_id, status) if status != LoggedModelStatus.PENDING else None
    return mlflow.get_logged_model(model.model_id)


def test_a_ready_model_with_every_file_is_reused(cfg: TrackingConfig, folder: Path) -> None:
    assert whole(_logged(folder, LoggedModelStatus.READY), folder)


def test_a_failed_model_or_one_with_a_short_file_is_not(cfg: TrackingConfig, folder: Path) -> None:
    assert not whole(_logged(folder, LoggedModelStatus.FAILED), folder)
    ready = _logged(folder, LoggedModelStatus.READY)
    uploaded = next(Path(ready.artifact_location.removeprefix("file://")).rglob("model.safetensors"))
    uploaded.write_bytes(b"\0" * 1000)  # 41 of 91 MB, as a full disk left it
    assert not whole(mlflow.get_logged_model(ready.model_id), folder)
    uploaded.unlink()
    assert not whole(mlflow.get_logged_model(ready.model_id), folder)


def test_a_model_left_pending_by_an_ended_run_is_marked_failed_and_named_once(cfg: TrackingConfig, folder: Path) -> None:
    with mlflow.start_run() as run:
        pending = _logged(folder, LoggedModelStatus.PENDING, run.info.run_id)
        assert tracking.failed_models(cfg) == []  # its run still uploads it
    ready = _logged(folder, LoggedModelStatus.READY)
    assert tracking.failed_models(cfg) == [f"m ({pending.model_id})"]
    assert mlflow.get_logged_model(pending.model_id).status == LoggedModelStatus.FAILED
    assert mlflow.get_logged_model(ready.model_id).status == LoggedModelStatus.READY
    assert tracking.failed_models(cfg) == []


def test_compare_says_when_a_configuration_s_model_failed(cfg: TrackingConfig, folder: Path) -> None:
    from tasks.tracking import configuration_rows

    ids = []
    for status in (LoggedModelStatus.READY, LoggedModelStatus.FAILED):
        with mlflow.start_run(tags={"path": "factorize", "keep_ratio": "0.5", "method": "svd"}) as run:
            mlflow.log_metrics({"evaluate_dense.params.target_linear": 100.0, "evaluate_compressed.params.target_linear": 50.0,
                                "evaluate_compressed.task.score": 0.8})
            mlflow.set_tag("model.evaluate_compressed", _logged(folder, status, run.info.run_id).model_id)
        ids.append(run.info.run_id)
    assert [row["status"] for row in configuration_rows(ids)] == ["FINISHED", "FINISHED, model FAILED"]
