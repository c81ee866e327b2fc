"""Q/K/V down-projection fusion: same logits, one GEMM per block, exact undo, ONNX export."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from conftest import save_tiny_model
from lowrank.compressed import load_compressed
from lowrank.export import export_onnx
from lowrank.fusion import SharedDown, fuse_qkv, unfuse_qkv
from lowrank.layers import FactorizedLinear
from lowrank.matching import find_targets
from lowrank.solvers import get_solver
from lowrank.surgery import dense_weights, factorize_model


def _compressed(tmp_path: Path, ranks=(6, 7, 5)):
    model = load_compressed(save_tiny_model(tmp_path / "m")).eval()
    names = find_targets(model)
    weights = dense_weights(model, names)
    rank_of = {"query": ranks[0], "key": ranks[1], "value": ranks[2]}
    factors = {n: get_solver("svd")(weights[n], rank_of.get(n.rsplit(".", 1)[-1], 8)) for n in names}
    factorize_model(model, factors)
    return model


def _logits(model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_fused_model_gives_the_same_logits_and_one_down_per_block(tmp_path: Path) -> None:
    model = _compressed(tmp_path)
    expected = _logits(model)
    assert fuse_qkv(model) == 2  # both blocks of the tiny BERT
    groups = [m for m in model.modules() if isinstance(m, SharedDown)]
    assert len(groups) == 2 and groups[0].weight.shape == (6 + 7 + 5, 32)
    calls = []
    handles = [g.register_forward_pre_hook(lambda *a: calls.append(1)) for g in groups]  # never called as modules
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    assert not calls
    for group in groups:
        assert group._input is None  # activations released after the value projection
    for handle in handles:
        handle.remove()


def test_unfuse_restores_the_factorized_layout_exactly(tmp_path: Path) -> None:
    model = _compressed(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _logits(model)
    fuse_qkv(model)
    assert unfuse_qkv(model) == 2
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, FactorizedLinear)
    torch.testing.assert_close(_logits(model), expected)


def test_a_dense_projection_is_left_alone(tmp_path: Path) -> None:
    model = load_compressed(save_tiny_model(tmp_path / "m")).eval()
    assert fuse_qkv(model) == 0


def test_fused_model_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    model = _compressed(tmp_path)
    fuse_qkv(model)
    report = export_onnx(model, tmp_path / "fused.onnx")
    assert report["max_abs_diff"] < 1e-4
    shapes = {tuple(init.dims) for init in onnx.load(str(tmp_path / "fused.onnx")).graph.initializer}
    assert (18, 32) in shapes or (32, 18) in shapes  # the stacked down weight


def test_mismatched_widths_are_refused() -> None:
    with pytest.raises(ValueError, match="different widths"):
        SharedDown([FactorizedLinear(8, 8, 2), FactorizedLinear(6, 8, 2)])
