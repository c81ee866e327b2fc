"""Factorized layers, target matching, module surgery, and the save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import save_tiny_model
from lowrank.io.checkpoints import load_compressed, recipe, save_compressed
from lowrank.evaluation import count_parameters
from lowrank.modules.layers import FactorizedLinear
from lowrank.modules.matching import find_targets, matches, matrix_type
from lowrank.modules.surgery import dense_weights, factorize_model, replace_modules


def test_full_rank_factorized_linear_matches_the_dense_layer() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(12, 8).double()
    layer = FactorizedLinear.from_linear(dense, rank=8, solver="truncated_svd")
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.to_dense().weight, dense.weight, atol=1e-12, rtol=1e-12)
    assert (layer.in_features, layer.out_features, layer.rank) == (12, 8, 8)
    assert "rank=8" in repr(layer)


def test_a_conv1d_factorizes_as_the_linear_it_is() -> None:
    """transformers' Conv1D (GPT-2) computes `x W + b` with W stored (in, out): read as (out, in), it gives the same layer."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(8, 12).double()  # nf=8 outputs, nx=12 inputs
    nn.init.normal_(conv.bias)
    layer = FactorizedLinear.from_linear(conv, rank=8, solver="truncated_svd")
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-12, rtol=1e-12)
    assert (layer.in_features, layer.out_features) == (12, 8)
    torch.testing.assert_close(dense_weights(nn.ModuleDict({"c": conv}), ["c"])["c"], conv.weight.T)


def test_factorized_linear_keeps_device_dtype_and_bias() -> None:
    dense = nn.Linear(6, 4, bias=False).to(torch.bfloat16)
    layer = FactorizedLinear.from_linear(dense, rank=2, solver="input_weighted_svd")
    assert layer.up.weight.dtype == torch.bfloat16 and layer.down.weight.dtype == torch.bfloat16
    assert layer.up.bias is None and layer.down.bias is None
    assert layer.up.weight.shape == (4, 2) and layer.down.weight.shape == (2, 6)


def test_factorized_linear_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="rank: must be in"):
        FactorizedLinear(4, 3, rank=4)
    with pytest.raises(ValueError, match="factors: expected"):
        FactorizedLinear.from_factors(torch.ones(4, 2), torch.ones(3, 5))
    with pytest.raises(ValueError, match="bias: expected shape"):
        FactorizedLinear.from_factors(torch.ones(4, 2), torch.ones(2, 5), torch.ones(3))


@pytest.mark.parametrize(
    ("name", "targets", "exclude", "expected"),
    [
        ("bert.encoder.layer.0.attention.self.query", None, None, True),
        ("bert.encoder.layer.11.output.dense", None, None, True),
        ("bert.pooler.dense", None, None, False),
        ("classifier", None, None, False),
        ("bert.embeddings.word_embeddings", None, None, False),
        ("distilbert.transformer.layer.3.ffn.lin1", None, None, True),
        ("pre_classifier", None, None, False),
        ("bert.encoder.layer.0.output.dense", ["output.dense"], None, True),
        ("bert.encoder.layer.0.attention.output.dense", ["output.dense"], ["attention.output.dense"], False),
        ("bert.encoder.layer.0.intermediate.dense", ["dense"], None, True),
        ("bert.encoder.layer.0.intermediate.dense", ["mediate.dense"], None, False),  # suffixes are whole components
        ("bert.encoder.layer.0.intermediate.dense", r".*layer\.0\..*", None, True),
        ("bert.encoder.layer.10.intermediate.dense", r".*layer\.0\..*", None, False),
    ],
)
def test_matches_table(name: str, targets, exclude, expected: bool) -> None:
    from lowrank.modules.matching import DEFAULT_EXCLUDE, DEFAULT_TARGETS

    assert matches(name, targets or DEFAULT_TARGETS, exclude or DEFAULT_EXCLUDE) is expected


def test_matrix_types_of_bert_blocks() -> None:
    assert matrix_type("bert.encoder.layer.3.attention.self.value") == "value"
    assert matrix_type("bert.encoder.layer.3.attention.output.dense") == "attention_output"
    assert matrix_type("bert.encoder.layer.3.intermediate.dense") == "ffn_in"
    assert matrix_type("bert.encoder.layer.3.output.dense") == "ffn_out"


def _tiny(tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    folder = save_tiny_model(tmp_path / "dense")
    return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval(), folder


def test_replace_modules_swaps_in_place_and_reports_names(tmp_path: Path) -> None:
    model, _ = _tiny(tmp_path)
    names = find_targets(model)
    assert len(names) == 12  # 2 blocks x 6 Linear
    replaced = replace_modules(model, names[:2], lambda name, m: nn.Identity())
    assert replaced == names[:2]
    assert isinstance(dict(model.named_modules())[names[0]], nn.Identity)
    with pytest.raises(ValueError, match="no submodule called 'nope'"):
        replace_modules(model, ["nope"], lambda name, m: m)


def test_save_and_load_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model, folder = _tiny(tmp_path)
    names = find_targets(model)
    weights = dense_weights(model, names)
    from lowrank.linalg.solvers import get_solver

    factors = {n: get_solver("truncated_svd")(weights[n], 8) for n in names[:-1]}  # the last target stays dense
    factorize_model(model, factors)
    input_ids = torch.randint(5, 40, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    out = save_compressed(model, tmp_path / "compressed", method="svd", targets=names, extra={"keep_ratio": 0.5})
    loaded = load_compressed(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, atol=0, rtol=0)
    entry = recipe(loaded)
    assert entry["method"] == "svd" and entry["keep_ratio"] == 0.5
    assert entry["ranks"][names[0]] == 8 and entry["ranks"][names[-1]] is None
    assert isinstance(dict(loaded.named_modules())[names[0]], FactorizedLinear)
    # parameter count = the formula: r (m + n) per factorized 32x32 / 32x64 weight
    counts = count_parameters(loaded, names)
    shapes = [tuple(weights[n].shape) for n in names]
    expected_target = sum(8 * (m + n) for m, n in shapes[:-1]) + shapes[-1][0] * shapes[-1][1]
    assert counts["target_linear"] == expected_target
    assert not list(tmp_path.glob(".compressed.tmp-*"))
    # and the top-level call loads it too
    import lowrank

    assert type(lowrank.load_compressed(out)) is type(loaded)


def test_load_refuses_weights_that_do_not_fit(tmp_path: Path) -> None:
    model, _ = _tiny(tmp_path)
    names = find_targets(model)
    factorize_model(model, {names[0]: (torch.ones(32, 4), torch.ones(4, 32))})
    out = save_compressed(model, tmp_path / "c", method="svd", targets=names)
    import json

    config = json.loads((out / "config.json").read_text())
    config["lowrank"]["ranks"][names[0]] = 5
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|do not fit"):
        load_compressed(out)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_compressed(tmp_path / "missing")


def test_dense_folder_loads_as_dense(tmp_path: Path) -> None:
    _, folder = _tiny(tmp_path)
    model = load_compressed(folder)
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert recipe(model) == {}
