"""Unstructured pruning of Linear weights: movement and Taylor (first-order), and magnitude.

LPAF prunes before it factorizes because first-order pruning leaves matrices
of low effective rank, while magnitude pruning does not; both methods share
the schedule, the top-k selection and the mask bookkeeping here, so that the
comparison between them differs in the score alone.

Movement scores (-sum of grad * W) only carry signal while the weights travel
far, as in a long fine-tuning from the pretrained model; from an already
fine-tuned model the gradient is mostly noise and movement ranks the weights
almost at random (measured on MiniLM: rank correlation 0.00 with |W|; LPAF
with movement pruning stays at chance, BENCHMARKS.md). The `taylor` criterion, a smoothed
first-order sensitivity |grad * W| (as in PLATON, Zhang et al. 2022), asks
instead how much the loss would change if the weight were removed, which a
converged model answers well.

Masks are applied by zeroing the weights in place (not by a forward-time
product): the pruned model is then an ordinary model that any later stage can
load, and a zero weight contributes nothing to the movement score, so a
pruned entry never grows back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from lowrank.train.hooks import TrainHook
from lowrank.io.files import atomic_write_bytes, load_tensors, safetensors_bytes
from lowrank.modules.surgery import linear_weights

PruneMethod = Literal["movement", "taylor", "magnitude"]
PruneScope = Literal["per_matrix", "global"]


def _check_density(value: float, field: str) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{field} must be in (0, 1], got {value}")


def cubic_sparsity(
    step: int,
    total_steps: int,
    final_density: float,
    warmup_steps: int,
    cooldown_steps: int,
    initial_density: float = 1.0,
) -> float:
    """Density (share of weights kept) at `step` under Zhu & Gupta's cubic schedule.

    The cubic prunes fast while many redundant weights remain and slows down as
    the network has less to give; the warm-up lets movement scores accumulate
    before the first cut and the cool-down lets the network recover at the
    final density.

    Args:
        step: 0-based optimizer step; values past `total_steps` stay at the final density.
        total_steps: optimizer steps of the whole run.
        final_density: density reached at step `total_steps - cooldown_steps`.
        warmup_steps: steps held at `initial_density` before pruning starts.
        cooldown_steps: steps held at `final_density` at the end.
        initial_density: density before pruning starts.

    Returns:
        `final + (initial - final) * (1 - progress)^3`, progress clipped to [0, 1].
    """
    _check_density(final_density, "final_density")
    _check_density(initial_density, "initial_density")
    if warmup_steps < 0 or cooldown_steps < 0:
        raise ValueError(f"warmup_steps and cooldown_steps must be >= 0, got {warmup_steps}, {cooldown_steps}")
    ramp = total_steps - warmup_steps - cooldown_steps
    if ramp < 0:
        raise ValueError(
            f"warmup_steps + cooldown_steps ({warmup_steps} + {cooldown_steps}) exceed total_steps ({total_steps})"
        )
    if ramp == 0:
        return initial_density if step < warmup_steps else final_density
    progress = min(max((step - warmup_steps) / ramp, 0.0), 1.0)
    return final_density + (initial_density - final_density) * (1.0 - progress) ** 3


def kept_count(numel: int, density: float) -> int:
    """Entries kept at `density`: the nearest whole count, at least one."""
    _check_density(density, "density")
    return min(numel, max(1, math.floor(density * numel + 0.5)))


def _topk_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the `k` largest entries; among ties the lowest indices win.

    `kthvalue` plus a tie pass avoids sorting all entries (a global sort over
    BERT-base's 85M weights would need 680 MB of indices) and, unlike `topk`,
    its choice among equal scores is defined. The tie pass ranks ties by a
    running count instead of reading a count back, so on a GPU a mask costs
    no synchronization (one per matrix per step made pruning ~8x a plain step).
    """
    n = flat.numel()
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    ties = flat == threshold
    missing = k - above.sum()  # a 0-d tensor: stays on the device
    return above | (ties & (torch.cumsum(ties, 0) <= missing))


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the highest-scoring `kept_count(numel, density)` entries of one matrix."""
    k = kept_count(scores.numel(), density)
    return _topk_flat(scores.detach().flatten(), k).view(scores.shape)


def topk_mask_global(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the highest scores across all matrices together, `density` of their total size."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float() for n in names])
    mask = _topk_flat(flat, kept_count(flat.numel(), density))
    parts = mask.split([scores[n].numel() for n in names])
    return {n: part.view(scores[n].shape) for n, part in zip(names, parts)}


def _select(scores: Mapping[str, torch.Tensor], density: float, scope: PruneScope) -> dict[str, torch.Tensor]:
    if scope == "global":
        return topk_mask_global(scores, density)
    return {name: topk_mask(score, density) for name, score in scores.items()}


@torch.no_grad()
def prune_once(
    model: nn.Module,
    names: Sequence[str],
    density: float,
    method: str = "magnitude",
    scope: PruneScope = "per_matrix",
) -> dict[str, torch.Tensor]:
    """One-shot magnitude pruning in place (the baseline); returns the boolean masks.

    Movement scores need gradients accumulated during training: use `Pruner`.
    """
    if method != "magnitude":
        raise ValueError(f"prune_once supports method 'magnitude' only (movement needs training), got {method!r}")
    weights = linear_weights(model, names, "pruning target")
    masks = _select({n: w.abs() for n, w in weights.items()}, density, scope)
    for name, weight in weights.items():
        weight.mul_(masks[name])
    return masks


class Pruner(TrainHook):
    """Gradual pruning of the named Linear weights during fine-tuning.

    Per step: `after_backward` accumulates movement scores and zeroes the
    gradient of pruned entries (so clipping measures live weights only);
    `after_step` re-zeroes pruned weights, which Adam's momentum would
    otherwise revive, and every `update_every` steps cuts the masks down to the
    scheduled density. The masks only shrink: a pruned weight is zero, so its
    movement score is frozen and reviving it would bring back a zero.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        method: PruneMethod = "movement",
        final_density: float = 0.1,
        warmup_steps: int = 0,
        cooldown_steps: int = 0,
        scope: PruneScope = "per_matrix",
        update_every: int = 1,
        taylor_beta: float = 0.85,
    ) -> None:
        """Args (the `prune` params section's keys, with the schedule in steps):
            method: "movement" (scores S -= grad * W, Sanh et al. 2020), "taylor"
                (S <- beta * S + (1 - beta) * |grad * W|) or "magnitude" (|W|).
            final_density: share of each target's weights kept at the end, in (0, 1].
            warmup_steps / cooldown_steps: steps at density 1 before, and at the final density after, the cubic ramp.
            scope: "per_matrix" keeps the same share of every matrix; "global" ranks all targets together.
            update_every: recompute the masks every this many optimizer steps.
            taylor_beta: the smoothing of the Taylor scores over steps, in [0, 1).
        """
        if not names:
            raise ValueError("Pruner needs at least one target name")
        if method not in ("movement", "taylor", "magnitude"):
            raise ValueError(f"method must be 'movement', 'taylor' or 'magnitude', got {method!r}")
        if not 0 <= taylor_beta < 1:
            raise ValueError(f"taylor_beta must be in [0, 1), got {taylor_beta}")
        if scope not in ("per_matrix", "global"):
            raise ValueError(f"scope must be 'per_matrix' or 'global', got {scope!r}")
        _check_density(final_density, "final_density")
        for key, value in (("warmup_steps", warmup_steps), ("cooldown_steps", cooldown_steps)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.names = list(names)
        self.method, self.final_density, self.scope, self.update_every = method, final_density, scope, update_every
        self.warmup_steps, self.cooldown_steps, self.taylor_beta = warmup_steps, cooldown_steps, taylor_beta
        self.total_steps = 0
        self.target_density = 1.0
        self._density = 1.0
        self._weights: dict[str, nn.Parameter] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._scores: dict[str, torch.Tensor] = {}
        self._selected_density: float | None = None  # the density of the last selection (None: none yet)

    def density_at(self, step: int) -> float:
        """Scheduled density of the weights during `step`'s forward pass."""
        return cubic_sparsity(step, self.total_steps, self.final_density, self.warmup_steps, self.cooldown_steps)

    @torch.no_grad()
    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        if self.warmup_steps + self.cooldown_steps > total_steps:  # fail before training, not at the end
            raise ValueError(
                f"warmup_steps + cooldown_steps ({self.warmup_steps} + {self.cooldown_steps}) "
                f"exceed the {total_steps} training steps"
            )
        self.total_steps = total_steps
        self._weights = linear_weights(model, self.names, "pruning target")
        for name, weight in self._weights.items():
            # Loaded state (a resumed run) is kept, only moved next to its weight.
            mask = self._masks.get(name, torch.ones_like(weight, dtype=torch.bool))
            self._masks[name] = mask.to(weight.device, torch.bool)
            score = self._scores.get(name, torch.zeros_like(weight, dtype=torch.float32))
            self._scores[name] = score.to(weight.device, torch.float32)
        self.target_density = self.density_at(0)
        self._density = self._count_density()
        self._apply_masks()

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        for name, weight in self._weights.items():
            if weight.grad is None:
                continue
            # Weights are already masked, so these are the scores of the masked weights.
            if self.method == "movement":
                self._scores[name].sub_(weight.grad.float() * weight.float())
            elif self.method == "taylor":
                beta = self.taylor_beta
                self._scores[name].mul_(beta).add_((weight.grad.float() * weight.float()).abs(), alpha=1 - beta)
            weight.grad.mul_(self._masks[name])

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        next_step = step + 1
        ramp_end = self.total_steps - self.cooldown_steps
        # Always update when the ramp ends so that the final density is hit exactly.
        density = self.density_at(next_step)
        # At an unchanged density the kept entries are exactly the live ones (pruned rank last):
        # warm-up and cool-down need no selection.
        due = next_step % self.update_every == 0 or next_step == ramp_end
        if due and density != self._selected_density:
            self._update_masks(density)
        self._apply_masks()

    @torch.no_grad()
    def on_train_end(self, model: nn.Module) -> None:
        self._apply_masks()

    def metrics(self) -> dict[str, float]:
        return {"density": self.density(), "target_density": self.target_density}

    def density(self) -> float:
        """Share of the target weights currently kept, over all targets."""
        return self._density

    def _count_density(self) -> float:
        # Counted at updates only, in one read: a count per matrix would synchronize the GPU once per matrix.
        if not self._masks:
            return 1.0
        kept = int(torch.stack([m.sum() for m in self._masks.values()]).sum())
        return kept / sum(m.numel() for m in self._masks.values())

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean masks `(out, in)` by module name (True = kept)."""
        return dict(self._masks)

    def scores(self) -> dict[str, torch.Tensor]:
        """Movement or Taylor scores, or |W| at the last update for magnitude pruning."""
        return dict(self._scores)

    def _update_masks(self, density: float) -> None:
        if self.method == "magnitude":
            for name, weight in self._weights.items():
                self._scores[name] = weight.detach().abs().float()
        # Pruned entries rank last, so a new mask is always a subset of the old one.
        ranked = {n: s.masked_fill(~self._masks[n], float("-inf")) for n, s in self._scores.items()}
        self._masks = _select(ranked, density, self.scope)
        self.target_density = self._selected_density = density
        self._density = self._count_density()

    def _apply_masks(self) -> None:
        for name, weight in self._weights.items():
            weight.mul_(self._masks[name])

    def save(self, path: str | Path) -> Path:
        """Write masks and scores to one safetensors file (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        for name in self._masks:
            tensors[f"mask.{name}"] = self._masks[name].detach().cpu().contiguous()
            tensors[f"score.{name}"] = self._scores[name].detach().cpu().contiguous()
        options = {
            "method": self.method, "final_density": self.final_density, "warmup_steps": self.warmup_steps,
            "cooldown_steps": self.cooldown_steps, "scope": self.scope, "update_every": self.update_every,
            "taylor_beta": self.taylor_beta,
        }
        return atomic_write_bytes(path, safetensors_bytes(tensors, {"options": options, "target_density": self.target_density}))

    def load(self, path: str | Path) -> None:
        """Restore masks and scores; applied to the weights at `on_train_begin`."""
        masks, scores = load_pruning_state(path)
        missing = set(self.names) - set(masks)
        if missing:
            raise ValueError(f"{path} has no mask for {sorted(missing)}")
        self._masks = {n: masks[n] for n in self.names}
        self._scores = {n: scores[n] for n in self.names}
        self._density = self._count_density()


def load_pruning_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read the (masks, scores) that `Pruner.save` wrote, keyed by module name."""
    tensors = load_tensors(path)
    masks = {k[len("mask.") :]: v.bool() for k, v in tensors.items() if k.startswith("mask.")}
    scores = {k[len("score.") :]: v for k, v in tensors.items() if k.startswith("score.")}
    return masks, scores
