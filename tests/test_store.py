"""The store checks what it holds: hashes per file, read-only entries, downstream entries that follow their inputs' bytes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from lowrank.io import manifest
from lowrank.pipeline.stage import STAGES
from lowrank.pipeline.stage import Layout, Stage, StageResult
from lowrank.pipeline.store import RECORD, finished, run_stored
from lowrank.pipeline.workspace import RECORD as WORKSPACE, publish

CALLS: list[str] = []


def _up(params, io) -> StageResult:
    CALLS.append("t_up")
    io.outputs["data"].parent.mkdir(parents=True, exist_ok=True)
    io.outputs["data"].write_bytes(params["up"])
    return io.finish({"n": len(params["up"]), "call": len(CALLS)})  # a count, as timings differ between computations


def _down(params, io) -> StageResult:
    CALLS.append("t_down")
    io.outputs["data"].parent.mkdir(parents=True, exist_ok=True)
    io.outputs["data"].write_bytes(io.inputs["data"].read_bytes()[::-1])
    return io.finish({"n": io.inputs["data"].stat().st_size})


@pytest.fixture()
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Layout:
    monkeypatch.setitem(STAGES, "t_up", Stage("t_up", _up, (), {}, {"data": "t_up/data.bin"}, {}, {}))
    monkeypatch.setitem(STAGES, "t_down", Stage("t_down", _down, (), {"data": "t_up.data"}, {"data": "t_down/data.bin"}, {}, {}))
    CALLS.clear()
    return Layout(tmp_path / "artifacts", tmp_path / "metrics", {"t_up": "a" * 64, "t_down": "b" * 64})


def _run_both(layout: Layout, up: bytes = b"0123456789") -> dict[str, bool]:
    params = {"up": up}
    return {name: run_stored(name, params, layout)[1] for name in ("t_up", "t_down")}


def test_a_finished_entry_lists_each_file_s_sha256_and_size_and_is_read_only(layout: Layout) -> None:
    import hashlib

    assert _run_both(layout) == {"t_up": False, "t_down": False}
    record = json.loads((layout.entry("t_up") / RECORD).read_text())
    assert record["files"]["t_up/data.bin"] == {"sha256": hashlib.sha256(b"0123456789").hexdigest(), "size": 10}
    assert set(record["files"]) == {"t_up/data.bin", "metrics/t_up.json"}
    down = json.loads((layout.entry("t_down") / RECORD).read_text())
    assert down["inputs"] == {"data": manifest.manifest_digest({"t_up/data.bin": record["files"]["t_up/data.bin"]})}
    stored = layout.entry("t_up") / "t_up" / "data.bin"
    assert stat.S_IMODE(stored.stat().st_mode) == manifest.READ_ONLY
    assert _run_both(layout) == {"t_up": True, "t_down": True} and CALLS == ["t_up", "t_down"]


def test_a_file_edited_in_place_is_named_and_its_entry_and_everything_below_recomputed(layout, capsys) -> None:
    _run_both(layout)
    stored = layout.entry("t_up") / "t_up" / "data.bin"
    stored.chmod(0o644)
    stored.write_bytes(b"9123456789")  # same size: only the hash tells
    assert finished("t_up", layout) is None and finished("t_down", layout) is None
    # Rebuilt to the bytes t_down was computed from: t_down stands (it follows the bytes, not the rebuild).
    assert _run_both(layout) == {"t_up": False, "t_down": True}
    assert f"store: t_up: {stored} changed since it was stored" in capsys.readouterr().err
    assert stored.read_bytes() == b"0123456789"
    assert (layout.entry("t_down") / "t_down" / "data.bin").read_bytes() == b"9876543210"


def test_a_truncated_file_is_found_by_its_size_even_with_its_old_mtime(layout: Layout) -> None:
    _run_both(layout)
    stored = layout.entry("t_up") / "t_up" / "data.bin"
    before = stored.stat()
    stored.chmod(0o644)
    stored.write_bytes(b"01234")
    os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert finished("t_up", layout) is None


def test_a_deleted_output_unfinishes_the_entry(layout: Layout) -> None:
    _run_both(layout)
    (layout.entry("t_up") / "t_up" / "data.bin").unlink()
    assert finished("t_up", layout) is None and finished("t_down", layout) is None


def test_files_are_hashed_again_only_when_their_stat_changed(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    _run_both(layout)
    hashed: list[Path] = []
    real = manifest.file_sha256
    monkeypatch.setattr(manifest, "file_sha256", lambda path: hashed.append(path) or real(path))
    assert finished("t_down", layout) is not None and hashed == []
    stored = layout.entry("t_up") / "t_up" / "data.bin"
    os.utime(stored, ns=(0, 0))  # touched, not changed: hashed once, then remembered
    assert finished("t_down", layout) is not None and hashed == [stored]
    assert finished("t_down", layout) is not None and hashed == [stored]


def test_an_upstream_rebuilt_to_other_bytes_never_leaves_downstream_finished(layout: Layout) -> None:
    _run_both(layout)
    # The same fingerprint computed again to other bytes (a nondeterministic stage, or an edit someone re-recorded).
    run_stored("t_up", {"up": b"abcdefghij"}, layout, refresh=True)
    assert finished("t_down", layout) is None
    assert run_stored("t_down", {}, layout)[1] is False
    assert (layout.entry("t_down") / "t_down" / "data.bin").read_bytes() == b"jihgfedcba"


def test_an_upstream_rebuilt_to_the_same_bytes_keeps_downstream(layout: Layout) -> None:
    _run_both(layout)
    run_stored("t_up", {"up": b"0123456789"}, layout, refresh=True)
    assert finished("t_down", layout) is not None


def test_a_record_without_hashes_or_unreadable_is_not_finished(layout: Layout) -> None:
    _run_both(layout)
    record = layout.entry("t_up") / RECORD
    record.chmod(0o644)
    record.write_text("{not json")
    assert finished("t_up", layout) is None
    record.write_text(json.dumps({"outputs": {}, "metrics": {}, "info": {}}))
    assert finished("t_up", layout) is None


def test_the_workspace_holds_copies_an_edit_does_not_reach_the_store_and_a_run_restores(layout: Layout) -> None:
    _run_both(layout)
    publish({"up": "x"}, ["t_up", "t_down"], layout)  # type: ignore[arg-type]
    workspace, stored = layout.artifacts / "t_up" / "data.bin", layout.entry("t_up") / "t_up" / "data.bin"
    assert workspace.read_bytes() == stored.read_bytes() and workspace.stat().st_ino != stored.stat().st_ino
    workspace.write_bytes(b"damaged!!!")
    assert stored.read_bytes() == b"0123456789" and finished("t_down", layout) is not None
    written = json.loads((layout.artifacts / WORKSPACE).read_text())
    assert written["stages"]["t_up"]["fingerprint"] == "a" * 64 and written["params"] == {"up": "x"}
    publish({"up": "x"}, ["t_up", "t_down"], layout)  # type: ignore[arg-type]
    assert workspace.read_bytes() == b"0123456789"


def test_a_truncated_safetensors_is_one_line_naming_the_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    from lowrank import load_compressed
    from lowrank.config import InputError

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InputError, match=f"^{weights}: not a readable safetensors file") as err:
        load_compressed(folder)
    assert "\n" not in str(err.value)


def test_two_runs_publishing_at_once_leave_one_configuration_s_workspace(layout: Layout) -> None:
    import threading

    other = Layout(layout.artifacts, layout.metrics, {"t_up": "c" * 64, "t_down": "d" * 64})
    for lay, data in ((layout, b"0123456789"), (other, b"abcdefghijklmnop")):
        _run_both(lay, data)
    rounds = [threading.Thread(target=publish, args=({"up": str(i)}, ["t_up", "t_down"], lay)) for i, lay in enumerate([layout, other] * 4)]
    for thread in rounds:
        thread.start()
    for thread in rounds:
        thread.join()
    written = json.loads((layout.artifacts / WORKSPACE).read_text())
    winner = layout if written["stages"]["t_up"]["fingerprint"] == "a" * 64 else other
    assert written["stages"]["t_down"]["fingerprint"] == winner.fingerprints["t_down"]
    for name in ("t_up", "t_down"):
        assert (layout.artifacts / name / "data.bin").read_bytes() == (winner.entry(name) / name / "data.bin").read_bytes()
        assert (layout.metrics / f"{name}.json").read_bytes() == (winner.entry(name) / "metrics" / f"{name}.json").read_bytes()


def test_a_stage_asked_for_while_its_input_is_damaged_rebuilds_the_input_and_keeps_itself(layout: Layout, capsys) -> None:
    _run_both(layout)
    stored = layout.entry("t_up") / "t_up" / "data.bin"
    stored.chmod(0o644)
    stored.write_bytes(b"x123456789")
    CALLS.clear()
    assert run_stored("t_down", {"up": b"0123456789"}, layout)[1] is True  # its input rebuilt to the bytes it read
    assert CALLS == ["t_up"] and "store: t_up:" in capsys.readouterr().err


def test_under_dvc_an_upstream_entry_the_store_lacks_is_made_from_the_workspace_and_the_stage_itself_is_computed(
    layout: Layout,
) -> None:
    import shutil

    from lowrank.pipeline.workspace import materialize

    _run_both(layout)
    for name in ("t_up", "t_down"):
        materialize(name, layout)  # the workspace as `dvc pull` leaves it
    shutil.rmtree(layout.artifacts / "store")  # a fresh clone: DVC's files, an empty store
    CALLS.clear()
    params = {"up": b"0123456789"}
    result, cached = run_stored("t_down", params, layout, trusted_workspace=True)
    assert CALLS == ["t_down"] and not cached  # t_up taken from the workspace, not computed; t_down computed
    up = json.loads((layout.entry("t_up") / RECORD).read_text())
    assert up["info"]["from_workspace"] and up["metrics"] == {"n": 10.0, "call": 1.0}
    assert finished("t_up", layout) is not None and finished("t_down", layout) is not None  # hashes and inputs check
    assert (layout.entry("t_down") / "t_down" / "data.bin").read_bytes() == b"9876543210"

    shutil.rmtree(layout.artifacts / "store")
    CALLS.clear()
    run_stored("t_down", params, layout)  # not under DVC: the workspace is never trusted, whole as it is
    assert CALLS == ["t_up", "t_down"]

    shutil.rmtree(layout.artifacts / "store")
    CALLS.clear()
    (layout.artifacts / "t_up" / "data.bin").unlink()  # a workspace without all of the stage's files: computed
    run_stored("t_down", params, layout, trusted_workspace=True)
    assert CALLS == ["t_up", "t_down"]
