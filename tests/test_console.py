"""What a user reads: a short stderr when it is not a terminal, no third-party noise, a table of the models at the end."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import LOWRANK, lowrank_env, tiny_params
from flows.console import model_rows, run_table, sweep_table
from lowrank.io.models import quiet_logger

SUMMARY = {  # a summary stage's flat metrics, keys sorted as JSON stores them
    "compressed.latency_ms.torch.batch_1": 2.0, "compressed.params_kept": 0.25, "compressed.params_target_linear": 4096.0,
    "compressed.score": 0.875, "compressed.size_bytes": 1_500_000.0, "compressed.speedup.torch.batch_1": 2.5,
    "dense.latency_ms.torch.batch_1": 5.0, "dense.params_target_linear": 16384.0, "dense.score": 0.9, "dense.size_bytes": 6_000_000.0,
    "factorized.params_kept": 0.25, "factorized.params_target_linear": 4096.0, "factorized.score": 0.5, "factorized.size_bytes": 1_500_000.0,
}


def test_the_table_puts_dense_first_and_the_shipped_model_last() -> None:
    header, rows = model_rows("summary_factorize", SUMMARY)
    assert header == ["model", "score", "params", "size", "latency torch, batch 1"]
    assert rows == [
        ["dense", "0.9000", "16,384", "6 MB", "5.00 ms"],
        ["factorized", "0.5000", "4,096 (25%)", "2 MB", ""],
        ["compressed", "0.8750", "4,096 (25%)", "2 MB", "2.00 ms (2.50x)"],
    ]
    assert run_table({"prepare": {"metrics": {}}}) is None  # a run without a summary stage prints no table
    header, rows = sweep_table([("factorize.keep_ratio=0.25", "summary_factorize", SUMMARY), ("factorize.keep_ratio=0.5", "summary_factorize", None)])
    assert [row[:3] for row in rows] == [["factorize.keep_ratio=0.25", "dense", "0.9000"], ["", "compressed", "0.8750"],
                                         ["factorize.keep_ratio=0.5", "failed"]]


def test_quiet_logger_silences_one_logger_for_the_block(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("transformers.modeling_utils")
    with caplog.at_level(logging.WARNING), quiet_logger(logger.name):
        logger.warning("LOAD REPORT")
        logging.getLogger("transformers.other").warning("kept")
    logger.warning("after")
    assert [r.getMessage() for r in caplog.records] == ["kept", "after"]


def test_onnx_export_and_quantization_say_nothing(tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForSequenceClassification

    from lowrank.io.export import export_onnx, quantize_int8

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    root_handlers = list(logging.getLogger().handlers)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, tmp_path / "model.onnx")
        quantize_int8(tmp_path / "model.onnx", tmp_path / "model.int8.onnx")
    assert [str(w.message)[:80] for w in caught] == []
    assert capfd.readouterr().err == ""
    assert logging.getLogger().handlers == root_handlers  # no handler left behind for the whole process


@pytest.mark.slow
def test_a_tiny_runs_redirected_stderr_is_short(tmp_path: Path, tiny_model_dir: Path, glue_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir, glue_dir)
    done = subprocess.run([*LOWRANK, "run", "--params", str(params)], cwd=tmp_path, env=lowrank_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert len(lines) < 40, done.stderr
    noise = [line for line in lines if any(mark in line for mark in ("it/s", "examples/s", " INFO ", "LOAD REPORT", "Warning", "\x1b"))]
    assert noise == []
    assert "stage summary_factorize: ran" in done.stderr and lines[-4].split()[:2] == ["model", "score"]
    assert [line.split()[0] for line in lines[-3:]] == ["dense", "factorized", "compressed"]


@pytest.mark.parametrize("command", [["--help"], ["methods"], ["schema"]])
def test_commands_that_answer_at_once_import_no_torch(command: list[str]) -> None:
    probe = ("import sys; from flows.cli import app\n"
             f"try:\n    app({command!r})\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'prefect', 'mlflow') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], env=lowrank_env(), capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr[-2000:]
    assert done.stdout  # the command answered
