"""Factorizers: closed forms against the Eckart-Young answer, iterative ones against FWSVD."""

from __future__ import annotations

import pytest
import torch

from lowrank.linalg.solvers import SOLVERS, column_weights, get_solver, iterative_solvers, register_solver, weighted_error


def _matrix(out_features: int = 24, in_features: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)


def _importance(out_features: int = 24, in_features: int = 16, seed: int = 1) -> torch.Tensor:
    """Heavy-tailed like a Fisher matrix: a few entries hold much of the total."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator, dtype=torch.float64).mul(1.5).exp()


def _quick(name: str) -> dict[str, int]:
    """A few iterations for the iterative solvers, where a test is not about convergence."""
    return {"steps": 3} if name in ("als", "adam_sgd") else {}


def test_registry_holds_every_solver_and_rejects_unknown_names() -> None:
    assert {"truncated_svd", "input_weighted_svd", "als", "adam_sgd"} <= set(SOLVERS)
    assert get_solver("als") is SOLVERS["als"]
    with pytest.raises(ValueError, match=r"unknown solver 'qr' \(registered: adam_sgd, als, input_weighted_svd, truncated_svd"):
        get_solver("qr")
    with pytest.raises(ValueError, match="already registered"):
        register_solver("truncated_svd")


def test_no_solver_is_named_after_a_method() -> None:
    """Solvers are the math the methods run: a solver called `svd` or `fwsvd` would read as the method of that name."""
    from lowrank.methods import METHODS

    assert not set(SOLVERS) & set(METHODS)
    assert iterative_solvers() == ["als", "adam_sgd"]  # what factorize.solver may name, unchanged
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        register_solver("my-solver")


def test_truncated_svd_error_is_the_dropped_singular_values() -> None:
    weight = _matrix()
    singular = torch.linalg.svdvals(weight)
    a, b = SOLVERS["truncated_svd"](weight, 5)
    assert a.shape == (24, 5) and b.shape == (5, 16)
    dropped = singular[5:].square().sum()
    assert (weight - a @ b).square().sum().item() == pytest.approx(dropped.item(), rel=1e-10)
    assert weighted_error(weight, a, b) == pytest.approx(dropped.item() / weight.numel(), rel=1e-6)


@pytest.mark.parametrize("name", ["truncated_svd", "input_weighted_svd", "als", "adam_sgd"])
def test_full_rank_reproduces_the_weight(name: str) -> None:
    weight = _matrix()
    a, b = SOLVERS[name](weight, 16, importance=_importance(), **_quick(name))
    torch.testing.assert_close(a @ b, weight, atol=1e-8, rtol=1e-8)


def test_fwsvd_is_exact_for_column_importance() -> None:
    """With one importance per input feature the weighted problem is an SVD of W diag(d)."""
    weight = _matrix()
    column = torch.linspace(0.1, 4.0, 16, dtype=torch.float64)
    importance = column.expand(24, 16)
    a, b = SOLVERS["input_weighted_svd"](weight, 4, importance=importance)
    singular = torch.linalg.svdvals(weight * column.sqrt())
    expected = singular[4:].square().sum().item() / weight.numel()
    assert weighted_error(weight, a, b, importance) == pytest.approx(expected, rel=1e-9)
    # And no other rank-4 factorization does better: ALS from plain SVD lands on the same value.
    a_als, b_als = SOLVERS["als"](weight, 4, importance=importance, init="svd", steps=200, tol=0.0)
    assert weighted_error(weight, a_als, b_als, importance) == pytest.approx(expected, rel=1e-4)


def test_fwsvd_without_or_with_uniform_importance_is_svd() -> None:
    weight = _matrix()
    a, b = SOLVERS["truncated_svd"](weight, 6)
    for importance in (None, torch.full_like(weight, 3.0)):
        a_fw, b_fw = SOLVERS["input_weighted_svd"](weight, 6, importance=importance)
        torch.testing.assert_close(a_fw @ b_fw, a @ b)


def test_fwsvd_ignores_the_scale_of_importance() -> None:
    """Sum or mean of the Fisher, or any unit, gives the same factors."""
    weight, importance = _matrix(), _importance()
    a1, b1 = SOLVERS["input_weighted_svd"](weight, 5, importance=importance)
    a2, b2 = SOLVERS["input_weighted_svd"](weight, 5, importance=importance * 1e-9)
    torch.testing.assert_close(a1 @ b1, a2 @ b2)


def test_column_weights_floor_keeps_unused_inputs_finite() -> None:
    importance = torch.ones(4, 3, dtype=torch.float64)
    importance[:, 1] = 0.0
    d = column_weights(importance, floor=0.1)
    # sqrt of column means (1, 0, 1), floored at 0.1 * mean(d) = 0.1 * 2/3.
    torch.testing.assert_close(d, torch.tensor([1.0, 0.2 / 3, 1.0], dtype=torch.float64))


def test_als_recovers_an_exactly_low_rank_weight() -> None:
    """Any positive weighting has the same optimum when W itself has rank r: W, with zero error."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(20, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 12, generator=generator, dtype=torch.float64)
    importance = _importance(20, 12)
    a, b = SOLVERS["als"](weight, 3, importance=importance, steps=100, tol=0.0)
    assert weighted_error(weight, a, b, importance) < 1e-20


