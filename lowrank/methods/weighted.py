"""Methods on the dense fine-tuned model: plain SVD, FWSVD, and the element-wise weighted solvers (TFWSVD, TVD)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lowrank.linalg.solvers import get_solver
from lowrank.methods.registry import register_method

if TYPE_CHECKING:  # annotations only: torch loads on first use (lowrank/lazy.py)
    from torch import Tensor


@register_method(
    "svd", importance="none", solver="svd", paths=("factorize", "lpaf"), nested=True,
    summary="truncated SVD, the unweighted baseline (on the lpaf path: of the pruned matrix, the ablation)",
)
def svd(weight: Tensor, rank: int, **_: Any) -> tuple[Tensor, Tensor]:
    return get_solver("svd")(weight, rank)


@register_method(
    "fwsvd", importance="fisher", solver="fwsvd", paths=("factorize",), nested=True,
    summary="Fisher-weighted SVD (Hsu et al. 2022): one SVD of W diag(d), d from the Fisher summed per input feature",
)
def fwsvd(weight: Tensor, rank: int, *, importance: Tensor | None, **_: Any) -> tuple[Tensor, Tensor]:
    return get_solver("fwsvd")(weight, rank, importance=importance)


def elementwise(
    weight: Tensor, rank: int, *, importance: Tensor | None, solver: str = "als", solver_steps: int = 10,
    solver_options: dict[str, Any] | None = None, **_: Any,
) -> tuple[Tensor, Tensor]:
    """min sum_ij I_ij (W - AB)_ij^2 on the configured element-wise solver (ALGORITHMS.md section 4)."""
    return get_solver(solver)(weight, rank, importance=importance, steps=solver_steps, **dict(solver_options or {}))


register_method(
    "tfwsvd", importance="fisher", solver=None, paths=("factorize",),
    summary="element-wise Fisher-weighted low rank (Hua et al. 2022), solved by factorize.solver",
)(elementwise)
register_method(
    "tvd", importance="taylor", solver=None, paths=("factorize",),
    summary="the same solver with Taylor importance |dL/dw * w|",
)(elementwise)
