"""ONNX export of a compressed model, checked against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import onnx
import pytest

from conftest import save_tiny_model
from lowrank.io.checkpoints import load_compressed
from lowrank.evaluation import measure_latency
from lowrank.io.export import export_onnx, onnx_node_kind, onnx_session
from lowrank.modules.matching import find_targets
from lowrank.linalg.solvers import get_solver
from lowrank.modules.surgery import dense_weights, factorize_model


def test_compressed_model_exports_with_parity(tmp_path: Path) -> None:
    model = load_compressed(save_tiny_model(tmp_path / "m"))
    names = find_targets(model)
    weights = dense_weights(model, names)
    factorize_model(model, {n: get_solver("svd")(weights[n], 8) for n in names})
    report = export_onnx(model, tmp_path / "model.onnx")
    assert report["max_abs_diff"] < 1e-4
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    # the factorized layers are in the graph as their (rank, in) and (out, rank) factors
    shapes = {tuple(init.dims) for init in graph.initializer}
    assert (32, 8) in shapes or (8, 32) in shapes
    assert not list(tmp_path.glob(".model.onnx.tmp"))


def test_export_uses_eager_attention_and_restores_the_model(tmp_path: Path) -> None:
    model = load_compressed(save_tiny_model(tmp_path / "m"))
    model.set_attn_implementation("sdpa")
    export_onnx(model, tmp_path / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert "IsNaN" not in ops  # the SDPA rule's guard over every score tensor
    assert model.config._attn_implementation == "sdpa"


def test_onnx_latency_times_the_checked_export(tmp_path: Path) -> None:
    model = load_compressed(save_tiny_model(tmp_path / "m"))
    onnx = measure_latency(model, batch_sizes=(1, 4), seq_len=8, warmup=1, repeats=3, runtime="onnxruntime")
    eager = measure_latency(model, batch_sizes=(1, 4), seq_len=8, warmup=1, repeats=3)
    assert onnx["onnx_max_abs_diff"] < 1e-4
    assert onnx.keys() - {"onnx_max_abs_diff"} == eager.keys() == {"batch_1", "batch_4"}
    for key, timing in eager.items():
        assert timing.keys() == onnx[key].keys()
        assert 0 < onnx[key]["median_ms"] <= onnx[key]["p90_ms"]
        assert onnx[key]["samples_per_s"] == int(key.split("_")[1]) * 1e3 / onnx[key]["median_ms"]
    with pytest.raises(ValueError, match="runtime"):
        measure_latency(model, runtime="tensorrt")


def test_profiled_session_records_every_factor_product(tmp_path: Path) -> None:
    """The profile of a factorized model has both factors of every layer on the Linear side and only QK^T and AV on attention's."""
    model = load_compressed(save_tiny_model(tmp_path / "m"))
    names = find_targets(model)
    weights = dense_weights(model, names)
    factorize_model(model, {n: get_solver("svd")(weights[n], 8) for n in names})
    export_onnx(model, tmp_path / "model.onnx")
    session = onnx_session(tmp_path / "model.onnx", threads=1, profile_prefix=str(tmp_path / "prof"))
    ids = np.ones((2, 8), dtype=np.int64)
    session.run(None, {"input_ids": ids, "attention_mask": ids})
    events = json.loads(Path(session.end_profiling()).read_text())
    by_weight = [e["name"] for e in events if onnx_node_kind(e) == "linear"]
    attention_products = [e for e in events if onnx_node_kind(e) == "attention" and e["args"]["op_name"] != "Softmax"]
    assert len(by_weight) == 2 * len(names) + 2  # two factors per targeted layer, the pooler and the classifier
    assert sum("/down/" in name or "/up/" in name for name in by_weight) == 2 * len(names)
    assert len(attention_products) == 2 * model.config.num_hidden_layers  # QK^T and AV in every block
