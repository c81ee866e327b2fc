"""The SVD-risk metric (TFWSVD, Hua et al. 2022, Eq. 13): which matrices plain SVD will hurt most.

    phi(W) = Var( I_W / max(||I_W||_p, eps) )

the variance of a weight's Fisher matrix once normalised. Plain SVD treats
every entry alike; when the importance is concentrated on a few entries, the
entries SVD sacrifices are more likely to be the ones the task needs, so a
larger phi should predict a larger score drop. The paper gives no threshold:
`rank_agreement` checks on our own runs whether phi orders the matrices like
their measured SVD-only drops.

For p = 2 and the whole matrix normalised, phi = (1 - mean(I)^2 / mean(I^2)) / N
over N entries: it shrinks as 1/N, so a 384x1536 matrix scores four times lower
than an equally concentrated 384x384 one. `size_invariant=True` multiplies by N
and leaves the concentration alone (0 for uniform importance, towards 1 when a
single entry holds it all), which is the fair way to compare different shapes.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor


def svd_risk(
    importance: Tensor,
    p: float = 2.0,
    dim: int | None = None,
    eps: float = 1e-12,
    size_invariant: bool = False,
) -> float:
    """phi of one weight's importance (element-wise Fisher, `(out, in)`).

    Args:
        importance: non-negative importance of each weight entry.
        p: order of the norm that normalises it.
        dim: None normalises the whole matrix at once (the paper's `||I_W||_p`);
            an int normalises each slice along that dimension, as
            `torch.nn.functional.normalize(I, p, dim)` would.
        eps: lower bound of the norm, so an all-zero importance gives 0.
        size_invariant: multiply by the number of entries each norm runs
            over, so that matrices of different shapes compare.

    Returns:
        The population variance (divisor N) of the normalised entries.
    """
    if not isinstance(importance, Tensor) or importance.dim() < 1 or importance.numel() < 1:
        raise ValueError(f"importance: expected a non-empty tensor, got {importance!r}")
    if not p > 0:
        raise ValueError(f"p: must be positive, got {p!r}")
    values = importance.detach().double()
    if not torch.isfinite(values).all():
        raise ValueError("importance: contains NaN or infinite values")
    if dim is None:
        norm = torch.linalg.vector_norm(values, ord=p)
        length = values.numel()
    else:
        norm = torch.linalg.vector_norm(values, ord=p, dim=dim, keepdim=True)
        length = values.shape[dim]
    normalized = values / norm.clamp_min(eps)
    risk = normalized.var(correction=0).item()
    return risk * length if size_invariant else risk


def svd_risks(importances: Mapping[str, Tensor], **options: object) -> dict[str, float]:
    """phi per matrix, by name; `options` as in `svd_risk`."""
    return {name: svd_risk(importance, **options) for name, importance in importances.items()}


def rank_agreement(risks: Mapping[str, float], drops: Mapping[str, float]) -> float:
    """Spearman correlation between phi and the measured score drop of each matrix.

    1 means phi orders the matrices exactly as SVD hurts them; ties get their
    average rank. NaN when either side is constant (no order to agree with).

    Args:
        risks: phi per matrix name.
        drops: score drop when only that matrix is compressed with plain SVD,
            by the same names.
    """
    if set(risks) != set(drops):
        raise ValueError(f"drops: must name the same matrices as risks; differ in {sorted(set(risks) ^ set(drops))[:5]}")
    if len(risks) < 2:
        raise ValueError(f"risks: need at least two matrices to compare orders, got {len(risks)}")
    names = sorted(risks)
    x = _average_ranks([risks[name] for name in names])
    y = _average_ranks([drops[name] for name in names])
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt((x.square().sum() * y.square().sum()).item())
    return (x * y).sum().item() / denominator if denominator > 0 else math.nan


def _average_ranks(values: list[float]) -> Tensor:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = torch.empty(len(values), dtype=torch.float64)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2
        start = stop + 1
    return ranks
