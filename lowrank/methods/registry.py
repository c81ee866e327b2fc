"""The method table: every factorization method declared once, beside its code.

A method turns one weight matrix and a rank into two factors `A (out, rank)`,
`B (rank, in)`. Its entry says what the rest of the system needs to know
without reading its code: which importance it weighs entries by (the stage
loads that artifact), which solver it runs (`None`: the configured
`factorize.solver`), whether it needs pruning masks, which path of the
pipeline accepts it, whether its rank-r factors are the first r of a
larger rank's (a truncated decomposition: the rank search then factorizes each
matrix once, not once per rank), and its options: a frozen dataclass declared
beside its code, filled from `factorize.options` (checked against it when
params.yaml loads) and handed to the function. Config validation, the factorize
stages, the MLflow tags and `lowrank methods` all read this table, so a new
method is one function plus one `@register_method(...)` line (peft's
`register_peft_method`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # annotations only: torch loads on first use (lowrank/lazy.py)
    from torch import Tensor


# What a method weighs by: nothing; the dense model's Fisher or Taylor scores, or its layers' input statistics
# (mean |x| per feature, the Gram matrix X^T X), all artifacts of the fisher stage; or, on the lpaf path,
# the pruned model's importance (the method's `importance` option: its Fisher or the pruning scores).
IMPORTANCE_KINDS = ("none", "fisher", "taylor", "abs_mean", "gram", "sparse")
PATHS = ("factorize", "lpaf")  # the dense fine-tuned model, or the pruned one


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none (`factorize.options` must stay empty)."""


class Solve(Protocol):
    """The configured element-wise solver (`factorize.solver`, its steps and options bound): what the methods
    registered with `solver=None` run; the others never call it."""

    def __call__(self, weight: Tensor, rank: int, *, importance: Tensor | None) -> tuple[Tensor, Tensor]: ...


class MethodFn(Protocol):
    def __call__(
        self, weight: Tensor, rank: int, *, importance: Tensor | None, mask: Tensor | None, options: Any, solve: Solve,
    ) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Method:
    """One row of the table. `fn(weight, rank, *, importance, mask, options, solve)` gets the layer's
    importance and mask (None where the method takes none), an instance of `options` and the configured solver."""

    name: str
    fn: MethodFn
    importance: str
    solver: str | None
    needs_masks: bool
    paths: tuple[str, ...]
    summary: str
    nested: bool | Callable[[Any], bool] = False
    options: type = NoOptions

    def accepts(self, path: str) -> bool:
        return path in self.paths

    def solver_name(self, configured: str) -> str:
        """The solver this method runs, given `factorize.solver`."""
        return self.solver or configured

    def is_nested(self, options: Any) -> bool:
        """Whether, under these options (an instance of `options`), the factors at rank r are the first r of those at any larger rank."""
        return self.nested(options) if callable(self.nested) else self.nested

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.options)]

    def row(self) -> dict[str, Any]:
        """The entry as plain data, for `lowrank methods` and MLflow tags."""
        return {
            "method": self.name, "importance": self.importance, "solver": self.solver or "factorize.solver",
            "needs_masks": self.needs_masks, "paths": list(self.paths),
            "options": {f.name: f.default for f in fields(self.options)}, "summary": self.summary,
        }


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    importance: str,
    solver: str | None,
    paths: tuple[str, ...],
    needs_masks: bool = False,
    summary: str = "",
    nested: bool | Callable[[Any], bool] = False,
    options: type = NoOptions,
) -> Callable[[MethodFn], MethodFn]:
    """Add `fn` to the table under `name`; returns it unchanged, so one function may serve two names.

    `options` is a frozen dataclass whose every field has a default (the method's defaults, written once):
    `factorize.options` overrides them, and `fn` receives the instance.
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"method name must be letters, digits and underscores, got {name!r}")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if importance not in IMPORTANCE_KINDS:
        raise ValueError(f"method {name!r}: importance must be one of {', '.join(IMPORTANCE_KINDS)}, got {importance!r}")
    if not paths or not set(paths) <= set(PATHS):
        raise ValueError(f"method {name!r}: paths must be a non-empty subset of {', '.join(PATHS)}, got {paths!r}")
    if not is_dataclass(options) or not options.__dataclass_params__.frozen:
        raise ValueError(f"method {name!r}: options must be a frozen dataclass, got {options!r}")
    try:
        options()
    except TypeError:
        raise ValueError(f"method {name!r}: every field of {options.__name__} needs a default") from None
    if importance == "sparse" and "importance" not in [f.name for f in fields(options)]:
        # the factorize_pruned stage reads it to decide what to collect: the pruned model's Fisher or the scores
        raise ValueError(f"method {name!r}: a sparse method's options need an `importance` field ('fisher' or 'scores')")

    def decorate(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, importance, solver, needs_masks, tuple(paths), summary, nested, options)
        return fn

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method (tests register toy ones and take them out again)."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The entry called `name`; unknown names list the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})") from None


def method_names(path: str | None = None) -> list[str]:
    """The registered names, in registration order; only those `path` accepts when given."""
    return [m.name for m in METHODS.values() if path is None or m.accepts(path)]
