"""Sparsity-aware factorization: importance weights, the row-wise closed form, and exact recovery."""

from __future__ import annotations

import pytest
import torch

from lowrank.linalg.sparsity import DEFAULT_PRUNED_WEIGHT, rowwise_sparse_svd, sparsity_importance


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


def test_importance_scales_pruned_entries_by_pruned_weight() -> None:
    mask = torch.tensor([[True, False, True], [False, True, True]])
    uniform = sparsity_importance(mask)
    assert torch.equal(uniform, torch.where(mask, 1.0, DEFAULT_PRUNED_WEIGHT))
    assert torch.equal(sparsity_importance(mask, pruned_weight=0.0), torch.where(mask, 1.0, 1e-6))  # the floor
    base = torch.tensor([[2.0, 9.0, -4.0], [5.0, 6.0, 0.0]])
    weighted = sparsity_importance(mask, base, pruned_weight=0.5)
    # Kept |base| 2, 4, 6, 0 have mean 3; pruned entries keep half of theirs; the zero is floored.
    assert torch.allclose(weighted, torch.tensor([[2 / 3, 1.5, 4 / 3], [5 / 6, 2.0, 1e-6]]))
    raw = sparsity_importance(mask, base, pruned_weight=0.1, normalize=False)
    assert torch.allclose(raw, torch.tensor([[2.0, 0.9, 4.0], [0.5, 6.0, 1e-6]]))
    with pytest.raises(ValueError, match="shape"):
        sparsity_importance(mask, base[:, :2])
    with pytest.raises(ValueError, match="pruned_weight"):
        sparsity_importance(mask, pruned_weight=-1.0)


def test_pruned_weight_one_with_uniform_importance_is_plain_svd() -> None:
    weight = low_rank_matrix(12, 10, 6)
    mask = torch.rand(12, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    u, v = rowwise_sparse_svd(weight, mask, rank=3, pruned_weight=1.0)
    left, s, right = torch.linalg.svd(weight * mask)
    assert torch.allclose(u @ v, (left[:, :3] * s[:3]) @ right[:3], atol=1e-10)


def test_rowwise_recovers_exactly_low_rank_matrix_without_pruning() -> None:
    weight = low_rank_matrix(12, 10, 3)
    mask = torch.ones_like(weight, dtype=torch.bool)
    u, v = rowwise_sparse_svd(weight, mask, rank=3)
    assert u.shape == (12, 3) and v.shape == (3, 10)
    assert torch.allclose(u @ v, weight, atol=1e-10)
    scores = torch.rand(12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    u, v = rowwise_sparse_svd(weight, mask, rank=3, importance=scores)  # any column weights keep it exact
    assert torch.allclose(u @ v, weight, atol=1e-10)


def test_rowwise_gives_emptied_columns_little_rank() -> None:
    weight = low_rank_matrix(12, 10, 5).float()
    mask = torch.ones(12, 10, dtype=torch.bool)
    mask[:, :4] = False  # the pruned matrix lives on 6 columns: rank 5 there
    u, v = rowwise_sparse_svd(weight, mask, rank=5, pruned_weight=0.0)
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

    u0, v0 = rowwise_sparse_svd(pruned, mask, rank, pruned_weight=0.0)  # the closed form is the starting point
    importance = sparsity_importance(mask, pruned_weight=0.0).to(torch.float64)
    u, v = weighted_als(pruned, importance, u0, v0, iterations=200)
    assert kept_objective(u, v) < 1e-9
    # Plain rank-2 SVD spends its rank on the pruned zeros and stays far off on the kept entries.
    left, s, right = torch.linalg.svd(pruned)
    assert kept_objective(left[:, :rank] * s[:rank], right[:rank]) > 1e-2
    assert kept_objective(u0, v0) > kept_objective(u, v)
