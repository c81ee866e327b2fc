"""The element-wise weighted solvers: ALS (the default) and the paper's Adam-then-SGD.

Both minimise, per ALGORITHMS.md section 4,

    J(A, B) = sum_ij I_ij (W_ij - (A B)_ij)^2 + lam (|A|^2 + |B|^2)

from balanced SVD-type factors, and register themselves in the solver table of
`lowrank.linalg.solvers` (the package imports this module, so the table is full
whenever `lowrank.linalg` is used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lowrank.lazy import torch
from lowrank.linalg.solvers import Callback, fwsvd_parts, register_solver, svd_parts

if TYPE_CHECKING:  # annotations only: torch loads on first use (lowrank/lazy.py)
    from torch import Tensor

# Largest temporary the ALS Gram matrices may take, in elements (64 MiB of float32).
CHUNK_ELEMENTS = 1 << 24
# Largest table of pairwise products of factor rows, `rank (rank + 1) / 2` by the width, in elements (1 GiB of
# float32): past it the pairs are made a slice at a time for every chunk of rows (a 7B FFN matrix at rank 1300
# would need 40 GiB at once). Below it nothing changes, so small models get the same bits as before.
PAIR_ELEMENTS = 1 << 28

@dataclass(frozen=True)
class _Problem:
    """The weighted problem rescaled so that `W` has RMS 1 and `I` mean 1.

    The minimiser does not change (up to the scale undone in `factors`), and
    `lam` and the learning rates mean the same on every layer, whatever the
    magnitude of its weights and of its Fisher information.
    """

    target: Tensor  # (out, in)
    weights: Tensor  # (out, in)
    scale: float
    importance_mean: float

    @classmethod
    def build(cls, weight: Tensor, importance: Tensor | None) -> "_Problem":
        scale = weight.square().mean().sqrt().item() or 1.0
        if importance is None:
            return cls(weight / scale, torch.ones_like(weight), scale, 1.0)
        mean = importance.mean().item()
        return cls(weight / scale, importance / mean, scale, mean)

    def error(self, data_term: float) -> float:
        """A normalised data term in `weighted_error`'s units."""
        return data_term * self.scale**2 * self.importance_mean / self.target.numel()

    def factors(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        root = math.sqrt(self.scale)
        return u * root, v * root


def _evaluate(problem: _Problem, u: Tensor, v: Tensor, lam: float) -> tuple[float, float, Tensor]:
    """(data term, full objective, I * residual): one product `A B` serves the value and the gradients."""
    residual = problem.target - u @ v  # (out, in)
    weighted = problem.weights * residual
    data = (weighted * residual).sum().item()
    return data, data + lam * (u.square().sum() + v.square().sum()).item(), weighted


def _balanced_start(problem: _Problem, rank: int, init: str, floor: float) -> tuple[Tensor, Tensor]:
    """SVD-type factors with `sqrt(S)` on each side, so neither factor dwarfs the other."""
    if init == "fwsvd":
        u, s, vh = fwsvd_parts(problem.target, problem.weights, rank, floor)
    else:
        u, s, vh = svd_parts(problem.target, rank)
    root = s.sqrt()
    return u * root, root[:, None] * vh  # (out, rank), (rank, in)


def _check_options(steps: int, lam: float, init: str) -> None:
    if init not in ("fwsvd", "svd"):
        raise ValueError(f"init: must be 'fwsvd' or 'svd', got {init!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: must be a non-negative integer, got {steps!r}")
    if not lam >= 0:
        raise ValueError(f"lam: must be >= 0, got {lam!r}")


def _solve_rows(target: Tensor, weights: Tensor, fixed: Tensor, lam: float) -> Tensor:
    """Each row `x_i` minimising `sum_j w_ij (t_ij - x_i . f_j)^2 + lam |x_i|^2`, with `fixed = F: (rank, n)`.

    Row i solves `(F diag(w_i) F^T + lam) x_i = F (w_i * t_i)`. All the Gram
    matrices come from one product with the pairwise products of F's rows
    (upper triangle only), which is one large matmul instead of a batch of
    small ones and about twice as fast on a CPU. Cholesky, since batched
    `torch.linalg.solve` fails for rank >= ~200 with the CPU build of torch 2.13.
    """
    rows = target.shape[0]
    rank = fixed.shape[0]
    first, second = torch.triu_indices(rank, rank, device=fixed.device)
    whole = first.numel() * fixed.shape[1] <= PAIR_ELEMENTS
    pairs = fixed[first] * fixed[second] if whole else None  # (rank (rank + 1) / 2, n)
    step = max(1, PAIR_ELEMENTS // fixed.shape[1])  # pairs per slice, when they are made a slice at a time
    rhs = (weights * target) @ fixed.T  # (rows, rank)
    solution = torch.empty(rows, rank, dtype=fixed.dtype, device=fixed.device)
    # Sliced pairs are remade for every chunk of rows: larger chunks (up to PAIR_ELEMENTS) make that rare.
    chunk = max(1, (CHUNK_ELEMENTS if whole else PAIR_ELEMENTS) // (rank * rank))
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        gram = torch.empty(stop - start, rank, rank, dtype=fixed.dtype, device=fixed.device)
        if pairs is not None:
            gram[:, second, first] = weights[start:stop] @ pairs.T  # lower triangle is all Cholesky reads
        else:
            for low in range(0, first.numel(), step):
                i, j = first[low:low + step], second[low:low + step]
                gram[:, j, i] = weights[start:stop] @ (fixed[i] * fixed[j]).T
        factor = _cholesky(gram, lam)
        solution[start:stop] = torch.cholesky_solve(rhs[start:stop, :, None], factor).squeeze(-1)
    return solution


def _cholesky(gram: Tensor, lam: float) -> Tensor:
    """Cholesky factors of `gram + lam`, plus a jitter where a Gram matrix is (numerically) singular.

    A row whose importance is zero, or non-zero on fewer than `rank` entries
    (a heavily pruned row), has a singular Gram matrix; the jitter then picks
    the small-norm solution. The first try adds only a few machine epsilons
    (relative), so well-posed rows are solved exactly; only the failures get
    a jitter a thousand times larger.
    """
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1)  # (rows,)
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero Gram matrix: any jitter will do
    jitter = 16 * torch.finfo(gram.dtype).eps * scale
    factor, info = torch.linalg.cholesky_ex(gram + (lam + jitter)[:, None, None] * eye)
    failed = info > 0
    if failed.any():
        retry = gram[failed] + (lam + 1e3 * jitter[failed])[:, None, None] * eye
        factor[failed] = torch.linalg.cholesky_ex(retry)[0]
    return factor


@register_solver("als")
def als(
    weight: Tensor,
    rank: int,
    *,
    importance: Tensor | None = None,
    steps: int = 50,
    lam: float = 0.0,
    tol: float = 1e-5,
    init: Literal["fwsvd", "svd"] = "fwsvd",
    floor: float = 1e-3,
    callback: Callback | None = None,
) -> tuple[Tensor, Tensor]:
    """Alternating weighted least squares for element-wise importance (TFWSVD's objective).

    Each half-step solves every row of `A` (then every column of `B`) exactly,
    so `J` never rises and there is no learning rate to tune. A sweep costs
    about `rank / 3` gradient steps; it stops after `steps` sweeps or when a
    sweep lowers `J` by less than `tol` (relative). `lam` is in the rescaled
    units of `_Problem` (W with RMS 1, I with mean 1).
    """
    _check_options(steps, lam, init)
    problem = _Problem.build(weight, importance)
    u, v = _balanced_start(problem, rank, init, floor)
    previous = _evaluate(problem, u, v, lam)[1]
    for step in range(steps):
        u = _solve_rows(problem.target, problem.weights, v, lam)  # (out, rank)
        v = _solve_rows(problem.target.T, problem.weights.T, u.T, lam).T  # (rank, in)
        data, objective, _ = _evaluate(problem, u, v, lam)
        if callback is not None:
            callback(step, problem.error(data))
        if previous - objective <= tol * previous:
            break
        previous = objective
    return problem.factors(u, v)


@dataclass
class _Adam:
    """Adam's moment estimates for one tensor (Kingma & Ba 2015)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps: int = 0
    first: Tensor | None = None
    second: Tensor | None = None

    def step(self, param: Tensor, grad: Tensor) -> Tensor:
        if self.first is None:
            self.first, self.second = torch.zeros_like(grad), torch.zeros_like(grad)
        self.steps += 1
        beta1, beta2 = self.betas
        self.first.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr * math.sqrt(1 - beta2**self.steps) / (1 - beta1**self.steps)
        denominator = self.second.sqrt().add_(self.eps * math.sqrt(1 - beta2**self.steps))
        return param.addcdiv(self.first, denominator, value=-step_size)


def _spectral_norm(matrix: Tensor) -> float:
    return torch.linalg.matrix_norm(matrix, ord=2).item()


def _gradients(weighted: Tensor, u: Tensor, v: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    grad_u = -2 * weighted @ v.T + 2 * lam * u  # (out, rank)
    grad_v = -2 * u.T @ weighted + 2 * lam * v  # (rank, in)
    return grad_u, grad_v


@register_solver("adam_sgd")
def adam_sgd(
    weight: Tensor,
    rank: int,
    *,
    importance: Tensor | None = None,
    steps: int = 50_000,
    lam: float = 0.0,
    adam_lr: float = 1e-3,
    sgd_lr: float | None = None,
    switch_ratio: float = 1.0,
    init: Literal["fwsvd", "svd"] = "fwsvd",
    floor: float = 1e-3,
    callback: Callback | None = None,
) -> tuple[Tensor, Tensor]:
    """TFWSVD's "Adam_SGD" (Hua et al. 2022): Adam while `J` is above FWSVD's, then plain gradient descent.

    The switch happens once, the first time the data term falls to
    `switch_ratio` times the one FWSVD's closed-form factors reach. So
    `switch_ratio=0` is pure Adam, and `init="fwsvd"` with `switch_ratio=1`
    (FWSVD's factors are already at the threshold) is pure gradient descent;
    `init="svd"` gives the paper's two phases. Gradients are full-matrix (the
    paper does not say how it batches). The descent phase starts at `sgd_lr`,
    or at `1 / (2 ||B||^2 + 2 ||A||^2)` (the step that is stable for uniform
    importance) when None, and halves it whenever a step would raise `J`.
    Learning rates and `lam` are in the rescaled units of `_Problem`.
    """
    _check_options(steps, lam, init)
    if not switch_ratio >= 0:
        raise ValueError(f"switch_ratio: must be >= 0, got {switch_ratio!r}")
    if sgd_lr is not None and not sgd_lr > 0:
        raise ValueError(f"sgd_lr: must be positive or None, got {sgd_lr!r}")
    problem = _Problem.build(weight, importance)
    u, v = _balanced_start(problem, rank, "fwsvd", floor)
    threshold = switch_ratio * _evaluate(problem, u, v, lam)[0]
    if init != "fwsvd":
        u, v = _balanced_start(problem, rank, init, floor)

    data, objective, weighted = _evaluate(problem, u, v, lam)
    grad_u, grad_v = _gradients(weighted, u, v, lam)
    adam = (_Adam(adam_lr), _Adam(adam_lr)) if data > threshold else None
    lr = sgd_lr
    for step in range(steps):
        if adam is not None:
            u, v = adam[0].step(u, grad_u), adam[1].step(v, grad_v)
            data, objective, weighted = _evaluate(problem, u, v, lam)
            grad_u, grad_v = _gradients(weighted, u, v, lam)
            if data <= threshold:
                adam = None
        else:
            if lr is None:
                lr = 0.5 / max(_spectral_norm(u) ** 2 + _spectral_norm(v) ** 2, 1e-12)
            trial_u, trial_v = u - lr * grad_u, v - lr * grad_v
            trial_data, trial_objective, trial_weighted = _evaluate(problem, trial_u, trial_v, lam)
            if trial_objective <= objective:
                u, v, data, objective = trial_u, trial_v, trial_data, trial_objective
                grad_u, grad_v = _gradients(trial_weighted, u, v, lam)
            else:
                lr /= 2
        if callback is not None:
            callback(step, problem.error(data))
    return problem.factors(u, v)
