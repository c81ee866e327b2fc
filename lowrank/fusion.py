"""Inference-time fusion of factorized projections that read the same input.

Query, key and value of a block all project the same hidden states. Once
factorized, each starts with a thin `down` product (hidden -> rank); three
thin GEMMs read the input three times and run narrow, inefficient kernels.
Stacking their `down` weights makes that one GEMM of three times the width,
whose output is split between the three `up` products. The arithmetic is
unchanged, so the logits agree with the unfused model to float rounding.

The fused model is for serving and ONNX export, not for saving or training:
`save_compressed` expects the FactorizedLinear layout, which `unfuse_qkv`
restores. One model must not run two forward passes at once (the shared
product is held between the three calls of one attention block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FactorizedLinear

PROJECTIONS = ("query", "key", "value")


class SharedDown(nn.Module):
    """The stacked `down` weights of several FactorizedLinear layers, computed once per input."""

    def __init__(self, layers: list[FactorizedLinear]) -> None:
        super().__init__()
        in_features = {layer.in_features for layer in layers}
        if len(in_features) != 1:
            raise ValueError(f"shared down: layers read inputs of different widths {sorted(in_features)}")
        self.weight = nn.Parameter(torch.cat([layer.down.weight.detach() for layer in layers]))
        self.ranks = [layer.rank for layer in layers]
        self._input: Tensor | None = None
        self._parts: tuple[Tensor, ...] = ()

    def part(self, x: Tensor, index: int) -> Tensor:
        """Member `index`'s down product of `x`; the stacked GEMM runs when `x` is a new tensor."""
        if self._input is not x:
            self._input, self._parts = x, F.linear(x, self.weight).split(self.ranks, dim=-1)
        part = self._parts[index]
        if index == len(self.ranks) - 1:  # the last reader releases the activations
            self._input, self._parts = None, ()
        return part


class SharedDownLinear(nn.Module):
    """One member of a SharedDown group: its slice of the shared product, then its own `up`."""

    def __init__(self, shared: SharedDown, index: int, up: nn.Linear) -> None:
        super().__init__()
        self._shared = [shared]  # a plain list: the group is registered once, on the attention module
        self.index = index
        self.up = up

    @property
    def rank(self) -> int:
        return self._shared[0].ranks[self.index]

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self._shared[0].part(x, self.index))

    def to_factorized(self) -> FactorizedLinear:
        start = sum(self._shared[0].ranks[: self.index])
        down = self._shared[0].weight.detach()[start : start + self.rank]
        bias = None if self.up.bias is None else self.up.bias.detach()
        return FactorizedLinear.from_factors(self.up.weight.detach(), down, bias)


def fuse_qkv(model: nn.Module) -> int:
    """Share one `down` GEMM among each attention module's factorized query, key and value, in place.

    Only modules whose three projections are all FactorizedLinear are fused
    (a dense one stays as it is); returns how many were fused.
    """
    fused = 0
    for module in list(model.modules()):
        layers = [getattr(module, name, None) for name in PROJECTIONS]
        if not all(isinstance(layer, FactorizedLinear) for layer in layers):
            continue
        shared = SharedDown(layers)
        module.shared_qkv_down = shared
        for index, (name, layer) in enumerate(zip(PROJECTIONS, layers)):
            setattr(module, name, SharedDownLinear(shared, index, layer.up))
        fused += 1
    return fused


def unfuse_qkv(model: nn.Module) -> int:
    """Undo `fuse_qkv` in place (e.g. before `save_compressed`); returns how many modules were restored."""
    restored = 0
    for module in list(model.modules()):
        if not isinstance(getattr(module, "shared_qkv_down", None), SharedDown):
            continue
        for name in PROJECTIONS:
            setattr(module, name, getattr(module, name).to_factorized())
        del module.shared_qkv_down
        restored += 1
    return restored
