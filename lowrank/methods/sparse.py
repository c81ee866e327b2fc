"""Methods on the pruned model (LPAF): sparsity-aware factorizations that know which entries were pruned."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lowrank.linalg.solvers import get_solver
from lowrank.linalg.sparsity import DEFAULT_PRUNED_WEIGHT, rowwise_sparse_svd, sparsity_importance
from lowrank.methods.registry import register_method

if TYPE_CHECKING:  # annotations only: torch loads on first use (lowrank/lazy.py)
    from torch import Tensor


@register_method(
    "sparse_svd", importance="sparse", solver="sparse_svd", paths=("lpaf",), needs_masks=True,
    summary="sparsity-aware SVD of the pruned matrix, row-wise closed form",
)
def sparse_svd(
    weight: Tensor, rank: int, *, importance: Tensor | None, mask: Tensor, pruned_weight: float = DEFAULT_PRUNED_WEIGHT,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    return rowwise_sparse_svd(weight, mask, rank, importance, pruned_weight=pruned_weight)


@register_method(
    "sparse_tfwsvd", importance="sparse", solver=None, paths=("lpaf",), needs_masks=True,
    summary="sparsity-aware and element-wise, on factorize.solver (started from the row-wise closed form)",
)
def sparse_tfwsvd(
    weight: Tensor, rank: int, *, importance: Tensor | None, mask: Tensor, pruned_weight: float = DEFAULT_PRUNED_WEIGHT,
    solver: str = "als", solver_steps: int = 10, solver_options: dict[str, Any] | None = None, **_: Any,
) -> tuple[Tensor, Tensor]:
    # The solver's init "fwsvd" on sparsity importance is the row-wise closed form.
    weights = sparsity_importance(mask, importance, pruned_weight=pruned_weight)
    return get_solver(solver)(weight, rank, importance=weights, steps=solver_steps, **dict(solver_options or {}))
