"""From a keep ratio to one rank per layer.

"Keep ratio" is the number of parameters of the targeted Linear weights after
factorization over the number before (biases are not counted: they are kept
as they are). A rank-`r` factorization of an `(out, in)` weight costs
`r (out + in)` parameters, so it only saves anything below the break-even rank
`out in / (out + in)`; a layer whose rank would reach it stays dense, which is
both cheaper and exact. Ranks here are `int`, and `None` means "stays dense".

Two allocations:

* `uniform`: one rank for every layer, as in the papers (BERT-base at keep
  ratio 0.495 gives their rank 253).
* `fisher`: ranks spread over layers so that the Fisher-weighted error summed
  over all layers is smallest for the budget. With FWSVD's column weights,
  truncating a layer at rank `r` costs exactly the sum of its squared weighted
  singular values past `r` (see `weighted_spectrum`), which approximates the
  increase of the task loss; a greedy pass takes, across all layers, the next
  singular values that remove the most error per parameter.
"""

from __future__ import annotations

import bisect
import heapq
import math
from typing import Literal, Mapping

import torch
from torch import Tensor

from lowrank.linalg.solvers import column_weights

Shape = tuple[int, int]  # (out, in), as in nn.Linear.weight
Allocation = Literal["uniform", "fisher"]


def break_even_rank(shape: Shape) -> int:
    """The smallest rank whose factors hold as many parameters as the dense weight, `ceil(out in / (out + in))`."""
    out_features, in_features = _check_shape(shape, "shape")
    return math.ceil(out_features * in_features / (out_features + in_features))


def layer_params(shape: Shape, rank: int | None) -> int:
    """Parameters of one weight at `rank` (None: dense); ranks at or past break-even count as dense."""
    out_features, in_features = _check_shape(shape, "shape")
    if rank is None or rank >= break_even_rank(shape):
        return out_features * in_features
    return rank * (out_features + in_features)


def count_params(shapes: Mapping[str, Shape], ranks: Mapping[str, int | None]) -> int:
    """Parameters of all targeted weights under `ranks`; a layer missing from `ranks` stays dense."""
    return sum(layer_params(shape, ranks.get(name)) for name, shape in shapes.items())


def kept_ratio(shapes: Mapping[str, Shape], ranks: Mapping[str, int | None]) -> float:
    """The keep ratio `ranks` reach: parameters after over parameters before."""
    dense = sum(out_features * in_features for out_features, in_features in shapes.values())
    return count_params(shapes, ranks) / dense


def uniform_ranks(shapes: Mapping[str, Shape], keep_ratio: float, rank_multiple: int = 1) -> dict[str, int | None]:
    """The largest single rank (a multiple of `rank_multiple`) whose total fits `keep_ratio`.

    Args:
        shapes: `(out, in)` of each targeted weight, by module name.
        keep_ratio: share of the targeted weights' parameters to keep, in (0, 1].
        rank_multiple: ranks are multiples of this (e.g. 8 for tensor cores).

    Returns:
        The rank of each layer; None for layers whose rank reaches break-even.

    Raises:
        ValueError: if even rank `rank_multiple` does not fit the budget.
    """
    budget = _budget(shapes, keep_ratio, rank_multiple)
    ceiling = max(min(shape) for shape in shapes.values()) // rank_multiple
    units = range(1, ceiling + 1)  # candidate ranks, in multiples of rank_multiple

    def cost(unit: int) -> int:
        return count_params(shapes, dict.fromkeys(shapes, unit * rank_multiple))

    fitting = bisect.bisect_right(units, budget, key=cost)  # the cost only grows with the rank
    if fitting == 0:
        raise ValueError(
            f"keep_ratio: {keep_ratio} is too small: even rank {rank_multiple} everywhere keeps "
            f"{kept_ratio(shapes, dict.fromkeys(shapes, rank_multiple)):.4f}"
        )
    rank = units[fitting - 1] * rank_multiple
    return {name: _dense_past_break_even(shape, rank) for name, shape in shapes.items()}


