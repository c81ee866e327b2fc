"""A pull of each targeted weight towards its rank-r part during training.

LPAF prunes first because first-order pruning is said to leave matrices of low
effective rank, so that the factorization after it loses little. On MiniLM it
does not (BENCHMARKS.md: 0.47 of full rank at 90% energy after Taylor pruning,
0.48 for the dense model), and the factorized pruned model starts no better
than TFWSVD of the dense one. The pull makes the first phase do that work
explicitly: after every optimizer step, each weight moves a share `gamma(t)` of
the way to its best rank-r approximation,

    W <- W - gamma(t) * (W - U U^T W V V^T),

where U and V span the top-r singular vectors of W, refreshed every few steps
(an SVD per matrix per step would cost as much as the step). `gamma` rises
linearly from 0 over the run, so the network meets the constraint gradually
while the task loss keeps training it, as gradual pruning meets a density.
Its sum over the run is the `total` strength: without the task's gradients,
the energy beyond rank r would shrink by about exp(-total), whatever the
number of steps, so one setting serves a short run and a long one. It is a
decoupled shrinkage of the spectrum's tail, the low-rank counterpart of
decoupled weight decay.

Unweighted, the pull discards the spectrum's tail whatever the task needs of
it: on MiniLM (SST-2, keep ratio 0.15) it took the pruned model from 0.79 to
0.55 and the factorized one from 0.75 to 0.59 (BENCHMARKS.md). With an
`importance_fn` (the pruner's first-order scores), each refresh instead solves
the element-wise weighted rank-r problem (TFWSVD's objective, by the `als`
solver) and the weights move towards that solution, keeping what the loss is
sensitive to. That hurt less but still hurt: at total 0.5 the pruned model
kept its score and its factorization started 3 points lower than without the
pull. The factorization after pruning weighs entries by the Fisher, pruned
ones at `factorize.options.pruned_weight`, not by the pruning scores, so the stage can
also weigh the pull's target that way (`RunningFisher`), making the pull head
for the very matrix the factorization will produce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import nn

from lowrank.config import RANK_PULL_IMPORTANCE
from lowrank.train.hooks import TrainHook
from lowrank.modules.surgery import linear_weights

if TYPE_CHECKING:
    from lowrank.train.pruning import Pruner


class RunningFisher(TrainHook):
    """Squared gradients of the named weights, averaged over recent steps (an
    exponential moving average with `beta`): the per-mini-batch Fisher that the
    factorization will weigh entries by, kept current while the weights move.
    List it before a pruner, which zeroes the gradients of pruned entries."""

    def __init__(self, names: list[str], beta: float = 0.9) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.names = list(names)
        self.beta = beta
        self._weights: dict[str, nn.Parameter] = {}
        self._fisher: dict[str, torch.Tensor] = {}

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self._weights = linear_weights(model, self.names, "fisher target")
        self._fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in self._weights.items()}

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        for name, weight in self._weights.items():
            if weight.grad is not None:
                self._fisher[name].mul_(self.beta).add_(weight.grad.float().square(), alpha=1 - self.beta)

    def values(self) -> dict[str, torch.Tensor]:
        return dict(self._fisher)


class RankPull(TrainHook):
    """Pulls each named Linear weight towards its rank-r part after every optimizer step.

    ranks: the rank each module will be factorized to.
    total: the sum of the per-step pulls over the run, >= 0 (each step's is capped at 1).
    refresh_every: recompute the singular subspaces every this many steps.
    mask_fn: called after the pull, e.g. a pruner's masks, so that pruned entries stay zero
        (the rank-r part is dense); None to leave the weights dense.
    importance_fn: element-wise importance of each weight (e.g. a pruner's scores); the pull
        then moves towards the importance-weighted rank-r solution, refreshed every
        `refresh_every` steps by `solver_steps` sweeps of the als solver. None: the plain rank-r part.
    """

    def __init__(
        self,
        ranks: Mapping[str, int],
        total: float,
        refresh_every: int = 10,
        mask_fn: Callable[[], Mapping[str, torch.Tensor]] | None = None,
        importance_fn: Callable[[], Mapping[str, torch.Tensor]] | None = None,
        solver_steps: int = 10,
    ) -> None:
        if not ranks:
            raise ValueError("RankPull needs at least one target")
        if not total >= 0:
            raise ValueError(f"total must be >= 0, got {total}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        bad = {name: r for name, r in ranks.items() if r < 1}
        if bad:
            raise ValueError(f"ranks must be >= 1, got {bad}")
        self.ranks = dict(ranks)
        self.total = total
        self.refresh_every = refresh_every
        self.mask_fn = mask_fn
        self.importance_fn = importance_fn
        self.solver_steps = solver_steps
        self._targets: dict[str, torch.Tensor] = {}
        self.total_steps = 0
        self._weights: dict[str, nn.Parameter] = {}
        self._bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gamma = 0.0

    def gamma_at(self, step: int) -> float:
        """The pull after `step` (0-based): a linear ramp from 0 whose sum over the run is `total`."""
        n = self.total_steps
        if n <= 1:
            return min(self.total, 1.0)
        return min(self.total * 2 * min(step, n - 1) / (n * (n - 1)), 1.0)

    @torch.no_grad()
    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.total_steps = total_steps
        self._weights = linear_weights(model, list(self.ranks), "rank pull target")
        for name, weight in self._weights.items():
            if self.ranks[name] > min(weight.shape):
                raise ValueError(f"rank pull: rank {self.ranks[name]} of {name!r} exceeds min{tuple(weight.shape)}")
        self._bases = {}
        self._targets = {}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        self._gamma = self.gamma_at(step)
        if self._gamma == 0:
            return
        if step % self.refresh_every == 0 or not (self._bases or self._targets):
            self._refresh()
        masks = self.mask_fn() if self.mask_fn is not None else {}
        for name, weight in self._weights.items():
            if name in self._targets:
                low_rank = self._targets[name]  # the weighted solution of the last refresh
            else:
                left, right = self._bases[name]
                low_rank = left @ (left.T @ weight.float() @ right) @ right.T
            weight.lerp_(low_rank.to(weight.dtype), self._gamma)
            if name in masks:
                weight.mul_(masks[name].to(weight.dtype))

    def metrics(self) -> dict[str, float]:
        return {"rank_pull": self._gamma}

    def _refresh(self) -> None:
        if self.importance_fn is not None:
            from lowrank.linalg.solvers import get_solver

            importance = self.importance_fn()
            for name, weight in self._weights.items():
                weights = importance[name].float().clamp_min(0) + 1e-12  # all-zero rows would leave the problem undefined
                a, b = get_solver("als")(weight.detach().float(), self.ranks[name], importance=weights, steps=self.solver_steps)
                self._targets[name] = a @ b
            return
        for name, weight in self._weights.items():
            rank = self.ranks[name]
            u, _, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            self._bases[name] = (u[:, :rank].contiguous(), vh[:rank].T.contiguous())


def pruning_pull_hooks(
    pruner: "Pruner", ranks: Mapping[str, int], total: float, refresh_every: int, importance: str, pruned_weight: float
) -> list[TrainHook]:
    """The hooks of a pull while pruning, in the order they must run: [RunningFisher,] the pruner, the pull.

    The pull keeps the pruner's masks. Its target is weighted by `importance`:
    "fisher", running squared gradients with pruned entries at `pruned_weight`
    (as the factorization after pruning will weigh them); "scores", the
    pruner's own scores; "none", the plain rank-r part.
    """
    from lowrank.linalg.sparsity import sparsity_importance

    if importance not in RANK_PULL_IMPORTANCE:
        raise ValueError(f"rank pull importance must be one of {RANK_PULL_IMPORTANCE}, got {importance!r}")
    names = list(ranks)
    if importance == "none":
        hooks, target_importance = [pruner], None
    elif importance == "scores":
        hooks, target_importance = [pruner], pruner.scores
    else:
        fisher = RunningFisher(names)  # before the pruner, which zeroes the gradients of pruned entries

        def target_importance() -> dict[str, torch.Tensor]:
            masks = pruner.masks()
            return {n: sparsity_importance(masks[n], f, pruned_weight=pruned_weight) for n, f in fisher.values().items()}

        hooks = [fisher, pruner]
    return [*hooks, RankPull(ranks, total, refresh_every, mask_fn=pruner.masks, importance_fn=target_importance)]
