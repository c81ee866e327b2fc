"""Methods that weigh by what the layer's input looks like: ASVD and SVD-LLM, the ones users pick instead.

Both scale W's input side before a truncated SVD and undo the scaling on the right factor, so the
truncation discards what the *outputs* need least rather than what the weights hold least:
- ASVD (Yuan et al. 2023): W diag(s), s_j = mean|x_j|^alpha;
- SVD-LLM (Wang et al. 2024): W S with S the Cholesky factor of the input's second moment X^T X, which
  makes the truncation the minimiser of the layer's output error ||(W - AB) X^T||_F.
Their statistics come from the fisher stage's pass (lowrank.train.activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowrank.config.base import check
from lowrank.lazy import torch
from lowrank.linalg.solvers import get_solver
from lowrank.methods.registry import Solve, register_method

if TYPE_CHECKING:  # annotations only: torch loads on first use (lowrank/lazy.py)
    from torch import Tensor


@dataclass(frozen=True)
class AsvdOptions:
    """`factorize.options` of asvd. alpha: input feature j is scaled by mean|x_j|^alpha (0: plain SVD; the paper's 0.5)."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        check(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")


@register_method(
    "asvd", importance="abs_mean", solver="truncated_svd", paths=("factorize",), nested=True, options=AsvdOptions,
    summary="activation-aware SVD (Yuan et al. 2023): SVD of W diag(mean|x|^alpha), alpha = factorize.options.alpha",
)
def asvd(
    weight: Tensor, rank: int, *, importance: Tensor | None, mask: None, options: AsvdOptions, solve: Solve,
) -> tuple[Tensor, Tensor]:
    if importance is None:
        raise ValueError("asvd needs each layer's mean absolute input (the fisher stage's abs_mean)")
    scale = importance.to(weight.device, torch.float64)
    scale = scale.clamp_min(scale.max() * 1e-6).pow(options.alpha)  # a feature never active would divide by zero
    a, b = get_solver("truncated_svd")((weight.double() * scale), rank)
    return a.to(weight.dtype), (b / scale).to(weight.dtype)


def whitening(gram: Tensor, damp: float) -> Tensor:
    """Lower-triangular S with S S^T = gram + damp * mean(diag) * I; the damping grows tenfold until Cholesky succeeds.

    A Gram matrix of fewer tokens than features, or of a feature that is always zero, is singular: SVD-LLM's
    users report the Cholesky failing there. Damping relative to the mean diagonal keeps the scale of the data.
    """
    gram = gram.double()
    level = float(gram.diagonal().mean().clamp_min(1e-12)) * max(damp, 1e-10)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + level * eye)
        if int(info) == 0:
            return factor
        level *= 10
    raise ValueError("whitening: the input's Gram matrix is not positive definite even with heavy damping")


@dataclass(frozen=True)
class SvdLlmOptions:
    """`factorize.options` of svd_llm.

    damp: added to X^T X, times its mean diagonal, before the Cholesky factor (raised tenfold until it succeeds).
    update: refit the left factor by least squares under the undamped X^T X.
    """

    damp: float = 0.01
    update: bool = False

    def __post_init__(self) -> None:
        check(self.damp >= 0, "damp", f"must be >= 0, got {self.damp}")


@register_method(
    "svd_llm", importance="gram", solver="truncated_svd", paths=("factorize",), options=SvdLlmOptions,
    nested=lambda options: not options.update,  # the refit left factor depends on the rank
    summary="truncation-aware whitening (SVD-LLM, Wang et al. 2024): SVD of W S, S the Cholesky factor of X^T X",
)
def svd_llm(
    weight: Tensor, rank: int, *, importance: Tensor | None, mask: None, options: SvdLlmOptions, solve: Solve,
) -> tuple[Tensor, Tensor]:
    if importance is None:
        raise ValueError("svd_llm needs each layer's input Gram matrix (the fisher stage's gram)")
    gram = importance.to(weight.device, torch.float64)
    s = whitening(gram, options.damp)
    w = weight.double()
    a, b = get_solver("truncated_svd")(w @ s, rank)
    b = torch.linalg.solve_triangular(s, b, upper=False, left=False)  # B S^-1
    if options.update:
        # Least squares for A with B fixed, under the undamped second moment: A = W G B^T (B G B^T)^-1.
        inner = b @ gram @ b.T
        inner = inner + 1e-10 * inner.diagonal().mean().clamp_min(1e-12) * torch.eye(inner.shape[0], dtype=inner.dtype, device=inner.device)
        a = torch.linalg.solve(inner, (w @ gram @ b.T).T).T
    return a.to(weight.dtype), b.to(weight.dtype)
