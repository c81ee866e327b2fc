"""Mixed-rank fine-tuning: the two paths of a layer, the ramp, and finalizing a tiny BERT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank.modules.layers import FactorizedLinear
from lowrank.modules.mixed_rank import MixedRankLinear, finalize, mixed_rank_layers, to_mixed_rank
from lowrank.train.mixed_rank import MixedRankScheduler, low_rank_probability
from lowrank.train.pruning import prune_once
from lowrank.linalg.sparsity import rowwise_sparse_svd
from test_pruning import run_loop, target_names, tiny_bert


def mixed_layer(seed: int = 0) -> MixedRankLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 5, generator=generator)  # (out, in)
    mask = torch.rand(6, 5, generator=generator) < 0.5
    u, v = torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)
    bias = torch.randn(6, generator=generator)
    return MixedRankLinear(weight, mask, FactorizedLinear.from_factors(u, v, bias))


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.2), (10, 0.36), (25, 0.6), (49, 0.2 + 0.8 * 49 / 50), (50, 1.0), (99, 1.0)]
)
def test_low_rank_probability_ramp(step: int, expected: float) -> None:
    assert low_rank_probability(step, 100, p0=0.2, ramp_share=0.5) == pytest.approx(expected)


def test_probability_edges_and_options() -> None:
    assert low_rank_probability(0, 100, p0=0.0, ramp_share=0.0) == 1.0
    assert low_rank_probability(0, 100, p0=0.0, ramp_share=1.0) == 0.0
    for kwargs, field in (({"p0": 1.5}, "p0"), ({"ramp_share": -0.1}, "ramp_share")):
        with pytest.raises(ValueError, match=field):
            MixedRankScheduler(**kwargs)


def test_paths_are_exactly_low_rank_or_sparse() -> None:
    layer = mixed_layer()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    layer.train()
    layer.use_low_rank = True
    assert torch.equal(layer(x), layer.low_rank(x))
    layer.use_low_rank = False
    sparse = x @ (layer.weight * layer.mask).T + layer.low_rank.up.bias
    assert torch.allclose(layer(x), sparse, atol=1e-6)
    assert torch.equal(layer(x), F.linear(x, layer.weight * layer.mask, layer.bias))
    layer.eval()  # evaluation always measures the low-rank model that will be saved
    assert torch.equal(layer(x), layer.low_rank(x))


def test_scheduler_draws_are_seeded_and_follow_probability() -> None:
    model = nn.Sequential(*[mixed_layer(seed) for seed in range(40)])

    def shares(p0: float, seed: int) -> list[float]:
        scheduler = MixedRankScheduler(p0=p0, ramp_share=0.5, seed=seed)
        scheduler.on_train_begin(model, 10)
        out = []
        for step in range(10):
            scheduler.before_forward(model, step)
            out.append(scheduler.metrics()["low_rank_share"])
        return out

    zero = shares(0.0, seed=0)
    assert zero[0] == 0.0 and zero[5:] == [1.0] * 5  # p = 0 at the start, all low-rank after the ramp
    assert shares(0.5, seed=1) == shares(0.5, seed=1)
    assert shares(0.5, seed=1) != shares(0.5, seed=2)
    assert 0.3 < shares(0.5, seed=1)[0] < 0.7


def compressed_tiny_bert(train_sparse: bool = False) -> tuple[nn.Module, list[str]]:
    model = tiny_bert()
    names = target_names(model)
    masks = prune_once(model, names, density=0.3)
    modules = dict(model.named_modules())
    factors = {n: rowwise_sparse_svd(modules[n].weight, masks[n], rank=4) for n in names}
    assert to_mixed_rank(model, factors, masks, train_sparse=train_sparse) == names
    return model, names


def test_mixed_rank_training_keeps_pruned_entries_zero_and_finalizes() -> None:
    model, names = compressed_tiny_bert(train_sparse=True)
    layers = mixed_rank_layers(model)
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    scheduler = MixedRankScheduler(p0=0.3, ramp_share=0.5, seed=0)
    losses = run_loop(model, [scheduler], 8)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(layer.use_low_rank for layer in layers.values())
    for name, layer in layers.items():
        assert not layer.weight[~layer.mask].any()
    assert any(not torch.equal(before[n], layer.weight) for n, layer in layers.items())  # sparse path trained

    model.eval()
    input_ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed_logits = model(input_ids=input_ids).logits
    assert finalize(model) == names
    assert not mixed_rank_layers(model)
    assert all(isinstance(dict(model.named_modules())[n], FactorizedLinear) for n in names)
    assert not any(k.endswith(".mask") for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, mixed_logits)


def test_sparse_weights_frozen_by_default() -> None:
    model, _ = compressed_tiny_bert()
    layers = mixed_rank_layers(model)
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    run_loop(model, [MixedRankScheduler(p0=0.0, ramp_share=1.0)], 3)
    assert all(torch.equal(before[n], layer.weight) for n, layer in layers.items())
