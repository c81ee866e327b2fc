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

    @classmethod
    def open(cls, data_dir: Path) -> "PreparedData":
        from datasets import load_from_disk
        from transformers import AutoTokenizer

        if not (data_dir / "task.json").is_file():
            raise FileNotFoundError(f"prepared data not found at {data_dir}: run the prepare stage first")
        spec = data_lib.task_from_dict(read_json(data_dir / "task.json"))
        dataset = load_from_disk(str(data_dir / "dataset"))
        tokenizer = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
        return cls(spec, dataset, tokenizer)

    @property
    def label_names(self) -> list[str] | None:
        return list(self.spec.label_names) if self.spec.label_names else None

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0):
        return data_lib.make_loader(self.dataset[split], self.tokenizer, batch_size, shuffle=shuffle, seed=seed)

    def majority_score(self) -> float:
        """The `score` of answering the eval splits' most frequent class everywhere: where a collapsed model ends."""
        import torch

        from lowrank.data.metrics import majority_score

        splits = self.spec.eval_splits
        return sum(majority_score(self.spec, torch.tensor(self.dataset[s]["labels"])) for s in splits) / len(splits)

    def evaluate_fn(self, batch_size: int) -> Callable[[torch.nn.Module], dict[str, float]]:
        """Score on every evaluation split; `score` is the mean of their main scores."""
        from lowrank.data.metrics import compute_metrics
        from lowrank.evaluation import predict

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            results: dict[str, float] = {}
            scores = []
            for split in self.spec.eval_splits:
                logits, labels = predict(model, self.loader(split, batch_size))
                split_metrics = compute_metrics(self.spec, logits, labels)
                scores.append(split_metrics["score"])
                prefix = "" if len(self.spec.eval_splits) == 1 else f"{split}."
                results.update({f"{prefix}{k}": v for k, v in split_metrics.items() if k != "score"})
            results["score"] = sum(scores) / len(scores)
            return results

        return evaluate