def test_als_makes_its_pair_products_a_slice_at_a_time_past_the_limit_and_gets_the_same_factors(monkeypatch) -> None:
    """A 7B matrix's pair table would not fit in memory: sliced, with small chunks of rows, the answer is the same."""
    from lowrank.linalg import weighted_solvers

    weight, importance = _matrix(), _importance()
    whole = SOLVERS["als"](weight, 6, importance=importance, steps=4)
    monkeypatch.setattr(weighted_solvers, "PAIR_ELEMENTS", 5 * 16)  # 21 pairs of 16 or 24 entries: 5 or 3 per slice
    sliced = SOLVERS["als"](weight, 6, importance=importance, steps=4)
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_als_lowers_the_weighted_error_monotonically_below_fwsvd() -> None:
    weight, importance = _matrix(), _importance()
    a_fw, b_fw = SOLVERS["input_weighted_svd"](weight, 4, importance=importance)
    fwsvd_error = weighted_error(weight, a_fw, b_fw, importance)
    history: list[float] = []
    a, b = SOLVERS["als"](weight, 4, importance=importance, steps=30, tol=0.0, callback=lambda step, error: history.append(error))
    assert len(history) == 30
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(history, history[1:]))
    assert history[-1] == pytest.approx(weighted_error(weight, a, b, importance), rel=1e-9)
    assert history[-1] < 0.5 * fwsvd_error  # measured 0.434x on this matrix


def test_als_stops_early_once_converged() -> None:
    weight = _matrix()
    history: list[float] = []
    SOLVERS["als"](weight, 4, steps=50, callback=lambda step, error: history.append(error))
    assert len(history) == 1  # uniform importance: the SVD start is already optimal


def test_als_ridge_shrinks_the_factors() -> None:
    weight, importance = _matrix(), _importance()
    norms = []
    for lam in (0.0, 10.0):
        a, b = SOLVERS["als"](weight, 4, importance=importance, steps=20, lam=lam)
        norms.append(a.square().sum().item() + b.square().sum().item())
    assert norms[1] < 0.9 * norms[0]


def test_als_handles_rows_and_columns_without_importance() -> None:
    weight, importance = _matrix(), _importance()
    importance[3] = 0.0
    importance[:, 5] = 0.0
    a, b = SOLVERS["als"](weight, 4, importance=importance, steps=10)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a[3].abs().max().item() == 0.0  # nothing asks row 3 to be reproduced: its minimum-norm answer is 0


def test_adam_sgd_beats_fwsvd_in_both_phases() -> None:
    weight, importance = _matrix(), _importance()
    a_fw, b_fw = SOLVERS["input_weighted_svd"](weight, 4, importance=importance)
    fwsvd_error = weighted_error(weight, a_fw, b_fw, importance)
    history: list[float] = []
    a, b = SOLVERS["adam_sgd"](
        weight, 4, importance=importance, steps=1500, init="svd", adam_lr=1e-2, callback=lambda step, error: history.append(error)
    )
    assert history[0] > fwsvd_error  # starts from plain SVD, above the switch threshold
    final = weighted_error(weight, a, b, importance)
    assert final == pytest.approx(history[-1], rel=1e-9)
    assert final < 0.5 * fwsvd_error  # measured 0.427x


