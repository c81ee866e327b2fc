"""A damaged store, on a tiny run of the whole pipeline: never used, named, rebuilt; the workspace edits nothing it should not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_params
from lowrank.config import load_params
from lowrank.pipeline import Layout, pipeline
from lowrank.pipeline.store import fingerprints

pytestmark = pytest.mark.slow  # Prefect's test server and four runs of the pipeline


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _without_timings(summary: dict) -> dict:
    return {name: {k: v for k, v in row["metrics"].items() if "latency" not in k and "seconds" not in k and "per_s" not in k}
            for name, row in summary.items()}


def test_a_damaged_entry_is_named_and_rebuilt_and_the_workspace_is_a_copy(
    tmp_path: Path, tiny_model_dir: Path, glue_dir: Path, prefect_harness, monkeypatch, capfd,
) -> None:
    from flows.compress import compress

    monkeypatch.chdir(tmp_path)
    params_path = tiny_params(tmp_path, tiny_model_dir, glue_dir, evaluate={"latency": False}, tracking={"enabled": False})
    params = load_params(params_path)
    names = pipeline(params)
    layout = Layout.from_params(params, fingerprints(params, names))
    first = compress(str(params_path))
    stored = layout.entry("finetune") / "finetune" / "model" / "model.safetensors"
    workspace = tmp_path / "artifacts" / "finetune" / "model" / "model.safetensors"
    good = stored.read_bytes()

    # WORKSPACE.json names the configuration and the entries the workspace was copied from.
    record = json.loads((tmp_path / "artifacts" / "WORKSPACE.json").read_text())
    assert {name: row["fingerprint"] for name, row in record["stages"].items()} == {n: layout.fingerprints[n] for n in names}

    # An edit in the workspace stays there: the store is untouched, and the next run puts the stored bytes back.
    workspace.write_bytes(b"\0" * len(good))
    assert stored.read_bytes() == good
    second = compress(str(params_path))
    assert all(second[n]["cached"] for n in names) and workspace.read_bytes() == good

    # An edit inside the store (same size: only the hash tells) is named, and the entry is rebuilt, to the same bytes,
    # so everything below it stands.
    damaged = bytearray(good)
    damaged[-10:] = b"\xff" * 10
    stored.chmod(0o644)
    stored.write_bytes(bytes(damaged))
    capfd.readouterr()
    third = compress(str(params_path))
    assert f"store: finetune: {stored} changed since it was stored" in capfd.readouterr().err
    assert {n for n in names if not third[n]["cached"]} == {"finetune"}
    assert stored.read_bytes() == good and _without_timings(third) == _without_timings(first)

    # A truncated factorized model is found by its size alone and rebuilt.
    factorized = layout.entry("factorize") / "factorize" / "model" / "model.safetensors"
    factorized.chmod(0o644)
    factorized.write_bytes(factorized.read_bytes()[:100])
    fourth = compress(str(params_path))
    assert {n for n in names if not fourth[n]["cached"]} == {"factorize"}
    assert _without_timings(fourth) == _without_timings(first)
