"""`factorize.allocation: search`: per-layer ranks chosen by measuring, not by a proxy.

For each targeted matrix and each rank on a coarse grid, the increase of the task loss on a few calibration
batches when only that matrix is replaced by its factors at that rank (by the chosen method); between grid
points the increase is interpolated. Then the ranks that minimise the summed increase at exactly the uniform
allocation's parameter count (so the comparison with uniform ranks is at equal size) come from an integer
program: one binary per (matrix, rank), one rank per matrix, the parameters summing to the budget, solved by
scipy's `milp` (HiGHS). The uniform ranks are always a feasible answer, so the search can only predict
a smaller increase than they have.

Most of the search's time is forward passes. Changing one matrix leaves every block before it as it was, so
the blocks' outputs on the calibration batches are recorded once (`BlockReplay`) and replayed: a measurement
runs the embeddings and only the blocks from the changed one on.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lowrank.linalg.ranks import break_even_rank
from lowrank.modules.layers import out_in

Shape = tuple[int, int]
Factorize = Callable[[str, int], tuple[Tensor, Tensor]]


def candidate_ranks(shape: Shape, uniform: int, min_share: float, max_share: float, multiple: int) -> list[int]:
    """Every rank (a multiple of `multiple`) from `min_share` to `max_share` times the uniform rank, below break-even."""
    low = max(multiple, math.ceil(min_share * uniform / multiple) * multiple)
    high = min(int(max_share * uniform) // multiple * multiple, (break_even_rank(shape) - 1) // multiple * multiple)
    return list(range(min(low, uniform), max(high, uniform) + 1, multiple))


def grid(candidates: Sequence[int], uniform: int, points: int) -> list[int]:
    """`points` ranks spread over the candidates: both ends, and the uniform rank in place of the inner one nearest to it.

    The ends bound the interpolation (beyond them it would be flat); the uniform rank is where the search starts
    from, so its increase is measured, not interpolated. Fewer candidates than points: all of them.
    """
    spread = [candidates[round(i * (len(candidates) - 1) / max(points - 1, 1))] for i in range(points)]
    inner = range(1, len(spread) - 1)
    if inner and uniform not in spread:
        spread[min(inner, key=lambda i: abs(spread[i] - uniform))] = uniform
    return sorted(set(spread) | {uniform})


def search_grids(uniform: Mapping[str, int], shapes: Mapping[str, Shape], min_share: float, max_share: float, points: int,
                 multiple: int) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per matrix: every candidate rank, and the ranks of them that are measured."""
    candidates = {n: candidate_ranks(shapes[n], uniform[n], min_share, max_share, multiple) for n in uniform}
    return candidates, {n: grid(candidates[n], uniform[n], points) for n in uniform}


def interpolate(measured: Mapping[int, float], candidates: Sequence[int]) -> np.ndarray:
    """The loss increase at every candidate rank: linear between measured ranks, never rising with the rank."""
    ranks = sorted(measured)
    values = np.interp(candidates, ranks, [measured[r] for r in ranks])
    return np.minimum.accumulate(values)  # a larger rank can always do what a smaller one does


