"""Swapping modules of a model, in exactly one place."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from torch import Tensor, nn

from lowrank.modules.layers import LINEAR_TYPES, FactorizedLinear, linear_weight


def replace_modules(model: nn.Module, names: Sequence[str], make: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace each named submodule by `make(name, module)` in place; returns the names replaced.

    All modules are looked up before the first swap, so `make` never sees a
    half-edited model. The model's config is left alone.
    """
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules or not name]
    if missing:
        raise ValueError(f"no submodule called {missing[0]!r} in {type(model).__name__}")
    found = [(name, modules[name]) for name in names]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, make(name, module))
    return [name for name, _ in found]


def linear_weights(model: nn.Module, names: Sequence[str], purpose: str = "target", *, conv1d: bool = False) -> dict[str, nn.Parameter]:
    """The weight Parameter of each named `nn.Linear`, to train or score in place; errors name the module.

    `conv1d` also takes transformers' Conv1D, whose Parameter is stored `(in, out)`: the caller turns
    what it computes from it into `(out, in)` with `layers.out_in` (pruning and mixed rank do not).
    """
    modules = dict(model.named_modules())
    accepted = LINEAR_TYPES if conv1d else nn.Linear
    weights = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, accepted):
            raise ValueError(f"{purpose} {name!r} is not an nn.Linear (found {type(module).__name__})")
        weights[name] = module.weight
    return weights


def dense_weights(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """The `(out, in)` weight of each named Linear or Conv1D (a factorized one gives `A B`), detached."""
    modules = dict(model.named_modules())
    weights = {}
    for name in names:
        module = modules.get(name)
        try:
            weights[name] = linear_weight(module)
        except ValueError as err:
            raise ValueError(f"{name!r} is {err}") from None
    return weights


def factorize_model(model: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor]]) -> list[str]:
    """Replace each named Linear (or Conv1D) by a FactorizedLinear holding `(A, B)` and the original bias."""

    def make(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, LINEAR_TYPES):
            raise ValueError(f"{name!r} is not an nn.Linear (found {type(module).__name__})")
        a, b = factors[name]
        expected = tuple(linear_weight(module).shape)
        if (a.shape[0], b.shape[1]) != expected:
            raise ValueError(f"{name}: factors give {(a.shape[0], b.shape[1])}, the layer is {expected}")
        bias = None if module.bias is None else module.bias.detach()
        return FactorizedLinear.from_factors(a.to(module.weight), b.to(module.weight), bias)

    return replace_modules(model, list(factors), make)


def densify_(model: nn.Module) -> list[str]:
    """Replace every FactorizedLinear by the dense Linear of its product, in place: the start of a further cut."""
    names = [name for name, module in model.named_modules() if isinstance(module, FactorizedLinear)]
    return replace_modules(model, names, lambda name, module: module.to_dense())
