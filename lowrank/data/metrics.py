"""GLUE task metrics, computed from logits and labels."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lowrank.data.catalog import TaskSpec


def _predictions(spec: TaskSpec, logits: torch.Tensor) -> np.ndarray:
    if spec.is_regression:
        return logits.reshape(-1).double().numpy()
    return logits.argmax(dim=-1).numpy()


def _metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    if name == "accuracy":
        return float(accuracy_score(labels, predictions))
    if name == "f1":
        return float(f1_score(labels, predictions, pos_label=1, zero_division=0))
    if name == "matthews_correlation":
        return float(matthews_corrcoef(labels, predictions))
    if np.std(predictions) == 0 or np.std(labels) == 0:  # a constant prediction has no correlation
        return 0.0
    if name == "pearson":
        return float(pearsonr(predictions, labels)[0])
    if name == "spearman":
        return float(spearmanr(predictions, labels)[0])
    raise ValueError(f"unknown metric {name!r}")


def compute_metrics(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Each of the task's metrics, plus `score`: their mean, the number GLUE averages."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels")
    predictions = _predictions(spec, logits)
    truth = labels.double().numpy() if spec.is_regression else labels.long().numpy()
    results = {name: _metric(name, predictions, truth) for name in spec.metrics}
    results["score"] = float(np.mean(list(results.values())))
    return results


def majority_score(spec: TaskSpec, labels: torch.Tensor) -> float:
    """The score of one answer for every example: the most frequent class (a regression's constant scores 0)."""
    if spec.is_regression:
        return compute_metrics(spec, torch.zeros(len(labels), 1), labels)["score"]
    classes = len(spec.label_names)
    logits = torch.zeros(len(labels), classes)
    logits[:, int(torch.bincount(labels.long(), minlength=classes).argmax())] = 1.0
    return compute_metrics(spec, logits, labels)["score"]
