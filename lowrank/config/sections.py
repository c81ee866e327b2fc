"""Typed view of `params.yaml`: one frozen dataclass per stage section.

Every knob of the pipeline lives in `params.yaml`; DVC reads the same file for
its `params:`. Validating it here, before any work starts, turns a typo in a
key or an impossible value into an error that names the key, instead of a
crash an hour into fine-tuning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lowrank.linalg.solvers import SOLVERS
from lowrank.linalg.sparsity import DEFAULT_PRUNED_WEIGHT
from lowrank.methods import METHODS, get_method, method_names

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """A bad key or value in params.yaml or in a `-S key=value` override."""


def check(condition: bool, key: str, message: str) -> None:
    """ConfigError naming `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class PathsConfig:
    """Where stages write. Each path is written once here and referenced by dvc.yaml."""

    artifacts: str = "artifacts"
    metrics: str = "metrics"


@dataclass(frozen=True)
class CustomDataConfig:
    """A user's own train/eval files (CSV, TSV or JSONL) and which columns hold what."""

    train_file: str
    eval_file: str
    text_a: str
    label: str
    text_b: str | None = None
    # Label values as they appear in the files, mapped to ids in this order; null = regression.
    label_names: list[str] | None = None


@dataclass(frozen=True)
class DataConfig:
    """Which task and how much of it; `glue_dir: null` falls back to $GLUE_DIR, then the hub."""

    task: str = "sst2"
    glue_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128
    seed: int = 42
    custom: CustomDataConfig | None = None

    def __post_init__(self) -> None:
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            check(value is None or value > 0, f"data.{key}", f"must be positive or null, got {value}")
        check(self.max_length >= 8, "data.max_length", f"must be at least 8, got {self.max_length}")
        check(
            (self.task == "custom") == (self.custom is not None),
            "data.custom",
            "is required when data.task is 'custom' and only then",
        )

    def resolved_glue_dir(self) -> Path | None:
        """The GLUE folder to read, or None to read from the hub."""
        value = self.glue_dir or os.environ.get("GLUE_DIR")
        return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class ModelConfig:
    """Any HF encoder with a sequence-classification head, by hub name or local folder."""

    name: str = DEFAULT_MODEL
    trust_remote_code: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run: the dense teacher, or a compressed model afterwards ("+ ft")."""

    epochs: float = 3.0
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every_epoch: bool = True
    # GLUE's dev set is both the one evaluated after each epoch and the one reported, so keeping
    # the best epoch selects on the reported score; false ends on the last epoch. Pruning always does.
    keep_best: bool = True
    max_steps: int | None = None

    def __post_init__(self) -> None:
        check(self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        check(self.eval_batch_size > 0, "eval_batch_size", "must be positive")
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 turns clipping off)")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be positive or null")


@dataclass(frozen=True)
class FisherConfig:
    """How importance is collected on the fine-tuned model."""

    max_samples: int | None = None
    batch_size: int = 32
    per_example: bool = False
    only_misclassified: bool = False

    def __post_init__(self) -> None:
        check(self.max_samples is None or self.max_samples > 0, "fisher.max_samples", "must be positive or null")
        check(self.batch_size > 0, "fisher.batch_size", "must be positive")


RANK_PULL_IMPORTANCE = ("fisher", "scores", "none")  # what weighs the pull's rank-r target


@dataclass(frozen=True)
class FactorizeConfig:
    """Which factorizer, how much to keep and how ranks are spread over layers.

    method: a name from the method table (`lowrank methods`, lowrank/methods/),
        which says the path that accepts it: svd, fwsvd, tfwsvd and tvd factorize
        the dense fine-tuned model (the factorize path); sparse_svd and
        sparse_tfwsvd the pruned model (the lpaf path, where svd is the ablation).
    solver: the element-wise solver of the methods that take one (tfwsvd, tvd, sparse_tfwsvd).

    min_rank_share: under `allocation: fisher`, every layer keeps at least this
        share of the uniform rank (0: no floor).
    sparse_importance: the importance of the sparse methods: `fisher` (of the
        pruned model, collected by factorize_pruned with the fisher section's
        settings) or `scores` (the pruning scores).
    pruned_weight: the share of its importance a pruned entry keeps in the
        sparse methods (0: fit the kept entries only).
    """

    method: str = "fwsvd"
    keep_ratio: float = 0.5
    allocation: Literal["uniform", "fisher"] = "uniform"
    rank_multiple: int = 1
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    solver: str = "als"
    solver_steps: int = 10
    solver_options: dict[str, Any] = field(default_factory=dict)
    min_rank_share: float = 0.5
    sparse_importance: Literal["fisher", "scores"] = "fisher"
    pruned_weight: float = DEFAULT_PRUNED_WEIGHT

    def __post_init__(self) -> None:
        check(self.method in METHODS, "factorize.method", f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        check(self.solver in SOLVERS, "factorize.solver", f"unknown solver {self.solver!r} (known: {', '.join(SOLVERS)})")
        check(0 < self.keep_ratio <= 1, "factorize.keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")
        check(0 <= self.min_rank_share <= 1, "factorize.min_rank_share", f"must be in [0, 1], got {self.min_rank_share}")
        check(self.pruned_weight >= 0, "factorize.pruned_weight", f"must be >= 0, got {self.pruned_weight}")
        check(self.rank_multiple >= 1, "factorize.rank_multiple", "must be >= 1")
        check(self.solver_steps >= 1, "factorize.solver_steps", "must be >= 1")


@dataclass(frozen=True)
class DistillationConfig:
    """Logit distillation from the dense fine-tuned model: loss = (1 - weight) task + weight KD."""

    enabled: bool = False
    temperature: float = 2.0
    weight: float = 0.5

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        check(0 <= self.weight <= 1, "weight", f"must be in [0, 1], got {self.weight}")


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
        keep it at `factorize.pruned_weight` (a key of its own, so that sweeping that one does
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


LATENCY_RUNTIMES = ("torch", "onnxruntime")  # eager PyTorch; the checked ONNX export in onnxruntime


@dataclass(frozen=True)
class EvaluateConfig:
    """What the evaluate stage measures besides the task metric."""

    batch_size: int = 64
    latency: bool = True
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    latency_seq_len: int = 64
    latency_warmup: int = 3
    latency_repeats: int = 10
    latency_runtimes: list[str] = field(default_factory=lambda: ["torch"])
    threads: int | None = None

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "evaluate.batch_size", "must be positive")
        check(
            bool(self.latency_runtimes) and set(self.latency_runtimes) <= set(LATENCY_RUNTIMES),
            "evaluate.latency_runtimes", f"must be a non-empty list of {', '.join(LATENCY_RUNTIMES)}",
        )
        check(all(b > 0 for b in self.latency_batch_sizes), "evaluate.latency_batch_sizes", "must be positive")
        check(self.latency_repeats >= 1, "evaluate.latency_repeats", "must be >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: a local SQLite store by default so that nothing needs a server."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "lowrank"


@dataclass(frozen=True)
class OrchestrationConfig:
    """Which path the flow takes, and Prefect's settings (state stays inside the project)."""

    path: Literal["dense", "factorize", "lpaf"] = "factorize"
    cache: bool = True
    cron: str | None = None


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # the defaults of the four train sections below
    finetune: TrainConfig = field(default_factory=TrainConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    factorize: FactorizeConfig = field(default_factory=FactorizeConfig)
    finetune_compressed: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    mrft: MrftConfig = field(default_factory=MrftConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)

    def __post_init__(self) -> None:
        # Checks across sections: which factorizers suit the configured path (the method table says).
        path, method = self.orchestration.path, self.factorize.method
        if path == "lpaf":
            check_lpaf_factorize(self.factorize)
        else:
            check(
                get_method(method).accepts("factorize"),
                "factorize.method",
                f"{method} factorizes pruned matrices: it needs orchestration.path lpaf (path is {path})",
            )


def check_lpaf_factorize(cfg: FactorizeConfig) -> None:
    """ConfigError unless `cfg` can factorize pruned matrices (the lpaf path has no Fisher stage)."""
    check(
        get_method(cfg.method).accepts("lpaf"),
        "factorize.method",
        f"the lpaf path factorizes pruned matrices with {', '.join(method_names('lpaf'))}, got {cfg.method}",
    )
    check(
        cfg.allocation == "uniform",
        "factorize.allocation",
        f"the lpaf path has no Fisher stage: use uniform, got {cfg.allocation}",
    )
