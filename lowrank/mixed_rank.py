"""Mixed-rank fine-tuning (LPAF step 4): low-rank factors trained beside their sparse matrix.

Freshly factorized layers are a poor fit at first, and fine-tuning all of them
at once starts from a badly damaged network. Each compressed layer therefore
keeps its sparse full-rank (pruned) matrix for a while and, at every step,
takes its low-rank path only with probability p(t), rising from p0 to 1 (in
the spirit of progressive module replacing): the factors learn while their
neighbours still behave like the pruned network. After the ramp only the
factors are used; `finalize` then drops the sparse matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import TrainHook
from .layers import FactorizedLinear
from .surgery import replace_modules


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


def low_rank_probability(step: int, total_steps: int, p0: float, ramp_share: float) -> float:
    """Probability that a layer takes its low-rank path at `step`.

    Linear from `p0` at step 0 to 1 at `ramp_share * total_steps`, then 1.
    """
    if not 0 <= p0 <= 1:
        raise ValueError(f"p0 must be in [0, 1], got {p0}")
    if not 0 <= ramp_share <= 1:
        raise ValueError(f"ramp_share must be in [0, 1], got {ramp_share}")
    ramp_steps = ramp_share * total_steps
    if ramp_steps <= 0 or step >= ramp_steps:
        return 1.0
    return p0 + (1.0 - p0) * max(step, 0) / ramp_steps


@dataclass(frozen=True)
class MixedRankOptions:
    """The ramp of mixed-rank fine-tuning.

    p0: low-rank probability at the first step, in [0, 1].
    ramp_share: share of the training steps over which it rises to 1, in [0, 1].
    seed: seeds the path draws, so that a rerun takes the same paths.
    """

    p0: float = 0.5
    ramp_share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.p0 <= 1:
            raise ValueError(f"p0 must be in [0, 1], got {self.p0}")
        if not 0 <= self.ramp_share <= 1:
            raise ValueError(f"ramp_share must be in [0, 1], got {self.ramp_share}")


def mixed_rank_layers(model: nn.Module) -> dict[str, MixedRankLinear]:
    """The model's MixedRankLinear layers by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MixedRankLinear)}


class MixedRankScheduler(TrainHook):
    """Before each forward, draws for every MixedRankLinear whether it takes the low-rank path.

    Draws come from a private CPU generator, so they neither consume nor
    depend on the global RNG that dropout and data shuffling use.
    """

    def __init__(self, options: MixedRankOptions) -> None:
        self.options = options
        self.total_steps = 0
        self.probability = options.p0
        self.low_rank_share = 1.0
        self._generator = torch.Generator().manual_seed(options.seed)
        self._layers: list[MixedRankLinear] = []

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.total_steps = total_steps
        self._layers = list(mixed_rank_layers(model).values())
        if not self._layers:
            raise ValueError("MixedRankScheduler found no MixedRankLinear in the model: call to_mixed_rank first")

    def before_forward(self, model: nn.Module, step: int) -> None:
        o = self.options
        self.probability = low_rank_probability(step, self.total_steps, o.p0, o.ramp_share)
        draws = torch.rand(len(self._layers), generator=self._generator)
        for layer, draw in zip(self._layers, draws.tolist()):
            layer.use_low_rank = self.probability >= 1.0 or draw < self.probability
        self.low_rank_share = sum(layer.use_low_rank for layer in self._layers) / len(self._layers)

    def on_train_end(self, model: nn.Module) -> None:
        for layer in self._layers:
            layer.use_low_rank = True

    def metrics(self) -> dict[str, float]:
        return {"p_low_rank": self.probability, "low_rank_share": self.low_rank_share}


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
