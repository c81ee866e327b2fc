"""Sparsity-aware factorization weights (LPAF step 3).

A pruned matrix `W * M` is factorized as a weighted low-rank problem. The
weights are an importance (the Fisher information of the pruned model by
default) scaled down on the pruned entries by `pruned_weight`: the factors
fit the kept entries first, and the pruned ones less closely.

Measured on MiniLM / SST-2 (BENCHMARKS.md, LPAF at keep ratio 0.15, Taylor
pruning to density 0.15, scores before fine-tuning): with the pruned entries
at weight 0, the matrix-completion reading of "sparsity-aware", the factors
put arbitrary values where the pruned model has zeros and the model falls to
chance (0.48); the pruning scores as weights do the same (0.51); plain SVD of
the pruned matrix gives 0.62; the pruned model's Fisher with the pruned
entries at 0.3 gives 0.70. The pruned zeros are part of the function the pruned
model learned, so they must still be fit, only less closely.

Weight 0.6 became the default on these runs, pruning to twice the keep ratio
(1 + 1 epochs, seeds 42-44): before fine-tuning it scored 0.727-0.748 on
2,000 training examples against 0.704-0.737 at 0.3 (1.0, seed 42: 0.731);
after mixed-rank fine-tuning it was ahead of 0.3 by 0.7 points on average
there (one seed of three slightly behind) and by 1.3 points on 8,000
examples (three seeds of three). Pruning to the keep ratio itself (the
default density factor), 0.6 and 0.3 tied on SST-2 (seed 42: 0.751 and
0.750), and on MRPC 0.6 scored 0.6 points below 0.3 (seeds 42-43), still
above TFWSVD + ft on both seeds.
"""

from __future__ import annotations

from lowrank.lazy import torch
from lowrank.linalg.solvers import balance

# The share of its importance a pruned entry keeps; the sparse methods' `factorize.options.pruned_weight` defaults to it.
DEFAULT_PRUNED_WEIGHT = 0.6


def sparsity_importance(
    mask: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    pruned_weight: float = DEFAULT_PRUNED_WEIGHT,
    normalize: bool = True,
    floor: float = 1e-6,
) -> torch.Tensor:
    """Element weights `(out, in)` for a weighted low-rank solver on a pruned matrix.

    Kept entries get the importance `base` (1 when None); pruned entries get
    `pruned_weight` times it. Every weight is at least `floor`, so that a row
    or column whose entries all weigh nothing still gives the solver a
    non-singular system (its factors then shrink to zero instead of being
    undefined).

    Args:
        mask: `(out, in)`, True / nonzero where the weight was kept.
        base: `(out, in)` importance (Fisher of the pruned model, or first-order
            pruning scores); its sign is dropped.
        pruned_weight: the share of its importance a pruned entry keeps, >= 0.
        normalize: divide `base` by its mean over the kept entries, so that
            `floor` means the same for any importance scale.
        floor: lower bound of every weight (after normalizing).

    Returns:
        float32 (float64 if `base` is float64) weights, same shape as `mask`.
    """
    if pruned_weight < 0:
        raise ValueError(f"pruned_weight must be >= 0, got {pruned_weight}")
    kept = mask.bool()
    dtype = base.dtype if base is not None and base.dtype == torch.float64 else torch.float32
    if base is None:
        weight = torch.ones(mask.shape, dtype=dtype, device=mask.device)
    else:
        if base.shape != mask.shape:
            raise ValueError(f"importance shape {tuple(base.shape)} differs from mask shape {tuple(mask.shape)}")
        weight = base.detach().abs().to(dtype)
        if normalize and kept.any():
            mean = weight[kept].mean()
            if mean > 0:
                weight = weight / mean
    weight = torch.where(kept, weight, weight * pruned_weight)
    return weight.clamp_min(floor)


def rowwise_sparse_svd(
    weight: torch.Tensor,
    mask: torch.Tensor,
    rank: int,
    importance: torch.Tensor | None = None,
    *,
    pruned_weight: float = DEFAULT_PRUNED_WEIGHT,
    floor: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form sparsity-aware factors `U (out, rank)`, `V (rank, in)` with `U V ~ W * M`.

    FWSVD's trick with sparsity-aware importance: all entries of input column
    j share one weight d_j = sqrt(sum_i importance_ij), so the weighted problem
    becomes an SVD of `W diag(d)`. Columns that pruning emptied get smaller d_j
    and so less of the rank. One SVD, no iterations: the cheap variant and a
    starting point for the element-wise solver.

    Args:
        weight: `(out, in)` weight; multiplied by `mask` here in case it was not yet.
        mask: `(out, in)` kept entries.
        rank: number of factors, 1 <= rank <= min(out, in).
        importance: optional `(out, in)` importance, see `sparsity_importance`.
        pruned_weight: the share of its importance a pruned entry keeps.
        floor: lower bound of d_j relative to max(d), so that V's division stays finite.
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    pruned = weight.detach().to(dtype) * mask.to(dtype)  # (out, in)
    weights = sparsity_importance(mask, importance, pruned_weight=pruned_weight).to(device=weight.device, dtype=dtype)
    d = weights.sum(dim=0).sqrt()  # (in,)
    d = d.clamp_min(floor * float(d.max()) if d.max() > 0 else 1.0)
    left, singular, right_t = torch.linalg.svd(pruned * d, full_matrices=False)  # W diag(d)
    u = left[:, :rank] * singular[:rank]  # (out, rank)
    v = right_t[:rank] / d  # (rank, in)
    u, v = balance(u, v)  # as every registered solver does: factors that fine-tune stably
    return u.to(weight.dtype), v.to(weight.dtype)
