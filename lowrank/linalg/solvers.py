"""Factorizers: a weight matrix and a rank in, two factors `A @ B ~ W` out.

Every solver has the same signature, `(weight, rank, *, importance=None,
**options) -> (A, B)` with `A: (out, rank)` and `B: (rank, in)`, and is one
pure function registered by name, so a new solver is one function plus one
`@register_solver` line. Solvers are the math the methods (lowrank/methods/) run,
named for what they compute, never after a method: the closed forms
`truncated_svd` and `input_weighted_svd` (FWSVD's), and the iterative `als` and
`adam_sgd` that `factorize.solver` picks. Solvers see only tensors: no modules, no I/O, no
logging (progress goes to an optional `callback`).

The weighted solvers minimise, per ALGORITHMS.md section 4,

    J(A, B) = sum_ij I_ij (W_ij - (A B)_ij)^2 + lam (|A|^2 + |B|^2)

`weighted_error` reports the data term as a mean over entries, so numbers
compare across matrix sizes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Protocol

from lowrank.lazy import torch

if TYPE_CHECKING:  # annotations only: torch loads on first use (lowrank/lazy.py)
    from torch import Tensor

# Called with (step, weighted_error) after each iteration of an iterative solver.
Callback = Callable[[int, float], None]


class Solver(Protocol):
    def __call__(
        self, weight: Tensor, rank: int, *, importance: Tensor | None = None, **options: object
    ) -> tuple[Tensor, Tensor]: ...


SOLVERS: dict[str, Solver] = {}



def register_solver(name: str) -> Callable[[Callable[..., tuple[Tensor, Tensor]]], Solver]:
    """Register a factorizer under `name`, wrapped with the checks every solver shares.

    The wrapper validates the inputs, runs the solver in float32 (float64 stays
    float64) on the weight's device, and returns contiguous factors in the
    weight's dtype, so each solver is only its math.
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"solver name must be letters, digits and underscores, got {name!r}")
    if name in SOLVERS:
        raise ValueError(f"solver {name!r} is already registered")

    def decorate(fn: Callable[..., tuple[Tensor, Tensor]]) -> Solver:
        @functools.wraps(fn)
        def solver(
            weight: Tensor, rank: int, *, importance: Tensor | None = None, **options: object
        ) -> tuple[Tensor, Tensor]:
            work, work_importance = _check_inputs(weight, rank, importance)
            a, b = balance(*fn(work, rank, importance=work_importance, **options))
            return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()

        SOLVERS[name] = solver
        return solver

    return decorate


def balance(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The same product `A B`, rescaled so that column k of A and row k of B have equal norms.

    Closed forms put all the scale on one side: FWSVD's `B = V^T diag(d)^-1`
    holds entries near 1/d (d ~ sqrt(Fisher) ~ 1e-5) while `A = U S` holds
    entries near 1e-5. Fine-tuning such factors with Adam, whose steps are
    about `lr` per entry whatever the entry's size, moves A by several times
    its own size in one step and the model collapses (measured: SST-2 + ft
    fell to chance). Balanced factors train like the dense weight.
    """
    a_norms = a.norm(dim=0)  # (rank,)
    b_norms = b.norm(dim=1)  # (rank,)
    ok = (a_norms > 0) & (b_norms > 0)
    scale = torch.where(ok, (b_norms / torch.where(ok, a_norms, 1.0)).sqrt(), 1.0)  # (rank,)
    return a * scale, b / scale[:, None]


def get_solver(name: str) -> Solver:
    """The solver registered as `name`; unknown names list the known ones."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r} (registered: {', '.join(sorted(SOLVERS))})") from None


def solver_options(name: str) -> list[str]:
    """The keyword options solver `name` takes besides the weight, the rank and the importance."""
    import inspect

    parameters = inspect.signature(get_solver(name)).parameters  # functools.wraps: the solver's own
    return [p for p in parameters if p not in ("weight", "rank", "importance")]


