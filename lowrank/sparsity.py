"""Sparsity-aware factorization weights (LPAF step 3).

A pruned matrix `W * M` is not itself low rank, but the kept entries often
are close to a low-rank matrix; the pruned entries are zero only because
pruning set them so. Plain SVD spends rank reproducing those zeros. Giving the
pruned entries (near) zero weight in a weighted low-rank problem lets the
factors fit the kept entries and fill the pruned ones freely.
"""

from __future__ import annotations

import torch

from .solvers import balance


def sparsity_importance(
    mask: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    pruned_weight: float = 1e-6,
    normalize: bool = True,
) -> torch.Tensor:
    """Element weights `(out, in)` for a weighted low-rank solver on a pruned matrix.

    Kept entries get their first-order importance |score| (1 when `scores` is
    None); pruned entries get `pruned_weight`. It is small but not zero so that
    a row or column whose entries were all pruned still gives the solver a
    non-singular system (its factors then shrink to zero instead of being
    undefined).

    Args:
        mask: `(out, in)`, True / nonzero where the weight was kept.
        scores: `(out, in)` first-order scores (movement or Taylor); their sign is dropped.
        pruned_weight: weight of pruned entries, relative to the kept mean when `normalize`.
        normalize: divide kept weights by their mean, so that `pruned_weight`
            means the same for any score scale, and floor them at
            `pruned_weight` so that a kept entry never counts less than a pruned one.

    Returns:
        float32 (float64 if `scores` is float64) weights, same shape as `mask`.
    """
    if pruned_weight < 0:
        raise ValueError(f"pruned_weight must be >= 0, got {pruned_weight}")
    kept = mask.bool()
    dtype = scores.dtype if scores is not None and scores.dtype == torch.float64 else torch.float32
    if scores is None:
        kept_weight = torch.ones(mask.shape, dtype=dtype, device=mask.device)
    else:
        if scores.shape != mask.shape:
            raise ValueError(f"scores shape {tuple(scores.shape)} differs from mask shape {tuple(mask.shape)}")
        kept_weight = scores.detach().abs().to(dtype)
        if normalize and kept.any():
            mean = kept_weight[kept].mean()
            if mean > 0:
                kept_weight = kept_weight / mean
            kept_weight = kept_weight.clamp_min(pruned_weight)
    return torch.where(kept, kept_weight, torch.full_like(kept_weight, pruned_weight))


def rowwise_sparse_svd(
    weight: torch.Tensor,
    mask: torch.Tensor,
    rank: int,
    scores: torch.Tensor | None = None,
    *,
    floor: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form sparsity-aware factors `U (out, rank)`, `V (rank, in)` with `U V ~ W * M`.

    FWSVD's trick with sparsity-aware importance: all entries of input column
    j share one weight d_j = sqrt(sum_i importance_ij), so the weighted problem
    becomes an SVD of `W diag(d)`. Columns that pruning emptied get small d_j
    and so little of the rank. One SVD, no iterations: the cheap variant and a
    starting point for the element-wise solver.

    Args:
        weight: `(out, in)` weight; multiplied by `mask` here in case it was not yet.
        mask: `(out, in)` kept entries.
        rank: number of factors, 1 <= rank <= min(out, in).
        scores: optional first-order scores, see `sparsity_importance`.
        floor: lower bound of d_j relative to max(d), so that V's division stays finite.
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    pruned = weight.detach().to(dtype) * mask.to(dtype)  # (out, in)
    importance = sparsity_importance(mask, scores).to(device=weight.device, dtype=dtype)  # (out, in)
    d = importance.sum(dim=0).sqrt()  # (in,)
    d = d.clamp_min(floor * float(d.max()) if d.max() > 0 else 1.0)
    left, singular, right_t = torch.linalg.svd(pruned * d, full_matrices=False)  # W diag(d)
    u = left[:, :rank] * singular[:rank]  # (out, rank)
    v = right_t[:rank] / d  # (rank, in)
    u, v = balance(u, v)  # as every registered solver does: factors that fine-tune stably
    return u.to(weight.dtype), v.to(weight.dtype)
