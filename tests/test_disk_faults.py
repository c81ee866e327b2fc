"""Faults of the machine rather than the input: a disk that fills up, a checkpoint that would run its own code."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import GLUE_DIR, tiny_params
from flows.cli import app
from lowrank.pipeline.stage import STAGES, Stage
from lowrank.pipeline import Layout
from lowrank.pipeline.store import RECORD, finished, run_stored


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    """A RAM filesystem of `size` at `folder`: a disk that fills up (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root")
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _big(params, io):
    io.outputs["data"].parent.mkdir(parents=True, exist_ok=True)
    with io.outputs["data"].open("wb") as handle:
        handle.write(b"\0" * params["bytes"])
    return io.finish({})


def test_a_stage_that_fills_the_disk_leaves_no_finished_entry_and_reruns_when_there_is_room(tmp_path: Path, monkeypatch) -> None:
    import errno

    monkeypatch.setitem(STAGES, "t_big", Stage("t_big", _big, (), {}, {"data": "t_big/data.bin"}, {}, {}))
    with _tmpfs(tmp_path / "disk", "64k") as disk:
        layout = Layout(disk / "artifacts", disk / "metrics", {"t_big": "e" * 64})
        with pytest.raises(OSError) as err:
            run_stored("t_big", {"bytes": 1 << 20}, layout)
        assert err.value.errno == errno.ENOSPC
        assert not (layout.entry("t_big") / RECORD).exists() and finished("t_big", layout) is None
        assert run_stored("t_big", {"bytes": 1000}, layout)[1] is False  # the dead attempt is cleared, the entry made
        assert finished("t_big", layout) is not None


@pytest.mark.skipif(not (GLUE_DIR / "SST-2" / "train.tsv").is_file(), reason=f"GLUE data not found at {GLUE_DIR}")
def test_a_full_disk_is_one_line_naming_where_with_exit_2(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOWRANK_DEBUG", raising=False)
    params = tiny_params(tmp_path, tiny_model_dir, GLUE_DIR, tracking={"enabled": False})
    with _tmpfs(tmp_path / "disk", "8k") as disk:
        result = CliRunner().invoke(app, ["--quiet", "stage", "prepare", "--params", str(params), "-S", f"paths.artifacts={disk}/artifacts"])
        assert result.exit_code == 2, result.output
        # (in-process, the progress bars of libraries imported earlier still show: the error is the last line, alone)
        last = result.stderr.strip().splitlines()[-1]  # the stage's store entry, where it was writing
        assert last.startswith(f"error: {disk}/artifacts/store/prepare/") and last.endswith(": No space left on device"), last
        assert "Traceback" not in result.stderr
        assert not (disk / "artifacts" / "data").exists()  # the half-written split went with its temporary folder


def test_check_warns_once_about_remote_code_and_does_not_run_it(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    import shutil

    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "remote-model"))
    marker = tmp_path / "remote-code-ran"
    (model / "remote.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import BertConfig as RemoteConfig\n")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "remote.RemoteConfig"}}))
    monkeypatch.chdir(tmp_path)
    # Loading a remote config marks its class for auto-saving its source; the class is BertConfig itself here, and
    # left marked, every later save_pretrained of a BERT in this process would try to copy transformers' own files.
    from transformers import BertConfig

    monkeypatch.setattr(BertConfig, "_auto_class", None)
    params = tiny_params(tmp_path, model, GLUE_DIR, model={"trust_remote_code": True})
    result = CliRunner().invoke(app, ["check", "--params", str(params)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"model.trust_remote_code: {model} runs Python code" in warnings[0]
    assert not marker.exists()
    asked = CliRunner().invoke(app, ["check", "--run-remote-code", "--params", str(params)])
    assert asked.exit_code == 0, asked.output
    assert marker.exists()  # asked, it ran the checkpoint's code to read the config
