"""The LPAF path's params sections: pruning (`prune`), mixed-rank fine-tuning (`mrft`), and their distillation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lowrank.config.base import DistillationConfig, TrainConfig, check

RANK_PULL_IMPORTANCE = ("fisher", "scores", "none")  # what weighs the pull's rank-r target


@dataclass(frozen=True)
class PruneConfig:
    """LPAF step 1: unstructured pruning during fine-tuning, on the `factorize.targets` matrices.

    method: movement (first-order, Sanh et al. 2020), taylor (smoothed first-order
        sensitivity |grad * W|; the one that works from a fine-tuned model) or magnitude (the baseline).
    taylor_beta: the smoothing of the taylor scores over steps, in [0, 1).
    final_density: share of each target's weights kept at the end; null = `density_factor` x `factorize.keep_ratio`.
    density_factor: with `final_density` null, how many times the factors' share the pruned
        model keeps (capped at 1): pruning less than the factors keep leaves a stronger
        sparse model to factorize and to mix with during mixed-rank fine-tuning.
    warmup_ratio / cooldown_ratio: shares of the training steps held at density 1
        before, and at the final density after, the cubic ramp. `warmup_steps` /
        `cooldown_steps`, when set, replace them with step counts.
    scope: per_matrix (the same density everywhere) or global (one top-k over all targets).
    update_every: recompute the masks every this many optimizer steps.
    start_from: finetuned (prune the dense teacher further) or pretrained (prune while fine-tuning).
    rank_pull: beyond the paper, 0 = off: while pruning, pull each matrix towards its part of
        the rank the factorization will give it (lowrank.rank_pull), with this total strength
        (the energy beyond that rank would shrink by about exp(-rank_pull) without the task's gradients).
    rank_pull_every: refresh the pull's rank-r target every this many steps.
    rank_pull_importance: the element weights of the pull's rank-r target (solved by the als
        solver): fisher (running squared gradients, pruned entries at `rank_pull_pruned_weight`,
        as the factorization after pruning weighs them), scores (the pruning scores) or none
        (the plain rank-r part, which discards what the task needs).
    rank_pull_pruned_weight: the share of its Fisher a pruned entry keeps in the pull's target;
        keep it at `factorize.options.pruned_weight` (a key of its own, so that sweeping that one does
        not invalidate the pruned model).
    rank_energies: spectrum shares for the effective ranks of the rank analysis; [] skips it.
    train: the fine-tuning run that prunes (its `warmup_ratio` is the learning rate's; it always
        ends on its last epoch, whatever `keep_best` says, since an earlier one has another density).
    distill: distillation from the dense fine-tuned model during pruning.
    """

    method: Literal["movement", "taylor", "magnitude"] = "taylor"
    taylor_beta: float = 0.85
    final_density: float | None = None
    density_factor: float = 1.0
    warmup_ratio: float = 0.1
    cooldown_ratio: float = 0.1
    warmup_steps: int | None = None
    cooldown_steps: int | None = None
    scope: Literal["per_matrix", "global"] = "per_matrix"
    update_every: int = 1
    start_from: Literal["finetuned", "pretrained"] = "finetuned"
    rank_pull: float = 0.0
    rank_pull_every: int = 10
    rank_pull_importance: Literal["fisher", "scores", "none"] = "fisher"
    rank_pull_pruned_weight: float = 0.6
    rank_energies: list[float] = field(default_factory=lambda: [0.9, 0.99])
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillationConfig = field(default_factory=DistillationConfig)

    def __post_init__(self) -> None:
        density = self.final_density
        check(density is None or 0 < density <= 1, "prune.final_density", f"must be in (0, 1] or null, got {density}")
        check(self.density_factor >= 1, "prune.density_factor", f"must be >= 1 (the pruned model keeps at least the factors' share), got {self.density_factor}")
        for key in ("warmup_ratio", "cooldown_ratio"):
            value = getattr(self, key)
            check(0 <= value < 1, f"prune.{key}", f"must be in [0, 1), got {value}")
        for key in ("warmup_steps", "cooldown_steps"):
            value = getattr(self, key)
            check(value is None or value >= 0, f"prune.{key}", f"must be >= 0 or null, got {value}")
        if self.warmup_steps is None and self.cooldown_steps is None:
            check(
                self.warmup_ratio + self.cooldown_ratio <= 1,
                "prune.warmup_ratio + prune.cooldown_ratio",
                f"warm-up + cool-down ({self.warmup_ratio} + {self.cooldown_ratio}) exceed the whole training",
            )
        if self.train.max_steps is not None:  # the step count is known now; otherwise at the stage
            self.schedule_steps(self.train.max_steps)
        check(0 <= self.taylor_beta < 1, "prune.taylor_beta", f"must be in [0, 1), got {self.taylor_beta}")
        check(self.update_every >= 1, "prune.update_every", f"must be >= 1, got {self.update_every}")
        check(self.rank_pull >= 0, "prune.rank_pull", f"must be >= 0 (0: off), got {self.rank_pull}")
        check(self.rank_pull_every >= 1, "prune.rank_pull_every", f"must be >= 1, got {self.rank_pull_every}")
        check(self.rank_pull_importance in RANK_PULL_IMPORTANCE, "prune.rank_pull_importance",
               f"must be one of {', '.join(RANK_PULL_IMPORTANCE)}, got {self.rank_pull_importance!r}")
        check(self.rank_pull_pruned_weight >= 0, "prune.rank_pull_pruned_weight", f"must be >= 0, got {self.rank_pull_pruned_weight}")
        check(all(0 < e <= 1 for e in self.rank_energies), "prune.rank_energies", "must each be in (0, 1]")

    def density(self, keep_ratio: float) -> float:
        """The final density: `final_density`, or `density_factor` x the factorization's keep ratio when null."""
        if self.final_density is not None:
            return self.final_density
        return round(min(1.0, keep_ratio * self.density_factor), 6)

    def schedule_steps(self, total_steps: int) -> tuple[int, int]:
        """(warm-up, cool-down) steps of a run of `total_steps`; ConfigError if they leave no ramp.

        The ramp must end on a step the run takes (cool-down < total), so the
        final density is always reached.
        """
        # Ratios round down, so ratios summing to at most 1 always fit.
        warmup = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total_steps)
        cooldown = self.cooldown_steps if self.cooldown_steps is not None else int(self.cooldown_ratio * total_steps)
        keys = " + ".join(
            f"prune.{kind}_steps" if getattr(self, f"{kind}_steps") is not None else f"prune.{kind}_ratio"
            for kind in ("warmup", "cooldown")
        )
        check(
            warmup + cooldown <= total_steps and cooldown < total_steps,
            keys,
            f"warm-up + cool-down ({warmup} + {cooldown} steps) exceed the {total_steps} training steps",
        )
        return warmup, cooldown


@dataclass(frozen=True)
class MrftConfig:
    """LPAF step 4: mixed-rank fine-tuning of the factors beside their sparse matrices.

    p0: probability that a layer takes its low-rank path at the first step, in [0, 1].
    ramp_share: share of the training steps over which that probability rises to 1.
    train_sparse: also train the sparse matrices while they are in use.
    seed: seeds the per-step path draws (the training seed is `train.seed`).
    train: the fine-tuning run.
    distill: distillation from the dense fine-tuned model.
    """

    p0: float = 0.5
    ramp_share: float = 0.5
    train_sparse: bool = False
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillationConfig = field(default_factory=lambda: DistillationConfig(enabled=True))

    def __post_init__(self) -> None:
        check(0 <= self.p0 <= 1, "mrft.p0", f"must be in [0, 1], got {self.p0}")
        check(0 <= self.ramp_share <= 1, "mrft.ramp_share", f"must be in [0, 1], got {self.ramp_share}")
