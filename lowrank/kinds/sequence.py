"""The `sequence` kind: one label (or one score) per sentence or sentence pair; GLUE and the user's CSV/TSV/JSONL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from lowrank.data.catalog import Column, DataError, SplitFile, TaskSpec, iter_records
from lowrank.kinds.registry import Rows, TaskKind, register_kind


def read_sequence_rows(spec: TaskSpec, path: Path, layout: SplitFile) -> list[dict[str, Any]]:
    """Rows of a sequence task's file as `{"text_a", ["text_b",] "label"}`, every row checked.

    Labels become ids (`spec.label_ids`: GLUE's 0 and 1 as written, a user's labels by name) or, for regression,
    floats. Blank lines are skipped; anything else malformed raises a
    `DataError` naming the file and line.
    """
    label_ids = spec.label_ids
    rows = []
    for line, record in iter_records(path, layout):
        texts = [_text(record, column, spec, path, line) for column in layout.text_columns]
        row: dict[str, Any] = {"text_a": texts[0]}
        if len(texts) == 2:
            row["text_b"] = texts[1]
        raw_label = _field(record, layout.label_column, path, line)
        row["label"] = _label(raw_label, spec, label_ids, path, line)
        rows.append(row)
    return rows


def _field(record: dict[Column, Any], column: Column, path: Path, line: int) -> Any:
    if column not in record:
        raise DataError(f"{path}:{line}: no column {column!r}")
    return record[column]


def _text(record: dict[Column, Any], column: Column, spec: TaskSpec, path: Path, line: int) -> str:
    value = _field(record, column, path, line)
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: column {column!r} should hold text, got {value!r}")
    if not value.strip() and not spec.allow_empty_text:
        raise DataError(f"{path}:{line}: empty text in column {column!r}")
    return value


def _label(value: Any, spec: TaskSpec, label_ids: dict[str, int] | None, path: Path, line: int) -> int | float:
    if label_ids is None:
        return _score(value, spec, path, line)
    key = value.strip() if isinstance(value, str) else str(value)
    if key not in label_ids:
        raise DataError(f"{path}:{line}: label {value!r} is not one of {', '.join(map(repr, label_ids))}")
    return label_ids[key]


def _score(value: Any, spec: TaskSpec, path: Path, line: int) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{line}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise DataError(f"{path}:{line}: score {value!r} is not finite")
    if spec.label_range is not None:
        low, high = spec.label_range
        if not low <= score <= high:
            raise DataError(f"{path}:{line}: score {score} outside [{low:g}, {high:g}]")
    return score


class SequenceKind(TaskKind):
    name = "sequence"
    auto_class = "AutoModelForSequenceClassification"
    outputs = {"logits": {0: "batch"}}
    targets = ("labels",)
    summary = "classification or regression of a sentence or a pair (GLUE, CSV/TSV/JSONL); score: mean of the task's metrics"

    def read_rows(self, spec: Any, path: Any, layout: Any) -> Rows:
        return read_sequence_rows(spec, path, layout)

    def raw_features(self, spec: Any) -> Any:
        """The raw columns; float64 keeps STS-B scores exactly as written."""
        from datasets import Features, Value

        columns = {"text_a": Value("string")}
        if spec.is_pair:
            columns["text_b"] = Value("string")
        columns["label"] = Value("float64") if spec.is_regression else Value("int64")
        return Features(columns)

    def encode(self, dataset: Any, spec: Any, tokenizer: Any, max_length: int, split: str) -> Any:
        """Labels are int64 class ids, or float32 scores for regression (the dtype of the model's output, as its MSE loss wants)."""
        from datasets import Value

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = (batch["text_a"], batch["text_b"]) if spec.is_pair else (batch["text_a"],)
            encoded = dict(tokenizer(*texts, truncation=True, max_length=max_length))
            encoded["labels"] = batch["label"]
            return encoded

        mapped = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {split}")
        return mapped.cast_column("labels", Value("float32") if spec.is_regression else Value("int64"))

    def custom_task(self, custom: Any) -> Any:
        from lowrank.config.base import check
        from lowrank.data.custom import custom_task

        check(custom.text_a is not None and custom.label is not None, "data.custom", "a sequence task needs text_a and label")
        return custom_task(custom.train_file, custom.eval_file, custom.text_a, custom.label, custom.text_b, custom.label_names,
                           custom.eval_share, custom.regression)

    def head_kwargs(self, spec: Any) -> dict[str, Any]:
        names = spec.label_names
        if not names:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}

    def misclassified(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if logits.shape[-1] == 1:
            raise ValueError("fisher.only_misclassified: needs a classification task, this model is a regressor")
        return (logits.argmax(-1) != batch["labels"]).nonzero().flatten()

    def metrics(self, spec: Any, outputs: Mapping[str, torch.Tensor], dataset: Any) -> dict[str, float]:
        from lowrank.data.metrics import compute_metrics

        return compute_metrics(spec, outputs["logits"], outputs["labels"])

    def baseline(self, spec: Any, dataset: Any) -> float:
        from lowrank.data.metrics import majority_score

        return majority_score(spec, torch.tensor(dataset["labels"]))

    def serving_schema(self, spec: Any) -> tuple[list, list, dict]:
        inputs = [("string", "text")] + ([("string", "text_pair")] if spec.is_pair else [])
        outputs = [("double", "score")] if spec.is_regression else [("string", "label"), ("double", "score")]
        return inputs, outputs, EXAMPLES[spec.is_pair]

    def text_columns(self, frame: Any, pair: bool) -> list[str]:
        return ["text", "text_pair"] if pair else ["text"]

    def serve(self, model: nn.Module, tokenizer: Any, frame: Any, max_length: int, batch_size: int, pair: bool) -> Rows:
        """`label` (the class name) and `score` (its probability), or for a regression `score` alone (the value)."""
        columns = ["text", "text_pair"] if pair else ["text"]
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"input needs the column(s) {missing}; got {list(frame.columns)}")
        texts = [frame[c].astype(str).tolist() for c in columns]
        regression = model.config.problem_type == "regression" or model.config.num_labels == 1
        rows: Rows = []
        for start in range(0, len(frame), batch_size):
            batch = [t[start:start + batch_size] for t in texts]
            encoded = tokenizer(*batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            with torch.inference_mode():
                logits = model(**encoded).logits.float()
            if regression:
                rows += [{"score": float(v)} for v in logits[:, 0]]
            else:
                probs = logits.softmax(-1)
                best = probs.argmax(-1)
                names = model.config.id2label
                rows += [{"label": str(names[int(i)]), "score": float(p[i])} for i, p in zip(best, probs)]
        return rows


EXAMPLES = {
    False: {"text": ["a gripping, funny and moving film", "the plot goes nowhere"]},
    True: {"text": ["The company reported higher profits.", "He left early."],
           "text_pair": ["Profits at the company rose.", "The meeting ran late."]},
}

SEQUENCE = register_kind(SequenceKind())
