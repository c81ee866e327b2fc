"""From a task to batches: check the sources, load and subsample the splits, tokenize, collate.

The raw splits come from local files (GLUE folder or the user's files) or,
when no GLUE folder is configured, from the hub copy of GLUE; either way they
have the same columns (`text_a`, `text_b` for pairs, `label`), so nothing
downstream knows the difference. The task registry and the file reader live
in `glue.py`; this module re-exports what the stages use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Value
from torch.utils.data import DataLoader

from lowrank.config import DataConfig, MissingInputError
from lowrank.data.tasks import (
    TASKS,
    DataError,
    SplitFile,
    TaskSpec,
    custom_task,
    get_task,
    read_split,
    split_path,
    task_from_dict,
    task_to_dict,
)

__all__ = [
    "TASKS",
    "DataError",
    "SplitFile",
    "TaskSpec",
    "check_files",
    "check_sources",
    "custom_task",
    "get_task",
    "load_raw",
    "load_raw_from_config",
    "make_loader",
    "read_split",
    "resolve_task",
    "subsample_indices",
    "task_from_dict",
    "task_to_dict",
    "tokenize",
]

HUB_DATASET = "nyu-mll/glue"


# --------------------------------------------------------------------------- sources


def resolve_task(cfg: DataConfig) -> TaskSpec:
    """The task that the `data` section names: a GLUE task, or `custom` built from `data.custom`."""
    if cfg.custom is not None:
        c = cfg.custom
        return custom_task(c.train_file, c.eval_file, c.text_a, c.label, c.text_b, c.label_names)
    return get_task(cfg.task)


def reads_from_hub(spec: TaskSpec, glue_dir: str | Path | None) -> bool:
    """GLUE tasks come from the hub only when no GLUE folder is given; user files never do."""
    return spec.glue_folder is not None and glue_dir is None


def check_files(spec: TaskSpec, glue_dir: str | Path | None = None) -> dict[str, Path]:
    """Check that every split's file exists and reads as its task says; returns them by split.

    Parses every row (encoding, columns, labels, empty texts), which is cheap
    enough to run before any work; a bad row fails naming `file:line`. Returns
    {} when the task will come from the hub. All missing files are named in
    one error.
    """
    if reads_from_hub(spec, glue_dir):
        if _hub_offline():
            raise DataError(
                f"data.glue_dir: task {spec.name} would be read from the hub ({HUB_DATASET}), which is offline "
                "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): set GLUE_DIR or data.glue_dir to a GLUE folder"
            )
        return {}
    if glue_dir is not None and spec.glue_folder is not None and not Path(glue_dir).expanduser().is_dir():
        raise MissingInputError(f"data.glue_dir: GLUE folder not found: {glue_dir}")
    paths = {split: split_path(spec, split, glue_dir) for split in spec.splits}
    missing = [f"{split}: {path}" for split, path in paths.items() if not path.exists()]
    if missing:
        raise MissingInputError(f"task {spec.name}: data file(s) not found: {'; '.join(missing)}")
    for split, path in paths.items():
        if not path.is_file():  # a folder, /dev/zero, a pipe: reading it would fail or never end
            raise DataError(f"task {spec.name}, split {split}: {path} is not a regular file")
    for split in paths:
        read_split(spec, split, glue_dir)  # every row parsed: SST-2's 68,000 in 0.15 s, so a bad row fails now
    return paths


def _hub_offline() -> bool:
    return any(os.environ.get(key, "").lower() in ("1", "true", "yes", "on") for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def check_sources(cfg: DataConfig) -> dict[str, Path]:
    """`check_files` for the `data` section: what preflight calls before anything runs."""
    return check_files(resolve_task(cfg), cfg.resolved_glue_dir())


# --------------------------------------------------------------------------- raw splits


def raw_features(spec: TaskSpec) -> Features:
    """The raw columns; float64 keeps STS-B scores exactly as written."""
    columns = {"text_a": Value("string")}
    if spec.is_pair:
        columns["text_b"] = Value("string")
    columns["label"] = Value("float64") if spec.is_regression else Value("int64")
    return Features(columns)


def subsample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """A random `limit` of `range(n)`, in file order; the same seed always picks the same rows."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise ValueError(f"a sample limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=limit, replace=False).tolist())


