"""The factorized Linear layer: `in -> rank` without bias, then `rank -> out` with the bias.

A plain module rather than a wrapper around the dense layer: compression
replaces layers instead of adapting them, so state-dict keys stay flat
(`...query.down.weight`, `...query.up.weight`) and the saved model holds
only the factors.

transformers' `Conv1D` (GPT-2) is a Linear layer that stores its weight
transposed, `(in, out)`; everything here reads a layer through
`linear_weight`, which gives `(out, in)` for both, so a Conv1D is factorized
into the same FactorizedLinear as a Linear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)  # the layers computing `x W^T + b` that a compression may replace


def out_in(module: nn.Module, tensor: Tensor) -> Tensor:
    """A tensor laid out like `module.weight`, as `(out, in)`: a Conv1D's is transposed (a view, not a copy)."""
    return tensor.T if isinstance(module, Conv1D) else tensor


def linear_weight(module: nn.Module) -> Tensor:
    """The `(out, in)` weight of a Linear or Conv1D layer (a FactorizedLinear gives `A B`), detached."""
    if isinstance(module, FactorizedLinear):
        return (module.up.weight @ module.down.weight).detach()
    if isinstance(module, LINEAR_TYPES):
        return out_in(module, module.weight.detach())
    raise ValueError(f"not a Linear layer (found {type(module).__name__})")


class FactorizedLinear(nn.Module):
    """`y = up(down(x))` with `down.weight = B (rank, in)` and `up.weight = A (out, rank)`, `A B ~ W`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank: must be in [1, {min(in_features, out_features)}], got {rank}")
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    def from_factors(cls, a: Tensor, b: Tensor, bias: Tensor | None = None) -> "FactorizedLinear":
        """A layer computing `x (A B)^T + bias`, on the factors' device and in their dtype."""
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"factors: expected A (out, rank) and B (rank, in), got {tuple(a.shape)} and {tuple(b.shape)}")
        out_features, rank = a.shape
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(b.shape[1], out_features, rank, bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.down.weight.copy_(b)  # (rank, in)
            layer.up.weight.copy_(a)  # (out, rank)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear | Conv1D, rank: int, solver: str = "truncated_svd", importance: Tensor | None = None, **options: object
    ) -> "FactorizedLinear":
        """Factorize a dense layer (Linear or Conv1D, `importance` as `(out, in)`) with a registered solver,
        keeping its bias, device and dtype."""
        from lowrank.linalg.solvers import get_solver

        a, b = get_solver(solver)(linear_weight(linear), rank, importance=importance, **options)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_factors(a.to(linear.weight), b.to(linear.weight), bias)

    def to_dense(self) -> nn.Linear:
        """The equivalent dense layer (`W = A B`), e.g. to compare or to undo a compression."""
        weight = self.up.weight @ self.down.weight  # (out, in)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.up.bias is not None}"
