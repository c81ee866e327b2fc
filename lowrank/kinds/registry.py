"""The task-kind table: what the pipeline needs to know about a kind of task, declared once per kind.

A kind (sequence classification, token classification, extractive QA, causal LM) says
which transformers auto class holds its model, how a file's rows become
features and labels, how batches are collated, which model outputs the
evaluation reads (and the ONNX export writes), its metrics and which one is
the score and whether higher or lower is better, the score of the trivial answer a collapsed model gives, and what
the served model takes and returns. The stages, export, training and tracking
ask the kind; none of them tests a kind's name. A new kind is one module with
one `register_kind(...)` call (as a method is one `@register_method`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lowrank.config.base import ConfigError, InputError

Rows = list[dict[str, Any]]


class TaskKind:
    """The base of every kind; a kind overrides what differs. Attributes:

    name: registry name, the value of `TaskSpec.kind` and `data.custom.kind`.
    auto_class: the transformers auto class of its models (`AutoModelForTokenClassification`).
    outputs: the model outputs evaluation reads and ONNX exports, each with its dynamic axes.
    targets: the batch keys that hold the labels (what the model's loss takes).
    goal: whether a higher (`max`) or a lower (`min`, a perplexity) `score` is better; every choice asks `better`.
    summary: one line for `lowrank tasks`.
    """

    name: str
    auto_class: str
    outputs: Mapping[str, Mapping[int, str]]
    targets: tuple[str, ...]
    goal: str = "max"
    summary: str

    @property
    def architecture_suffix(self) -> str:
        """How the class names of its models end: `AutoModelForQuestionAnswering` -> `ForQuestionAnswering`."""
        return self.auto_class.removeprefix("AutoModel")

    # ---- data
    def read_rows(self, spec: Any, path: Any, layout: Any) -> Rows:
        """Every row of one file, checked; errors name `file:line`."""
        raise NotImplementedError

    def raw_features(self, spec: Any) -> Any:
        """The `datasets.Features` of the rows `read_rows` returns."""
        raise NotImplementedError

    def encode(self, dataset: Any, spec: Any, tokenizer: Any, max_length: int, split: str) -> Any:
        """Token ids, the `targets` and whatever scoring needs, for one raw split (not padded)."""
        raise NotImplementedError

    def collator(self, tokenizer: Any) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Pads a list of features into the batch `model(**batch)` takes."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def custom_task(self, custom: Any) -> Any:
        """The `TaskSpec` of the user's files (`data.custom`)."""
        raise NotImplementedError

    # ---- models
    def head_kwargs(self, spec: Any) -> dict[str, Any]:
        """What `from_pretrained` needs to put a fresh head of this task on an encoder."""
        return {}

    def label_names(self, spec: Any) -> tuple[str, ...] | None:
        """The names the model's head must carry, in id order (None: the head has no named labels)."""
        return spec.label_names

    def distill_logits(self, outputs: Any) -> torch.Tensor:
        """What distillation matches between student and teacher, classes on the last axis."""
        return outputs.logits

    def distill_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Which positions of `distill_logits`' (batch, length) axes distillation averages over; None: every row once."""
        return None

    def misclassified(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Indices of the batch's examples the model gets wrong (`fisher.only_misclassified`, TFWSVD's appendix)."""
        raise NotImplementedError

    # ---- scoring
    def condense(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What evaluation keeps of one batch's `outputs` for `metrics` (default: all; an LM keeps each token's
        NLL, not its logits over the whole vocabulary)."""
        return outputs

    def metrics(self, spec: Any, outputs: Mapping[str, torch.Tensor], dataset: Any) -> dict[str, float]:
        """The task's metrics of one evaluation split, with `score` among them (better as `goal` says)."""
        raise NotImplementedError

    def baseline(self, spec: Any, dataset: Any) -> float | None:
        """The `score` of the trivial answer (majority class, all `O`, empty answers): where a collapsed model ends;
        None where a kind has none (no collapse is flagged then)."""
        raise NotImplementedError

    # ---- serving
    def serving_schema(self, spec: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], dict[str, list]]:
        """(input columns, output columns, an input example) of the MLflow pyfunc; types as mlflow names them; a
        column is (type, name) or (type, name, False) where the input may leave it out."""
        raise NotImplementedError

    def text_columns(self, frame: Any, pair: bool) -> list[str]:
        """The columns of a request `frame` that must hold strings (checked before `serve`, tasks/serving.py)."""
        raise NotImplementedError

    def serve(self, model: nn.Module, tokenizer: Any, frame: Any, max_length: int, batch_size: int, pair: bool) -> Rows:
        """One output row per input row of `frame` (a pandas DataFrame)."""
        raise NotImplementedError

    def row(self) -> dict[str, Any]:
        return {"kind": self.name, "model": self.auto_class, "outputs": list(self.outputs), "goal": self.goal, "summary": self.summary}


GOALS = ("max", "min")


def better(a: float, b: float | None, goal: str = "max") -> bool:
    """Whether score `a` beats `b` (None: nothing to beat) under `goal`: the one comparison every choice makes."""
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {GOALS}, got {goal!r}")
    return b is None or (a > b if goal == "max" else a < b)


def task_goal(task: str, custom_kind: str | None = None) -> str:
    """The goal of the task that `data.task` names (of `data.custom.kind` for the user's files)."""
    if custom_kind:
        return get_kind(custom_kind).goal
    from lowrank.data.catalog import get_task

    return get_kind(get_task(task).kind).goal


KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    """Add a kind to the table; names are unique."""
    if kind.name in KINDS:
        raise ValueError(f"task kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> TaskKind:
    """The kind called `name`; the error lists the known ones."""
    if name not in KINDS:
        raise ConfigError(f"data.custom.kind: unknown task kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


def architecture_kind(architectures: Sequence[str] | None) -> TaskKind | None:
    """The kind whose models' class names end like one of `architectures` (a model config's), if any."""
    for kind in KINDS.values():
        if any(name.endswith(kind.architecture_suffix) for name in architectures or ()):
            return kind
    return None


def kind_of_model(model: nn.Module, default: str | None = None) -> TaskKind:
    """The kind of a loaded model, from its class (a FactorizedLinear inside changes nothing); `default` for others."""
    kind = architecture_kind([type(model).__name__]) or (KINDS[default] if default else None)
    if kind is None:
        raise InputError(f"{type(model).__name__}: not a model of any task kind ({', '.join(KINDS)})")
    return kind


def auto_class(kind: TaskKind) -> Any:
    """The transformers auto class itself."""
    import transformers

    return getattr(transformers, kind.auto_class)
