"""The prepare stage's artifact, opened: the task, the tokenized splits and the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lowrank.data import loading as data_lib
from lowrank.io.files import read_json


@dataclass
class PreparedData:
    """What every training and scoring stage reads."""

    spec: data_lib.TaskSpec
    dataset: Any
    tokenizer: Any
    group_by_length: bool = False  # as `data.group_by_length` was when prepare ran (batching.json)

    @classmethod
    def open(cls, data_dir: Path) -> "PreparedData":
        from datasets import load_from_disk
        from transformers import AutoTokenizer

        if not (data_dir / "task.json").is_file():
            raise FileNotFoundError(f"prepared data not found at {data_dir}: run the prepare stage first")
        spec = data_lib.task_from_dict(read_json(data_dir / "task.json"))
        dataset = load_from_disk(str(data_dir / "dataset"))
        tokenizer = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
        batching = read_json(data_dir / "batching.json") if (data_dir / "batching.json").is_file() else {}
        return cls(spec, dataset, tokenizer, bool(batching.get("group_by_length", False)))

    @property
    def kind(self):
        """The task's kind (lowrank/kinds): how it is collated, scored and served."""
        from lowrank.kinds import get_kind

        return get_kind(self.spec.kind)

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0):
        return data_lib.make_loader(self.dataset[split], self.tokenizer, batch_size, shuffle=shuffle, seed=seed,
                                    group_by_length=self.group_by_length, collate=self.kind.collator(self.tokenizer))

    def pass_loader(self, split: str, batch_size: int, seed: int):
        """A pass over a split for statistics (Fisher, input statistics, the rank search's calibration): in the
        dataset's order, or, grouped by length, grouped batches in a seeded random order (sorted, the first
        `max_samples` rows would be the shortest)."""
        return self.loader(split, batch_size, shuffle=self.group_by_length, seed=seed)

    def baseline_score(self, splits: tuple[str, ...] | None = None) -> float | None:
        """The `score` of the kind's trivial answer (majority class, all `O`, empty answers) on `splits` (default:
        the selection split, which + ft's history scores): where a collapsed model ends; None where the kind has none."""
        splits = splits or (data_lib.SELECT,)
        scores = [self.kind.baseline(self.spec, self.dataset[s]) for s in splits]
        return None if None in scores else sum(scores) / len(scores)

    def select_fn(self, batch_size: int) -> Callable[[torch.nn.Module], dict[str, float]]:
        """Scores on the selection split: what keep_best, the epoch-0 guard and the collapse flag read."""
        if data_lib.SELECT not in self.dataset:
            raise ValueError("the prepared data has no selection split: run the prepare stage again")
        return self.evaluate_fn(batch_size, splits=(data_lib.SELECT,))

    def evaluate_fn(self, batch_size: int, report: bool = False, splits: tuple[str, ...] | None = None) -> Callable[[torch.nn.Module], dict[str, float]]:
        """Score on `splits` (default: the task's evaluation splits); `score` is the mean of their main scores.

        Only the evaluate stages score the task's own splits; a choice reads `select_fn`. With `report`, the test
        splits too (`test.<metric>`), which never count in `score`.
        The model may also be an onnxruntime session (an exported graph), scored the same way.
        """
        from lowrank.evaluation import predict
        from lowrank.io.export import predict_onnx

        kind = self.kind
        scored = splits or self.spec.eval_splits
        splits = (*scored, *(self.spec.test_splits if report else ()))

        def evaluate(model: Any) -> dict[str, float]:
            results: dict[str, float] = {}
            scores = []
            for split in splits:
                run = predict if isinstance(model, torch.nn.Module) else predict_onnx
                outputs = run(model, self.loader(split, batch_size), tuple(kind.outputs), kind.targets, kind.condense)
                split_metrics = kind.metrics(self.spec, outputs, self.dataset[split])
                if split in scored:
                    scores.append(split_metrics["score"])
                prefix = "" if len(scored) == 1 and split in scored else f"{split}."
                results.update({f"{prefix}{k}": v for k, v in split_metrics.items() if k != "score"})
            results["score"] = sum(scores) / len(scores)
            return results

        return evaluate
