"""Methods on the pruned model (LPAF): sparsity-aware factorizations that know which entries were pruned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lowrank.config.base import check
from lowrank.linalg.sparsity import DEFAULT_PRUNED_WEIGHT, rowwise_sparse_svd, sparsity_importance
from lowrank.methods.registry import Solve, register_method

if TYPE_CHECKING:  # annotations only: torch loads on first use (lowrank/lazy.py)
    from torch import Tensor


@dataclass(frozen=True)
class SparseOptions:
    """`factorize.options` of the sparse methods.

    importance: what entries are weighed by: `fisher` (of the pruned model, collected by the factorize_pruned
        stage with the fisher section's settings) or `scores` (the pruning scores).
    pruned_weight: the share of its importance a pruned entry keeps (0: fit the kept entries only).
    """

    importance: Literal["fisher", "scores"] = "fisher"
    pruned_weight: float = DEFAULT_PRUNED_WEIGHT

    def __post_init__(self) -> None:
        check(self.pruned_weight >= 0, "pruned_weight", f"must be >= 0, got {self.pruned_weight}")


@register_method(
    "sparse_svd", importance="sparse", solver="rowwise_sparse_svd", paths=("lpaf",), needs_masks=True, options=SparseOptions,
    summary="sparsity-aware SVD of the pruned matrix, row-wise closed form",
)
def sparse_svd(
    weight: Tensor, rank: int, *, importance: Tensor | None, mask: Tensor, options: SparseOptions, solve: Solve,
) -> tuple[Tensor, Tensor]:
    return rowwise_sparse_svd(weight, mask, rank, importance, pruned_weight=options.pruned_weight)


@register_method(
    "sparse_tfwsvd", importance="sparse", solver=None, paths=("lpaf",), needs_masks=True, options=SparseOptions,
    summary="sparsity-aware and element-wise, on factorize.solver (started from the row-wise closed form)",
)
def sparse_tfwsvd(
    weight: Tensor, rank: int, *, importance: Tensor | None, mask: Tensor, options: SparseOptions, solve: Solve,
) -> tuple[Tensor, Tensor]:
    # The solver's init "fwsvd" on sparsity importance is the row-wise closed form.
    return solve(weight, rank, importance=sparsity_importance(mask, importance, pruned_weight=options.pruned_weight))
