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
    factorize_model(model, {n: get_solver("truncated_svd")(weights[n], 8) for n in names})
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
    factorize_model(model, {n: get_solver("truncated_svd")(weights[n], 8) for n in names})
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


def test_int8_export_quantizes_every_product_and_scores_on_the_dev_set(tmp_path: Path) -> None:
    """`lowrank export --int8 --params`: the fp32 graph scores as PyTorch does (parity); the int8 graph holds
    its products' weights as int8 and is scored beside them (on a model this tiny the scales outweigh the bytes saved). MRPC: a pair task, so the graph takes token types."""
    from typer.testing import CliRunner

    from conftest import GLUE_DIR, tiny_params
    from flows.cli import app

    if not (GLUE_DIR / "MRPC" / "dev.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    model_dir = save_tiny_model(tmp_path / "m")
    model = load_compressed(model_dir)
    names = find_targets(model)
    weights = dense_weights(model, names)
    factorize_model(model, {n: get_solver("truncated_svd")(weights[n], 8) for n in names})
    from lowrank.io.checkpoints import save_compressed
    from transformers import AutoTokenizer

    save_compressed(model, tmp_path / "svd", method="svd", targets=names, tokenizer=AutoTokenizer.from_pretrained(str(model_dir)))
    params = tiny_params(tmp_path, model_dir, GLUE_DIR, data={"task": "mrpc", "max_eval_samples": 64})
    done = CliRunner().invoke(app, ["export", str(tmp_path / "svd"), "--int8", "--params", str(params)])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "svd" / "model.int8.json").read_text())
    assert report["fp32"]["max_abs_diff"] < 1e-4 and report["int8"]["max_abs_diff"] < 0.5
    fp32, int8 = (onnx.load(str(tmp_path / "svd" / name)).graph for name in ("model.onnx", "model.int8.onnx"))
    assert [i.name for i in fp32.input] == ["input_ids", "attention_mask", "token_type_ids"]
    products = sum(node.op_type in ("MatMul", "Gemm") and any(i in {t.name for t in fp32.initializer} for i in node.input) for node in fp32.node)
    assert products >= 2 * len(names)  # both factors of every factorized layer, and the dense products besides
    assert sum(node.op_type == "MatMulInteger" for node in int8.node) == products  # every one with int8 weights
    task = report["task"]
    assert task["onnxruntime"]["score"] == pytest.approx(task["torch"]["score"], abs=1e-9)  # pairs scored with their token types
    assert 0 <= task["onnxruntime_int8"]["score"] <= 1


def test_the_int8_runtime_times_the_quantized_graph(tmp_path: Path) -> None:
    model = load_compressed(save_tiny_model(tmp_path / "m"))
    int8 = measure_latency(model, batch_sizes=(1, 4), seq_len=8, warmup=1, repeats=3, runtime="onnxruntime_int8")
    assert int8.keys() == {"batch_1", "batch_4", "onnx_max_abs_diff"} and 0 < int8["onnx_max_abs_diff"] < 0.5


def test_the_evaluate_stage_scores_and_times_the_int8_graph_and_names_the_machine(tmp_path: Path) -> None:
    from conftest import GLUE_DIR, tiny_params
    from lowrank.config import load_params
    from lowrank.devices import cpu_features, cpu_model
    from lowrank.pipeline import get_stage

    if not (GLUE_DIR / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    params = load_params(tiny_params(tmp_path, save_tiny_model(tmp_path / "m"), GLUE_DIR,
                                     evaluate={"latency_runtimes": ["torch", "onnxruntime_int8"], "latency_batch_sizes": [2]}))
    for name in ("prepare", "finetune", "evaluate_dense"):
        get_stage(name).run(params)
    metrics = json.loads((tmp_path / "metrics" / "evaluate_dense.json").read_text())
    assert 0 <= metrics["task_onnxruntime_int8"]["score"] <= 1 and abs(metrics["task_onnxruntime_int8"]["score"] - metrics["task"]["score"]) <= 0.25
    assert metrics["latency_onnxruntime_int8"]["batch_2"]["median_ms"] > 0
    assert metrics["latency_machine"]["cpu"] == cpu_model() and metrics["latency_machine"]["onnxruntime"][0].isdigit()
    assert metrics["latency_machine"]["cpu_features"] == cpu_features()


def test_the_machine_names_the_vector_extensions_its_gemms_use() -> None:
    from lowrank.devices import cpu_features

    info = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
    assert cpu_features(info) == "AVX2, AVX-512, VNNI"
    assert cpu_features("flags\t: fpu sse2\n") == "none of AVX2, AVX-512, VNNI, BF16, AMX"
    assert cpu_features("model name\t: ARM\n") == "unknown"
