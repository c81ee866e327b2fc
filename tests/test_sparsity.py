"""Sparsity-aware factorization: importance weights, the row-wise closed form, and exact recovery."""

from __future__ import annotations

import pytest
import torch

from lowrank.sparsity import rowwise_sparse_svd, sparsity_importance


def low_rank_matrix(rows: int, cols: int, rank: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=generator, dtype=torch.float64) @ torch.randn(
        rank, cols, generator=generator, dtype=torch.float64
    )


def weighted_als(weight: torch.Tensor, importance: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int):
    """Element-wise weighted ALS: each row of U (then column of V) is an r x r weighted least-squares solve."""
    for _ in range(iterations):
        gram = torch.einsum("rj,ij,sj->irs", v, importance, v)  # (out, rank, rank)
        u = torch.linalg.solve(gram, torch.einsum("rj,ij->ir", v, importance * weight))
        gram = torch.einsum("ir,ij,is->jrs", u, importance, u)  # (in, rank, rank)
        v = torch.linalg.solve(gram, torch.einsum("ir,ij->jr", u, importance * weight)).T
    return u, v


def test_importance_is_near_zero_on_pruned_entries() -> None:
    mask = torch.tensor([[True, False, True], [False, True, True]])
    uniform = sparsity_importance(mask)
    assert torch.equal(uniform, torch.where(mask, 1.0, 1e-6))
    scores = torch.tensor([[2.0, 9.0, -4.0], [5.0, 6.0, 0.0]])
    weighted = sparsity_importance(mask, scores, pruned_weight=0.0)
    # Kept |scores| 2, 4, 6, 0 have mean 3; the zero score is floored at pruned_weight (0 here).
    assert torch.allclose(weighted, torch.tensor([[2 / 3, 0.0, 4 / 3], [0.0, 2.0, 0.0]]))
    raw = sparsity_importance(mask, scores, pruned_weight=1e-3, normalize=False)
    assert torch.allclose(raw, torch.tensor([[2.0, 1e-3, 4.0], [1e-3, 6.0, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        sparsity_importance(mask, scores[:, :2])
    with pytest.raises(ValueError, match="pruned_weight"):
        sparsity_importance(mask, pruned_weight=-1.0)


def test_rowwise_recovers_exactly_low_rank_matrix_without_pruning() -> None:
    weight = low_rank_matrix(12, 10, 3)
    mask = torch.ones_like(weight, dtype=torch.bool)
    u, v = rowwise_sparse_svd(weight, mask, rank=3)
    assert u.shape == (12, 3) and v.shape == (3, 10)
    assert torch.allclose(u @ v, weight, atol=1e-10)
    scores = torch.rand(12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    u, v = rowwise_sparse_svd(weight, mask, rank=3, scores=scores)  # any column weights keep it exact
    assert torch.allclose(u @ v, weight, atol=1e-10)


def test_rowwise_gives_emptied_columns_little_rank() -> None:
    weight = low_rank_matrix(12, 10, 5).float()
    mask = torch.ones(12, 10, dtype=torch.bool)
    mask[:, :4] = False  # the pruned matrix lives on 6 columns: rank 5 there
    u, v = rowwise_sparse_svd(weight, mask, rank=5)
    assert u.dtype == torch.float32
    kept_error = ((u @ v - weight) * mask).norm() / (weight * mask).norm()
    assert kept_error < 1e-4
    with pytest.raises(ValueError, match="rank"):
        rowwise_sparse_svd(weight, mask, rank=11)


def test_weighted_als_with_sparsity_importance_recovers_kept_entries() -> None:
    """The issue's claim: sparsity-aware factorization fits a matrix exactly low-rank on its kept entries."""
    rank = 2
    truth = low_rank_matrix(16, 12, rank)
    mask = torch.rand(16, 12, generator=torch.Generator().manual_seed(2)) < 0.6
    pruned = truth * mask
    kept_norm = (truth * mask).pow(2).sum()

    def kept_objective(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(((u @ v - pruned) * mask).pow(2).sum() / kept_norm)

    u0, v0 = rowwise_sparse_svd(pruned, mask, rank)  # the closed form is the starting point
    importance = sparsity_importance(mask).to(torch.float64)
    u, v = weighted_als(pruned, importance, u0, v0, iterations=200)
    assert kept_objective(u, v) < 1e-9
    # Plain rank-2 SVD spends its rank on the pruned zeros and stays far off on the kept entries.
    left, s, right = torch.linalg.svd(pruned)
    assert kept_objective(left[:, :rank] * s[:rank], right[:rank]) > 1e-2
    assert kept_objective(u0, v0) > kept_objective(u, v)