def iterative_solvers() -> list[str]:
    """The solvers that iterate (they take `steps`): what `factorize.solver` may name."""
    return [name for name in SOLVERS if "steps" in solver_options(name)]


def weighted_error(weight: Tensor, a: Tensor, b: Tensor, importance: Tensor | None = None) -> float:
    """Mean over entries of `I * (W - A B)^2`; the plain mean squared error without `importance`."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # float64 stays exact; half types widen
    residual = weight.to(dtype) - a.to(dtype) @ b.to(dtype)  # (out, in)
    squared = residual.square()
    if importance is not None:
        squared = squared * importance.to(dtype)
    return squared.mean().item()


def _check_inputs(weight: Tensor, rank: int, importance: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not torch.is_tensor(weight) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight: expected a 2-D floating-point tensor (out, in), got {_describe(weight)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight: contains NaN or infinite values")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank: must be an integer in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight, got {rank!r}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    work = weight.to(dtype)
    if importance is None:
        return work, None
    if not torch.is_tensor(importance) or importance.shape != weight.shape:
        raise ValueError(f"importance: expected shape {tuple(weight.shape)} like the weight, got {_describe(importance)}")
    work_importance = importance.to(device=weight.device, dtype=dtype)
    if not torch.isfinite(work_importance).all():
        raise ValueError("importance: contains NaN or infinite values")
    if (work_importance < 0).any():
        raise ValueError("importance: must be non-negative")
    if not (work_importance > 0).any():
        raise ValueError("importance: is zero everywhere, so every factorization is equally good")
    return work, work_importance


def _describe(value: object) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


# --------------------------------------------------------------------------- closed forms


def column_weights(importance: Tensor, floor: float = 1e-3) -> Tensor:
    """FWSVD's per-input-feature weights `d_j = sqrt(mean_i I_ij)`, floored at `floor * mean(d)`.

    The mean (not the papers' sum) keeps `||(W - W') diag(d)||^2` in the units
    of `sum_ij I_ij (W - W')_ij^2`, so errors of differently shaped layers
    compare; the factorization itself does not change. The floor keeps
    `diag(d)^-1` finite for inputs the task never uses.
    """
    d = importance.mean(dim=0).sqrt()  # (in,)
    return d.clamp_min(floor * d.mean().item())


def svd_parts(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """`U (out, rank)`, `S (rank,)`, `V^T (rank, in)` of the truncated SVD."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]  # (out, rank), (rank,), (rank, in)


def fwsvd_parts(weight: Tensor, importance: Tensor | None, rank: int, floor: float) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD parts of `W diag(d)`, with `diag(d)^-1` folded into `V^T` (FWSVD)."""
    """`U_r, S_r, V_r^T diag(d)^-1` from `svd(W diag(d))`; plain SVD parts without importance."""
    if importance is None:
        return svd_parts(weight, rank)
    d = column_weights(importance, floor)  # (in,)
    u, s, vh = svd_parts(weight * d, rank)
    return u, s, vh / d


@register_solver("truncated_svd")
def truncated_svd(weight: Tensor, rank: int, *, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Truncated SVD, `A = U_r S_r`, `B = V_r^T`; ignores `importance` (the unweighted baseline)."""
    u, s, vh = svd_parts(weight, rank)
    return u * s, vh


@register_solver("input_weighted_svd")
def input_weighted_svd(weight: Tensor, rank: int, *, importance: Tensor | None = None, floor: float = 1e-3) -> tuple[Tensor, Tensor]:
    """FWSVD (Hsu et al. 2022): SVD of `W diag(d)`, then undo `diag(d)` on `B`.

    Exact minimiser of the weighted error when the importance is the same down
    each column (row-wise in the papers' notation); element-wise importance is
    first averaged down columns. Plain SVD without `importance`.
    """
    u, s, vh = fwsvd_parts(weight, importance, rank, floor)
    return u * s, vh
