"""The pull towards low rank used while pruning (prune.rank_pull)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.linalg.spectra import tail_share
from lowrank.train.rank_pull import RankPull, RunningFisher


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 8))


def _run(pull: RankPull, model: nn.Module, steps: int) -> None:
    """The hook's calls as the training loop makes them, with no gradient step in between."""
    pull.on_train_begin(model, steps)
    for step in range(steps):
        pull.after_step(model, step)


def test_pulls_sum_to_the_total_over_any_run_length() -> None:
    for steps in (4, 7, 250):  # short enough runs would cap a step at 1
        pull = RankPull({"0": 3}, total=1.5)
        pull.total_steps = steps
        gammas = [pull.gamma_at(step) for step in range(steps)]
        assert gammas[0] == 0 and gammas == sorted(gammas)
        assert sum(gammas) == pytest.approx(1.5)


def test_tail_shrinks_by_about_exp_minus_total_without_gradients() -> None:
    model = _model()
    ranks = {"0": 3, "1": 2}
    before = {name: tail_share(model.get_submodule(name).weight, r) for name, r in ranks.items()}
    _run(RankPull(ranks, total=2.0, refresh_every=1), model, steps=200)
    for name, rank in ranks.items():
        after = tail_share(model.get_submodule(name).weight, rank)
        # the tail's energy shrinks by prod (1 - gamma)^2 ~ exp(-2 total), the head's not at all
        assert after < before[name] * 0.05
        assert after > before[name] * 1e-4


def test_a_matrix_of_the_target_rank_is_left_as_it_is() -> None:
    model = _model()
    weight = model[0].weight
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        weight.copy_(u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    start = weight.detach().clone()
    _run(RankPull({"0": 3}, total=5.0, refresh_every=3), model, steps=20)
    torch.testing.assert_close(weight.detach(), start, atol=1e-5, rtol=1e-5)


def test_zero_total_changes_nothing_and_masks_hold() -> None:
    model = _model()
    start = model[1].weight.detach().clone()
    _run(RankPull({"1": 2}, total=0.0), model, steps=5)
    assert torch.equal(model[1].weight.detach(), start)

    mask = torch.rand(start.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    with torch.no_grad():
        model[1].weight.mul_(mask)
    _run(RankPull({"1": 2}, total=3.0, mask_fn=lambda: {"1": mask}), model, steps=10)
    assert torch.all(model[1].weight.detach()[~mask] == 0)
    assert not torch.equal(model[1].weight.detach()[mask], start[mask])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ranks": {"0": 3}, "total": -1.0}, "total"),
        ({"ranks": {"0": 0}, "total": 1.0}, "ranks"),
        ({"ranks": {}, "total": 1.0}, "target"),
        ({"ranks": {"0": 3}, "total": 1.0, "refresh_every": 0}, "refresh_every"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RankPull(**kwargs)


def test_rank_above_the_matrix_and_unknown_module_are_named() -> None:
    with pytest.raises(ValueError, match="'0'"):
        RankPull({"0": 13}, total=1.0).on_train_begin(_model(), 10)
    with pytest.raises(ValueError, match="missing"):
        RankPull({"missing": 2}, total=1.0).on_train_begin(_model(), 10)


def test_weighted_pull_keeps_the_important_entries() -> None:
    """With importance, the pull heads for the weighted rank-r solution: the important entries move less than under the plain pull."""
    generator = torch.Generator().manual_seed(3)
    importance = torch.rand(20, 12, generator=generator) ** 4 * 100 + 0.01  # spread-out weights
    moved = {}
    for weighted in (False, True):
        model = _model()
        start = model[0].weight.detach().clone()
        pull = RankPull({"0": 3}, total=3.0, refresh_every=5, importance_fn=(lambda: {"0": importance}) if weighted else None)
        _run(pull, model, steps=50)
        moved[weighted] = float((importance * (model[0].weight.detach() - start) ** 2).sum())
        assert tail_share(model[0].weight, 3) < tail_share(start, 3)
    assert moved[True] < 0.5 * moved[False]


def test_running_fisher_is_the_moving_average_of_squared_gradients() -> None:
    model = _model()
    fisher = RunningFisher(["1"], beta=0.5)
    fisher.on_train_begin(model, 3)
    expected = torch.zeros_like(model[1].weight)
    for step in range(3):
        model.zero_grad()
        model(torch.randn(4, 12, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        fisher.after_backward(model, step)
        expected = 0.5 * expected + 0.5 * model[1].weight.grad.square()
    torch.testing.assert_close(fisher.values()["1"], expected)
    with pytest.raises(ValueError, match="beta"):
        RunningFisher(["1"], beta=1.0)