def weighted_spectrum(weight: Tensor, importance: Tensor | None = None, floor: float = 1e-3) -> Tensor:
    """Squared singular values of `W diag(d)` with FWSVD's column weights `d`, descending, float64.

    Truncating at rank `r` leaves a column-weighted error equal to the sum of
    the values past `r`, in the units of `sum_ij I_ij (W - W')_ij^2`, so the
    values of different layers compare (given one Fisher run). Without
    `importance` it is the plain spectrum, `||W - W'||_F^2` per value.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor (out, in), got shape {tuple(weight.shape)}")
    matrix = weight.detach().double()
    if importance is not None:
        if importance.shape != weight.shape:
            raise ValueError(f"importance: expected shape {tuple(weight.shape)}, got {tuple(importance.shape)}")
        matrix = matrix * column_weights(importance.detach().double().to(matrix.device), floor)
    return torch.linalg.svdvals(matrix).square().cpu()


def fisher_ranks(
    spectra: Mapping[str, Tensor],
    shapes: Mapping[str, Shape],
    keep_ratio: float,
    rank_multiple: int = 1,
    min_rank_share: float = 0.0,
) -> dict[str, int | None]:
    """Per-layer ranks that remove the most weighted error within the budget (greedy).

    Every layer starts at `min_rank_share` of the uniform rank (at least
    `rank_multiple`): the Fisher-weighted error is only a local estimate of the
    loss, and without a floor the greedy spend starved some layers to rank 1
    and took MiniLM to chance at keep ratio 0.3 (BENCHMARKS.md). Then, repeatedly, the move with
    the largest error removed per parameter spent is taken among: the next
    `rank_multiple` singular values of a layer, or, where that would reach
    break-even, turning the layer dense (which removes all its error). Moves
    that no longer fit the budget are dropped, so smaller ones elsewhere can
    still use what is left. Greedy on a concave gain; near-optimal, not exact.

    Args:
        spectra: per layer, the squared (weighted) singular values in descending
            order, as returned by `weighted_spectrum`; one Fisher run for all.
        shapes: `(out, in)` of each layer, the same names as `spectra`.
        keep_ratio: share of the targeted weights' parameters to keep, in (0, 1].
        rank_multiple: ranks are multiples of this.
        min_rank_share: every layer's rank is at least this share of the uniform rank, in [0, 1].

    Returns:
        The rank of each layer; None for layers that stay dense.
    """
    if not 0 <= min_rank_share <= 1:
        raise ValueError(f"min_rank_share: must be in [0, 1], got {min_rank_share!r}")
    if set(spectra) != set(shapes):
        missing = sorted(set(spectra) ^ set(shapes))
        raise ValueError(f"spectra: must name the same layers as shapes; differ in {missing[:5]}")
    budget = _budget(shapes, keep_ratio, rank_multiple)
    start = rank_multiple
    if min_rank_share > 0:
        uniform = uniform_ranks(shapes, keep_ratio, rank_multiple)
        floor = min((rank for rank in uniform.values() if rank is not None), default=0)
        start = max(rank_multiple, int(min_rank_share * floor) // rank_multiple * rank_multiple)
    ranks = {name: _dense_past_break_even(shape, start) for name, shape in shapes.items()}
    spent = count_params(shapes, ranks)
    if spent > budget:
        raise ValueError(
            f"keep_ratio: {keep_ratio} is too small: rank {rank_multiple} everywhere keeps "
            f"{kept_ratio(shapes, ranks):.4f}"
        )
    # kept[name][k]: the error that keeping the first k singular values removes.
    kept = {name: [0.0, *spectra[name].double().cumsum(0).tolist()] for name in shapes}
    order = {name: index for index, name in enumerate(shapes)}  # ties go to the earlier layer

    def next_move(name: str) -> tuple[float, int, str, int | None, int] | None:
        rank = ranks[name]
        if rank is None:
            return None
        shape = shapes[name]
        target = rank + rank_multiple
        new_rank = None if target >= break_even_rank(shape) else target
        values = kept[name]
        gain = (values[-1] if new_rank is None else values[min(target, len(values) - 1)]) - values[min(rank, len(values) - 1)]
        cost = layer_params(shape, new_rank) - layer_params(shape, rank)
        return (-gain / cost, order[name], name, new_rank, cost)

    heap = [move for move in map(next_move, shapes) if move is not None]
    heapq.heapify(heap)
    while heap:
        _, _, name, new_rank, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue
        ranks[name] = new_rank
        spent += cost
        move = next_move(name)
        if move is not None:
            heapq.heappush(heap, move)
    return ranks


def allocate_ranks(
    shapes: Mapping[str, Shape],
    keep_ratio: float,
    allocation: Allocation = "uniform",
    rank_multiple: int = 1,
    spectra: Mapping[str, Tensor] | None = None,
    min_rank_share: float = 0.0,
) -> dict[str, int | None]:
    """Ranks for `factorize.keep_ratio` and `factorize.allocation`: the one entry point for the stage.

    Args:
        shapes: `(out, in)` of each targeted weight, by module name.
        keep_ratio: share of the targeted weights' parameters to keep, in (0, 1].
        allocation: "uniform" (the papers' single rank) or "fisher" (needs `spectra`).
        rank_multiple: ranks are multiples of this.
        spectra: per layer, `weighted_spectrum(weight, fisher)`; only for "fisher".
        min_rank_share: for "fisher", the floor of every rank as a share of the uniform rank.

    Returns:
        The rank of each layer; None for layers that stay dense.
    """
    if allocation == "uniform":
        return uniform_ranks(shapes, keep_ratio, rank_multiple)
    if allocation == "fisher":
        if spectra is None:
            raise ValueError("spectra: allocation 'fisher' needs the weighted spectrum of every layer")
        return fisher_ranks(spectra, shapes, keep_ratio, rank_multiple, min_rank_share)
    raise ValueError(f"allocation: must be 'uniform' or 'fisher', got {allocation!r}")


def _check_shape(shape: Shape, name: str) -> Shape:
    if len(shape) != 2 or not all(isinstance(size, int) and size > 0 for size in shape):
        raise ValueError(f"{name}: expected (out, in) with positive integers, got {shape!r}")
    return shape


def _dense_past_break_even(shape: Shape, rank: int) -> int | None:
    return None if rank >= break_even_rank(shape) else rank


def _budget(shapes: Mapping[str, Shape], keep_ratio: float, rank_multiple: int) -> float:
    if not shapes:
        raise ValueError("shapes: no layers to allocate ranks to")
    for name, shape in shapes.items():
        _check_shape(shape, f"shapes[{name!r}]")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio: must be in (0, 1], got {keep_ratio!r}")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple: must be a positive integer, got {rank_multiple!r}")
    return keep_ratio * sum(out_features * in_features for out_features, in_features in shapes.values())
