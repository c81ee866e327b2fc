"""What every params section shares: the errors that name a key or a file, and one training run's settings."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


class InputError(ValueError):
    """Bad input from the user: a params value, a file, the data. Its message is one line that
    names the key or the file; the command line prints it alone and exits with 2."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that is not there."""


class ConfigError(InputError):
    """A bad key or value in params.yaml or in a `-S key=value` override."""


_SAID: set[str] = set()


def note(line: str) -> None:
    """Say on stderr, once per process, what was chosen for the user (a split, the labels, a data folder): preflight
    and the stages read the same params, and one line is enough. Written, not printed: inside a Prefect flow `print`
    becomes a log record, which the CLI keeps quiet."""
    if line not in _SAID:
        _SAID.add(line)
        sys.stderr.write(line + "\n")


def check(condition: bool, key: str, message: str) -> None:
    """ConfigError naming `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class IntermediateDistillation:
    """Stage 1 of two-stage distillation (TinyBERT's order): match the dense model's inside before its predictions.

    loss = hidden_weight * MSE(hidden states) + attention_weight * MSE(attention probabilities) + task_weight * task,
    each MSE averaged over the blocks; `epochs` of it run before the section's own epochs (stage 2).
    """

    epochs: float = 0.0  # 0: no stage 1
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    task_weight: float = 0.0

    def __post_init__(self) -> None:
        check(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        for key in ("hidden_weight", "attention_weight", "task_weight"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        check(self.epochs == 0 or self.hidden_weight + self.attention_weight + self.task_weight > 0,
              "hidden_weight", "stage 1 needs a weight above 0 (hidden_weight, attention_weight or task_weight)")


@dataclass(frozen=True)
class DistillationConfig:
    """Distillation from the dense fine-tuned model, one implementation for every training run that has a teacher.

    Stage 2 (the section's epochs), or the only stage: loss = (1 - weight) * task + weight * KD(logits at
    `temperature`) + hidden_weight * MSE(hidden states) + attention_weight * MSE(attention probabilities),
    each MSE averaged over the blocks (a compressed model keeps the dense one's shapes). `intermediate` adds
    stage 1 before it.
    """

    enabled: bool = False
    temperature: float = 2.0
    weight: float = 0.5
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    intermediate: IntermediateDistillation = field(default_factory=IntermediateDistillation)

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        check(0 <= self.weight <= 1, "weight", f"must be in [0, 1], got {self.weight}")
        check(self.hidden_weight >= 0, "hidden_weight", f"must be >= 0, got {self.hidden_weight}")
        check(self.attention_weight >= 0, "attention_weight", f"must be >= 0, got {self.attention_weight}")


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run: the dense teacher, or a compressed model afterwards ("+ ft")."""

    epochs: float = 3.0
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-5  # MiniLM-L6 learns slowly at BERT-base's 2e-5 (the one default; params.yaml repeats it)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every_epoch: bool = True
    # Each epoch is scored on the selection split held out of the training rows (data.validation), never on the
    # reported one; keeping the best epoch chooses on it. false ends on the last epoch; pruning always does.
    keep_best: bool = True
    max_steps: int | None = None

    def __post_init__(self) -> None:
        check(self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        check(self.eval_batch_size > 0, "eval_batch_size", "must be positive")
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 turns clipping off)")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be positive or null")


@dataclass(frozen=True)
class CompressedTrainConfig(TrainConfig):
    """"+ ft": fine-tuning a compressed model, optionally distilling from the dense one.

    It starts by scoring the compressed model (epoch 0 of its history), so that
    `keep_best` can end on it when fine-tuning makes the model worse.
    """

    distill: DistillationConfig = field(default_factory=DistillationConfig)
    # Gradual compression: the keep ratios of the cuts before factorize.keep_ratio (decreasing, each above it),
    # each cut from the current factors and followed by `schedule_epochs` of training (stage 1's loss when
    # distillation has one, else stage 2's); [] is one cut, the factorize stage's.
    schedule: list[float] = field(default_factory=list)
    schedule_epochs: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(all(0 < r < 1 for r in self.schedule), "schedule", f"keep ratios must be in (0, 1), got {self.schedule}")
        check(all(a > b for a, b in zip(self.schedule, self.schedule[1:])), "schedule", f"must decrease, got {self.schedule}")
        check(self.schedule_epochs > 0, "schedule_epochs", f"must be positive, got {self.schedule_epochs}")
