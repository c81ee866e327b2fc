"""From a task to batches: check the sources, load and subsample the splits, tokenize, collate.

The raw splits come from local files (GLUE folder, CoNLL-2003 or the user's
files) or, when no GLUE folder is configured, from the hub copy of GLUE; either
way they have the columns the task's kind reads (`text_a`, `text_b` for pairs,
`label` for a sequence task), so nothing downstream knows the difference. The
task table lives in `catalog.py`, each kind's rows, features and collation in
lowrank/kinds; this module re-exports what the stages use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features
from torch.utils.data import DataLoader

from lowrank.config import DataConfig, MissingInputError
from lowrank.data.custom import custom_task
from lowrank.data.catalog import (
    TASKS,
    DataError,
    SplitFile,
    TaskSpec,
    get_task,
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
    "SELECT",
    "hold_out",
    "subsample_indices",
    "task_from_dict",
    "task_to_dict",
    "tokenize",
]

HUB_DATASET = "nyu-mll/glue"
SELECT = "select"  # the split every choice reads; the task's eval splits are the reported ones


# --------------------------------------------------------------------------- sources


def read_split(spec: TaskSpec, split: str, glue_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of one split, as the task's kind reads them (lowrank/kinds), every row checked."""
    from lowrank.kinds import get_kind

    path = split_path(spec, split, glue_dir)
    if not path.is_file():
        raise MissingInputError(f"task {spec.name}, split {split}: file not found: {path}")
    rows = get_kind(spec.kind).read_rows(spec, path, spec.files[split])
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def resolve_task(cfg: DataConfig) -> TaskSpec:
    """The task that the `data` section names: a GLUE task, or `custom` built from `data.custom`."""
    if cfg.custom is not None:
        from lowrank.kinds import get_kind

        return get_kind(cfg.custom.kind).custom_task(cfg.custom)
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
        from lowrank.io import hub

        if hub.offline():
            raise DataError(
                f"data.glue_dir: task {spec.name} would be read from the hub ({HUB_DATASET}), which is offline "
                "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, or no answer): set GLUE_DIR or data.glue_dir to a GLUE folder"
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


def check_sources(cfg: DataConfig) -> dict[str, Path]:
    """`check_files` for the `data` section: what preflight calls before anything runs."""
    return check_files(resolve_task(cfg), cfg.resolved_glue_dir())


# --------------------------------------------------------------------------- raw splits


def raw_features(spec: TaskSpec) -> Features:
    """The raw columns, as the task's kind reads them."""
    from lowrank.kinds import get_kind

    return get_kind(spec.kind).raw_features(spec)


def subsample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """A random `limit` of `range(n)`, in file order; the same seed always picks the same rows."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise ValueError(f"a sample limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=limit, replace=False).tolist())


def hold_out(n: int, share: float, max_rows: int, seed: int, stream: int = 1) -> tuple[list[int], list[int]]:
    """Split `range(n)` into (rows to train on, rows held out to select on), each in file order.

    The held-out rows are a seeded `share` of them, at most `max_rows`; at least one row stays on each side.
    `stream` keeps two hold-outs of the same rows apart (1: the selection split, 2: a user's eval split).
    """
    if n < 2:
        raise DataError(f"the training split has {n} row(s): at least 2 are needed to hold some out for validation")
    size = min(max_rows, max(1, round(share * n)), n - 1)
    held = set(np.random.default_rng([seed, stream]).choice(n, size=size, replace=False).tolist())  # a stream of its own
    return [i for i in range(n) if i not in held], sorted(held)


def load_raw(
    spec: TaskSpec,
    glue_dir: str | Path | None = None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    validation: tuple[float, int] = (0.1, 1000),
) -> DatasetDict:
    """`train`, `select` and the task's evaluation and test (reported) splits, each subsampled (None = all rows).

    `select` is the split every choice reads: the task's dev split when the task reports a test split of its
    own, else `validation = (share, max_rows)` of the training rows, held out before `max_train_samples` draws
    from the rest. A task with `eval_from_train` (one user file) takes its eval split from the train file first,
    by a seeded share. Every file is checked before the first is read, so a missing dev file fails before the (long)
    train file is parsed.
    """
    from_hub = reads_from_hub(spec, glue_dir)
    if not from_hub:
        check_files(spec, glue_dir)

    def rows_of(split: str) -> Dataset:
        if from_hub:
            return _load_hub_split(spec, split)
        return Dataset.from_list(read_split(spec, split, glue_dir), features=raw_features(spec))

    def sample(dataset: Dataset, limit: int | None) -> Dataset:
        return dataset.select(subsample_indices(len(dataset), limit, seed)).flatten_indices()

    train = rows_of("train")
    carved = {}  # eval splits taken from the train file (a user who gave one file)
    if spec.eval_from_train is not None:
        kept, held = hold_out(len(train), spec.eval_from_train, len(train), seed, stream=2)
        train, carved[spec.eval_splits[0]] = train.select(kept).flatten_indices(), train.select(held).flatten_indices()
    if spec.test_splits:  # a test split is reported: the task's own dev split selects (CoNLL-2003)
        select = rows_of(spec.eval_splits[0])
    else:
        kept, held = hold_out(len(train), *validation, seed)
        train, select = train.select(kept).flatten_indices(), train.select(held).flatten_indices()
    splits = {"train": sample(train, max_train_samples), SELECT: sample(select, max_eval_samples)}
    for split in (*spec.eval_splits, *spec.test_splits):
        splits[split] = sample(carved[split] if split in carved else rows_of(split), max_eval_samples)
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
        validation=(cfg.validation.share, cfg.validation.max_rows),
    )


# --------------------------------------------------------------------------- model inputs


def tokenize(raw: DatasetDict, spec: TaskSpec, tokenizer: Any, max_length: int) -> DatasetDict:
    """Token ids (truncated to `max_length`, not padded) and the labels of every split, as the task's kind builds them.

    Padding waits for the collator, so each batch is only as long as its longest row.
    """
    from lowrank.kinds import get_kind

    kind = get_kind(spec.kind)
    return DatasetDict({split: kind.encode(dataset, spec, tokenizer, max_length, split) for split, dataset in raw.items()})


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


def keep_parts(parts: dict[str, list[torch.Tensor]], *named: dict[str, torch.Tensor]) -> None:
    """Add one batch's named tensors (on the CPU) to the lists `gather` joins."""
    for tensors in named:
        for name, value in tensors.items():
            parts.setdefault(name, []).append(value.cpu())


def gather(parts: dict[str, list[torch.Tensor]], loader: Any) -> dict[str, torch.Tensor]:
    """Per-batch outputs of a pass over `loader` joined along the batch, in the dataset's order; per-token ones
    padded to the longest batch (logits with 0, labels with -100: padding is never scored)."""
    joined = {}
    for name, tensors in parts.items():
        longest = max(t.shape[1] for t in tensors) if tensors[0].dim() > 1 else 0
        fill = 0.0 if tensors[0].is_floating_point() else -100
        padded = [t if t.dim() == 1 or t.shape[1] == longest else
                  torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1]), value=fill) for t in tensors]
        joined[name] = torch.cat(padded)
    return dict(zip(joined, in_dataset_order(loader, *joined.values())))


def make_loader(
    dataset: Dataset, tokenizer: Any, batch_size: int, shuffle: bool = False, seed: int = 0, group_by_length: bool = False,
    collate: Any = None,
) -> DataLoader:
    """Batches of tensors that `model(**batch)` takes, each padded to its longest row.

    With `shuffle`, the order comes from its own generator seeded by `seed`:
    the same seed gives the same batches whatever else used the global RNG.
    With `group_by_length`, rows of similar length share a batch, so little of it is padding: shuffled,
    transformers' LengthGroupedSampler (random mega-batches of 50 batches, each sorted by length); not
    shuffled, every row sorted by length (`loader.sampler.order` gives the way back).
    `collate` pads the rows (the task kind's collator; default: transformers' DataCollatorWithPadding).
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
        collate_fn=collate or DataCollatorWithPadding(tokenizer, return_tensors="pt"),
    )
