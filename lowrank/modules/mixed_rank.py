"""Mixed-rank fine-tuning (LPAF step 4): low-rank factors trained beside their sparse matrix.

Freshly factorized layers are a poor fit at first, and fine-tuning all of them
at once starts from a badly damaged network. Each compressed layer therefore
keeps its sparse full-rank (pruned) matrix for a while and, at every step,
takes its low-rank path only with probability p(t), rising from p0 to 1 (in
the spirit of progressive module replacing): the factors learn while their
neighbours still behave like the pruned network. After the ramp only the
factors are used; `finalize` then drops the sparse matrices. The draws are
made by `lowrank.train.mixed_rank.MixedRankScheduler`.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.modules.layers import FactorizedLinear
from lowrank.modules.surgery import replace_modules


class MixedRankLinear(nn.Module):
    """A Linear layer with two paths: sparse full-rank `W * M` and low-rank `U V`, sharing one bias.

    The bias lives in `low_rank.up.bias`, so the low-rank path is a complete
    FactorizedLinear that `finalize` can keep as it is. Pruned entries stay
    zero: the sparse path multiplies by the fixed mask, so they get no
    gradient either. Eval mode always takes the low-rank path, so evaluations
    measure the model that will be saved.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, low_rank: FactorizedLinear, train_sparse: bool = False):
        super().__init__()
        if weight.shape != mask.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        self.weight = nn.Parameter((weight.detach() * mask).clone(), requires_grad=train_sparse)  # (out, in)
        self.register_buffer("mask", mask)  # (out, in)
        self.low_rank = low_rank
        self.use_low_rank = True  # set per step by MixedRankScheduler

    @property
    def bias(self) -> torch.Tensor | None:
        return self.low_rank.up.bias

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pruned full-rank layer: `x (W * M)^T + b`."""
        return F.linear(x, self.weight * self.mask, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_low_rank or not self.training:
            return self.low_rank(x)
        return self.sparse_forward(x)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        density = float(self.mask.float().mean())
        return f"in_features={in_features}, out_features={out_features}, density={density:.3f}, use_low_rank={self.use_low_rank}"


def mixed_rank_layers(model: nn.Module) -> dict[str, MixedRankLinear]:
    """The model's MixedRankLinear layers by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MixedRankLinear)}


def to_mixed_rank(
    model: nn.Module,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    masks: Mapping[str, torch.Tensor],
    *,
    train_sparse: bool = False,
) -> list[str]:
    """Replace the named Linear layers by MixedRankLinear in place; returns the replaced names.

    Args:
        factors: `(U (out, rank), V (rank, in))` by layer name, e.g. from sparsity-aware SVD.
        masks: `(out, in)` pruning masks by layer name; the sparse path keeps `W * mask`.
        train_sparse: also train the sparse matrices while they are in use. Off by
            default: as in progressive module replacing, the frozen pruned layers
            are the stable surroundings the new factors learn to fit into.
    """
    missing = set(factors) - set(masks)
    if missing:
        raise ValueError(f"no mask for {sorted(missing)}")

    def make(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear (found {type(module).__name__})")
        u, v = factors[name]
        like = module.weight
        bias = None if module.bias is None else module.bias.detach().clone()
        low_rank = FactorizedLinear.from_factors(u.to(like), v.to(like), bias)
        return MixedRankLinear(module.weight, masks[name], low_rank, train_sparse)

    return replace_modules(model, list(factors), make)


def finalize(model: nn.Module) -> list[str]:
    """Replace each MixedRankLinear by its FactorizedLinear, dropping the sparse matrices."""
    layers = mixed_rank_layers(model)
    return replace_modules(model, list(layers), lambda name, module: module.low_rank)