def load_raw(
    spec: TaskSpec,
    glue_dir: str | Path | None = None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
) -> DatasetDict:
    """`train` plus the task's evaluation splits, each subsampled (None = all rows).

    Every file is checked before the first is read, so a missing dev file
    fails before the (long) train file is parsed.
    """
    from_hub = reads_from_hub(spec, glue_dir)
    if not from_hub:
        check_files(spec, glue_dir)
    splits = {}
    for split in spec.splits:
        limit = max_train_samples if split == "train" else max_eval_samples
        if from_hub:
            dataset = _load_hub_split(spec, split)
            splits[split] = dataset.select(subsample_indices(len(dataset), limit, seed)).flatten_indices()
        else:
            rows = read_split(spec, split, glue_dir)
            chosen = [rows[i] for i in subsample_indices(len(rows), limit, seed)]
            splits[split] = Dataset.from_list(chosen, features=raw_features(spec))
    return DatasetDict(splits)


def _load_hub_split(spec: TaskSpec, split: str) -> Dataset:
    """One GLUE split from the hub, renamed to the raw columns. The hub's class ids equal ours."""
    from datasets import load_dataset

    dataset = load_dataset(HUB_DATASET, spec.name, split=split)
    renamed = dict(zip(spec.text_fields, ("text_a", "text_b")))
    dataset = dataset.select_columns([*spec.text_fields, "label"]).rename_columns(renamed)
    return dataset.cast(raw_features(spec))


def load_raw_from_config(cfg: DataConfig, spec: TaskSpec | None = None) -> DatasetDict:
    """`load_raw` with the sizes, seed and GLUE folder of the `data` section."""
    return load_raw(
        spec or resolve_task(cfg),
        cfg.resolved_glue_dir(),
        max_train_samples=cfg.max_train_samples,
        max_eval_samples=cfg.max_eval_samples,
        seed=cfg.seed,
    )


# --------------------------------------------------------------------------- model inputs


def tokenize(raw: DatasetDict, spec: TaskSpec, tokenizer: Any, max_length: int) -> DatasetDict:
    """Token ids (truncated to `max_length`, not padded) and `labels` for every split.

    Padding waits for the collator, so each batch is only as long as its
    longest row. Labels are int64 class ids, or float32 scores for regression
    (the dtype of the model's output, as its MSE loss wants).
    """
    label_type = Value("float32") if spec.is_regression else Value("int64")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = (batch["text_a"], batch["text_b"]) if spec.is_pair else (batch["text_a"],)
        encoded = dict(tokenizer(*texts, truncation=True, max_length=max_length))
        encoded["labels"] = batch["label"]
        return encoded

    out = {}
    for split, dataset in raw.items():
        mapped = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {split}")
        out[split] = mapped.cast_column("labels", label_type)
    return DatasetDict(out)


class SortedSampler(torch.utils.data.Sampler[int]):
    """Every index once, shortest row first; `order` lets a caller put outputs back in the dataset's order."""

    def __init__(self, lengths: list[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lengths.__getitem__)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def in_dataset_order(loader: Any, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs of a pass over `loader` put back in the dataset's order when the loader sorted rows by length."""
    order = getattr(getattr(loader, "sampler", None), "order", None)
    if order is None:
        return outputs
    where = torch.as_tensor(order)
    return tuple(torch.empty_like(out).index_copy_(0, where, out) for out in outputs)


def make_loader(
    dataset: Dataset, tokenizer: Any, batch_size: int, shuffle: bool = False, seed: int = 0, group_by_length: bool = False,
) -> DataLoader:
    """Batches of tensors that `model(**batch)` takes, each padded to its longest row.

    With `shuffle`, the order comes from its own generator seeded by `seed`:
    the same seed gives the same batches whatever else used the global RNG.
    With `group_by_length`, rows of similar length share a batch, so little of it is padding: shuffled,
    transformers' LengthGroupedSampler (random mega-batches of 50 batches, each sorted by length); not
    shuffled, every row sorted by length (`loader.sampler.order` gives the way back).
    """
    from transformers import DataCollatorWithPadding
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    sampler = None
    if group_by_length:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator) if shuffle else SortedSampler(lengths)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        collate_fn=DataCollatorWithPadding(tokenizer, return_tensors="pt"),
    )