def test_gradient_descent_phase_never_raises_the_error() -> None:
    """From FWSVD's factors the threshold is met at once: pure descent with backtracking."""
    weight, importance = _matrix(), _importance()
    history: list[float] = []
    SOLVERS["adam_sgd"](weight, 4, importance=importance, steps=300, sgd_lr=10.0, callback=lambda step, error: history.append(error))
    assert all(later <= earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] < 0.5 * history[0]  # measured 0.422x of FWSVD's error after 300 steps


def test_solvers_keep_dtype_and_shape() -> None:
    weight = _matrix().to(torch.bfloat16)
    for name in SOLVERS:
        a, b = SOLVERS[name](weight, 3, importance=_importance().float(), **_quick(name))
        assert (a.dtype, b.dtype, a.shape, b.shape) == (torch.bfloat16, torch.bfloat16, (24, 3), (3, 16))
        assert a.is_contiguous() and b.is_contiguous()


def test_zero_weight_gives_zero_factors() -> None:
    weight = torch.zeros(6, 5)
    for name in ("input_weighted_svd", "als", "adam_sgd"):
        a, b = SOLVERS[name](weight, 2, importance=torch.rand(6, 5), **_quick(name))
        assert torch.count_nonzero(a @ b) == 0


@pytest.mark.parametrize(
    ("weight", "rank", "importance", "message"),
    [
        (torch.ones(4), 1, None, "weight: expected a 2-D"),
        (torch.ones(4, 3, dtype=torch.long), 1, None, "weight: expected a 2-D floating"),
        (torch.full((4, 3), float("nan")), 1, None, "weight: contains NaN"),
        (torch.ones(4, 3), 0, None, r"rank: must be an integer in \[1, 3\]"),
        (torch.ones(4, 3), 4, None, "rank: must be an integer"),
        (torch.ones(4, 3), 2.0, None, "rank: must be an integer"),
        (torch.ones(4, 3), 1, torch.ones(3, 4), r"importance: expected shape \(4, 3\)"),
        (torch.ones(4, 3), 1, -torch.ones(4, 3), "importance: must be non-negative"),
        (torch.ones(4, 3), 1, torch.zeros(4, 3), "importance: is zero everywhere"),
        (torch.ones(4, 3), 1, torch.full((4, 3), float("inf")), "importance: contains NaN"),
    ],
)
def test_bad_inputs_name_the_argument(weight, rank, importance, message) -> None:
    for name in SOLVERS:
        with pytest.raises(ValueError, match=message):
            SOLVERS[name](weight, rank, importance=importance)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("als", {"steps": -1}, "steps: must be a non-negative integer"),
        ("als", {"lam": -0.1}, "lam: must be >= 0"),
        ("als", {"init": "random"}, "init: must be 'fwsvd' or 'svd'"),
        ("adam_sgd", {"switch_ratio": -1.0}, "switch_ratio: must be >= 0"),
        ("adam_sgd", {"sgd_lr": 0.0}, "sgd_lr: must be positive"),
    ],
)
def test_bad_options_name_the_option(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SOLVERS[name](_matrix(), 2, importance=_importance(), **options)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        SOLVERS["als"](_matrix(), 2, stepz=3)


@pytest.mark.parametrize("name", ["truncated_svd", "input_weighted_svd", "als"])
def test_factors_are_balanced_whatever_the_importance_scale(name: str) -> None:
    """Fisher values near 1e-10 must not leave one factor 1e5 times larger than the other."""
    weight, importance = _matrix(), _importance() * 1e-10
    a, b = SOLVERS[name](weight, 5, importance=importance, **_quick(name))
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1))
    a_ref, b_ref = SOLVERS["input_weighted_svd"](weight, 5, importance=importance * 1e10)
    if name == "input_weighted_svd":  # and the product is the unbalanced closed form's
        torch.testing.assert_close(a @ b, a_ref @ b_ref)