class BlockReplay:
    """The outputs of a model's blocks (the ModuleList that holds most of the target matrices) on the calibration
    batches, recorded in one pass and handed back instead of recomputed for the blocks before a changed matrix."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        lists = [(prefix, m) for prefix, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        held = lambda prefix: sum(n.startswith(prefix + ".") for n in names)  # noqa: E731
        prefix, blocks = max(lists, key=lambda item: held(item[0]), default=("", nn.ModuleList()))
        self.blocks = list(blocks) if held(prefix) else []
        self.prefixes = [f"{prefix}.{i}." for i in range(len(self.blocks))]
        self.outputs: list[list[Any]] = [[] for _ in self.blocks]

    def index(self, name: str) -> int:
        """How many blocks come before the one holding `name` (0 for a matrix outside the blocks: nothing skipped)."""
        return next((i for i, prefix in enumerate(self.prefixes) if name.startswith(prefix)), 0)

    @contextmanager
    def _patched(self, forwards: Mapping[int, Callable[..., Any]]) -> Iterator[None]:
        for i, fn in forwards.items():
            self.blocks[i].forward = fn  # an instance attribute: nn.Module.__call__ finds it before the class's
        try:
            yield
        finally:
            for i in forwards:
                del self.blocks[i].forward

    def record(self) -> Any:
        """Within it, every block's output is kept, in call order."""
        def keep(i: int, forward: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                out = forward(*args, **kwargs)
                self.outputs[i].append(out)
                return out
            return run
        self.outputs = [[] for _ in self.blocks]
        return self._patched({i: keep(i, block.forward) for i, block in enumerate(self.blocks)})

    def replay(self, before: int) -> Any:
        """Within it, the first `before` blocks return what they returned while recording, in the same order."""
        def give(i: int) -> Callable[..., Any]:
            recorded = iter(self.outputs[i])
            return lambda *args, **kwargs: next(recorded)
        return self._patched({i: give(i) for i in range(before)})


@torch.no_grad()
def measure(
    model: nn.Module, names: Sequence[str], grids: Mapping[str, Sequence[int]], factorize: Factorize,
    loss_fn: Callable[[nn.Module], float], replay: bool = True, nested: bool = False,
) -> tuple[float, dict[str, dict[int, float]]]:
    """The base loss, and per matrix and grid rank the loss increase with only that matrix factorized.

    `loss_fn` must run the same batches in the same order at every call (the replay depends on it). `nested`:
    the method's rank-r factors are the first r of a larger rank's, so each matrix is factorized once, at its
    largest grid rank, and truncated.
    """
    modules = dict(model.named_modules())
    blocks = BlockReplay(model, names if replay else [])
    with blocks.record():
        base = loss_fn(model)
    increases: dict[str, dict[int, float]] = {}
    for name in names:
        weight = modules[name].weight
        original = weight.data  # the trial weights take its place, never its storage: `factorize` may read views of it
        increases[name] = {}
        largest = factorize(name, max(grids[name])) if nested else None
        try:
            for rank in grids[name]:
                a, b = factorize(name, rank) if largest is None else (largest[0][:, :rank], largest[1][:rank])
                weight.data = out_in(modules[name], a @ b).to(original.dtype)  # a Conv1D stores (in, out)
                with blocks.replay(blocks.index(name)):
                    increases[name][rank] = loss_fn(model) - base
        finally:
            weight.data = original
    return base, increases


def solve(costs: Mapping[str, Sequence[int]], losses: Mapping[str, np.ndarray], ranks: Mapping[str, Sequence[int]], budget: int) -> dict[str, int]:
    """One rank per matrix, parameters summing to exactly `budget`, the least summed loss increase (scipy milp, HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(costs)
    sizes = [len(costs[n]) for n in names]
    c = np.concatenate([losses[n] for n in names])
    one_each = np.zeros((len(names), c.size))
    start = 0
    for row, size in enumerate(sizes):
        one_each[row, start:start + size] = 1
        start += size
    spend = np.concatenate([np.asarray(costs[n], dtype=float) for n in names])[None, :]
    result = milp(
        c, integrality=np.ones(c.size), bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(spend, budget, budget)],
        options={"time_limit": 120},
    )
    if result.x is None:
        raise ValueError(f"allocation search: no ranks spend exactly {budget} parameters ({result.message})")
    chosen, start = {}, 0
    for name, size in zip(names, sizes):
        chosen[name] = ranks[name][int(np.argmax(result.x[start:start + size]))]
        start += size
    return chosen


def search_ranks(
    model: nn.Module, uniform: Mapping[str, int | None], shapes: Mapping[str, Shape], factorize: Factorize,
    loss_fn: Callable[[nn.Module], float], *, min_share: float, max_share: float, points: int, multiple: int,
    nested: bool = False,
) -> tuple[dict[str, int | None], dict[str, float]]:
    """Ranks at the uniform allocation's parameter count that minimise the measured loss increase, and what it cost.

    Layers the uniform allocation leaves dense stay dense. `nested`: as `measure`'s.
    """
    names = [n for n, r in uniform.items() if r is not None]
    candidates, grids = search_grids({n: uniform[n] for n in names}, shapes, min_share, max_share, points, multiple)
    started = time.perf_counter()
    base, measured = measure(model, names, grids, factorize, loss_fn, nested=nested)
    measured_seconds = time.perf_counter() - started
    losses = {n: interpolate(measured[n], candidates[n]) for n in names}
    costs = {n: [r * sum(shapes[n]) for r in candidates[n]] for n in names}
    budget = sum(uniform[n] * sum(shapes[n]) for n in names)
    started = time.perf_counter()
    chosen = solve(costs, losses, candidates, budget)
    solve_seconds = time.perf_counter() - started
    at = lambda ranks: float(sum(losses[n][candidates[n].index(ranks[n])] for n in names))  # noqa: E731
    report = {
        "search_base_loss": base, "search_evaluations": sum(len(g) for g in grids.values()),
        "search_measure_seconds": measured_seconds, "search_solve_seconds": solve_seconds,
        "search_increase_uniform": at(uniform), "search_increase_chosen": at(chosen),
    }
    if report["search_increase_chosen"] < 0:  # on STS-B with 32 examples this preceded a collapse (BENCHMARKS.md section 3)
        warnings.warn(
            f"allocation search: the predicted loss rise at the chosen ranks is below zero ({report['search_increase_chosen']:.3g}): "
            "some matrices factorized alone lowered the calibration loss, so the sum that chose the ranks is noise; "
            "raise factorize.search_samples or keep allocation: uniform", stacklevel=2)
    return {**dict(uniform), **chosen}, report
