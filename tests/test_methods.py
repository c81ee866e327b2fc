"""The method table and the public call: a method is one function plus one registration; compress_ in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank
from conftest import GLUE_DIR, REPO, tiny_bert_config, tiny_params
from lowrank.config import ConfigError, load_params
from lowrank.linalg.solvers import get_solver
from lowrank.methods import METHODS, NoOptions, get_method, method_names, register_method, unregister_method
from lowrank.modules.layers import FactorizedLinear
from lowrank.pipeline import Layout, get_stage, preflight


def tiny_bert() -> nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


def test_the_table_holds_the_seed_methods_with_their_needs() -> None:
    rows = {name: method.row() for name, method in METHODS.items()}
    assert list(rows) == ["svd", "fwsvd", "tfwsvd", "tvd", "asvd", "svd_llm", "sparse_svd", "sparse_tfwsvd"]
    assert [rows[m]["importance"] for m in rows] == ["none", "fisher", "fisher", "taylor", "abs_mean", "gram", "sparse", "sparse"]
    assert method_names("lpaf") == ["svd", "sparse_svd", "sparse_tfwsvd"]
    assert get_method("tfwsvd").solver_name("adam_sgd") == "adam_sgd" and get_method("fwsvd").solver_name("als") == "input_weighted_svd"
    assert all(METHODS[m].needs_masks == m.startswith("sparse") for m in METHODS)
    assert rows["asvd"]["options"] == {"alpha": 0.5} and rows["svd_llm"]["options"] == {"damp": 0.01, "update": False}
    assert rows["sparse_tfwsvd"]["options"] == {"importance": "fisher", "pruned_weight": 0.6} and rows["tfwsvd"]["options"] == {}


def test_registration_rejects_duplicates_and_bad_fields() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method("svd", importance="none", solver="truncated_svd", paths=("factorize",))
    with pytest.raises(ValueError, match="importance"):
        register_method("toy_bad", importance="gradients", solver=None, paths=("factorize",))
    with pytest.raises(ValueError, match="paths"):
        register_method("toy_bad", importance="none", solver=None, paths=("nowhere",))
    with pytest.raises(ValueError, match="options must be a frozen dataclass"):
        register_method("toy_bad", importance="none", solver=None, paths=("factorize",), options=dict)
    with pytest.raises(ValueError, match="an `importance` field"):
        register_method("toy_bad", importance="sparse", solver=None, paths=("lpaf",), needs_masks=True)
    assert "toy_bad" not in METHODS
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_config_validation_reads_the_table() -> None:
    with pytest.raises(ConfigError, match=r"factorize\.method: unknown method 'nope' \(known: svd, fwsvd"):
        load_params(REPO / "params.yaml", ["factorize.method=nope"])
    with pytest.raises(ConfigError, match=r"factorize\.solver: unknown solver 'foo'"):
        load_params(REPO / "params.yaml", ["factorize.method=tfwsvd", "factorize.solver=foo"])


def test_compress_svd_matches_the_truncated_svd_and_reports_the_ratio() -> None:
    model = tiny_bert()
    name = "bert.encoder.layer.0.attention.self.query"
    weight = dict(model.named_modules())[name].weight.detach().clone()
    x = torch.randint(5, 40, (2, 7))
    report = lowrank.compress_(model, method="svd", keep_ratio=0.5)
    layer = dict(model.named_modules())[name]
    assert isinstance(layer, FactorizedLinear) and layer.rank == report.ranks[name] == 9  # the uniform rank that spends half the budget
    a, b = get_solver("truncated_svd")(weight, 9)
    torch.testing.assert_close(layer.up.weight @ layer.down.weight, a @ b)
    assert len(report.layers) == 12 and report.keep_ratio_reached <= 0.5
    row = next(r for r in report.layers if r["layer"] == name)
    assert row["error"] == pytest.approx(float((weight - a @ b).square().mean()), rel=1e-5)
    assert model(input_ids=x).logits.shape == (2, 2)
    metrics = report.metrics()
    assert metrics["layers_factorized"] == 12 and metrics["mean_error"] > 0


def test_compress_with_fisher_importance_and_the_errors_it_needs() -> None:
    model = tiny_bert()
    batches = [{"input_ids": torch.randint(5, 40, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long),
                "labels": torch.tensor([0, 1, 0, 1])} for _ in range(2)]
    importance = lowrank.fisher_importance(model, batches)
    assert len(importance) == 12 and all(t.min() >= 0 for t in importance.values())
    with pytest.raises(ValueError, match="weighs entries by fisher importance"):
        lowrank.compress_(tiny_bert(), method="tfwsvd", keep_ratio=0.3)
    with pytest.raises(ValueError, match="pass their masks"):
        lowrank.compress_(tiny_bert(), method="sparse_svd", keep_ratio=0.3)
    with pytest.raises(ConfigError, match="unknown key factorize.solver_step"):
        lowrank.compress_(tiny_bert(), method="tfwsvd", importance=importance, solver_step=3)
    report = lowrank.compress_(model, method="tfwsvd", keep_ratio=0.3, importance=importance, solver_steps=3)
    assert all("fisher_error" in row for row in report.layers if row["rank"])
    assert report.keep_ratio_reached <= 0.3


@pytest.fixture()
def toy_method():
    """A method that keeps the top rows and columns: registered for the test only."""
    calls: list[int] = []

    @register_method("toy_corner", importance="taylor", solver=None, paths=("factorize",), summary="test only")
    def corner(weight, rank, *, importance, mask, options, solve):
        calls.append(rank)
        assert importance is not None and importance.shape == weight.shape  # the stage loaded taylor.safetensors
        assert mask is None and options == NoOptions() and callable(solve)  # no options: the empty class
        a = torch.zeros(weight.shape[0], rank, dtype=weight.dtype)
        a[:rank] = torch.eye(rank, dtype=weight.dtype)
        return a, weight[:rank].clone()

    yield calls
    unregister_method("toy_corner")


def test_a_registered_method_runs_through_the_factorize_stage(tmp_path: Path, tiny_model_dir: Path, toy_method) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    params = load_params(tiny_params(
        tmp_path, tiny_model_dir, GLUE_DIR, factorize={"method": "toy_corner", "keep_ratio": 0.5},
        evaluate={"latency": False},
    ))
    preflight(params)
    for name in ("prepare", "finetune", "fisher", "factorize", "evaluate_factorized"):
        result = get_stage(name).run(params)
    assert len(toy_method) == 12
    model_dir = Layout.from_params(params).output("factorize")
    model = lowrank.load_compressed(model_dir)
    assert model.config.lowrank["method"] == "toy_corner" and model.config.lowrank["solver"] == "als"
    layer = dict(model.named_modules())["bert.encoder.layer.0.attention.self.query"]
    assert torch.count_nonzero(layer.up.weight[layer.rank:]) == 0  # the toy's A: identity on top, zeros below
    assert 0 <= result.metrics["task.score"] <= 1
    factorize = json.loads((tmp_path / "metrics" / "factorize.json").read_text())
    assert factorize["layers_factorized"] == 12


def test_lowrank_methods_lists_the_table() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    done = CliRunner().invoke(app, ["methods"])
    assert done.exit_code == 0, done.output
    assert [row["method"] for row in json.loads(done.output)] == list(METHODS)
