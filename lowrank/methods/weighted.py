"""Methods on the dense fine-tuned model: plain SVD, FWSVD, and the element-wise weighted solvers (TFWSVD, TVD).

None of them has options: the element-wise ones run the configured solver (`factorize.solver`, `solver_steps`,
`solver_options`), which the caller binds into `solve`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowrank.linalg.solvers import get_solver
from lowrank.methods.registry import NoOptions, Solve, register_method

if TYPE_CHECKING:  # annotations only: torch loads on first use (lowrank/lazy.py)
    from torch import Tensor


@register_method(
    "svd", importance="none", solver="truncated_svd", paths=("factorize", "lpaf"), nested=True,
    summary="truncated SVD, the unweighted baseline (on the lpaf path: of the pruned matrix, the ablation)",
)
def svd(weight: Tensor, rank: int, *, importance: None, mask: Tensor | None, options: NoOptions, solve: Solve) -> tuple[Tensor, Tensor]:
    # mask: on the lpaf path the weight is already W * M, and plain SVD ignores which entries were pruned
    return get_solver("truncated_svd")(weight, rank)


@register_method(
    "fwsvd", importance="fisher", solver="input_weighted_svd", paths=("factorize",), nested=True,
    summary="Fisher-weighted SVD (Hsu et al. 2022): one SVD of W diag(d), d from the Fisher summed per input feature",
)
def fwsvd(weight: Tensor, rank: int, *, importance: Tensor | None, mask: None, options: NoOptions, solve: Solve) -> tuple[Tensor, Tensor]:
    return get_solver("input_weighted_svd")(weight, rank, importance=importance)


def elementwise(
    weight: Tensor, rank: int, *, importance: Tensor | None, mask: None, options: NoOptions, solve: Solve,
) -> tuple[Tensor, Tensor]:
    """min sum_ij I_ij (W - AB)_ij^2 on the configured element-wise solver (ALGORITHMS.md section 4)."""
    return solve(weight, rank, importance=importance)


register_method(
    "tfwsvd", importance="fisher", solver=None, paths=("factorize",),
    summary="element-wise Fisher-weighted low rank (Hua et al. 2022), solved by factorize.solver",
)(elementwise)
register_method(
    "tvd", importance="taylor", solver=None, paths=("factorize",),
    summary="the same solver with Taylor importance |dL/dw * w|",
)(elementwise)
