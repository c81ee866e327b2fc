"""A task over the user's own files: the files of its splits, its labels read from the train file when not given.

Each kind builds its custom task from `data.custom` (lowrank/kinds); the layouts and readers are `catalog.py`'s.
What is inferred (the eval split, the labels) is said in one line on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from lowrank.config.base import note
from lowrank.data.catalog import DataError, FileFormat, SplitFile, TaskSpec, iter_records


def custom_task(
    train_file: str | Path,
    eval_file: str | Path | None,
    text_a: str,
    label: str,
    text_b: str | None = None,
    label_names: Sequence[str] | None = None,
    eval_share: float = 0.2,
    regression: bool | None = True,
) -> TaskSpec:
    """A task over the user's own CSV, TSV or JSONL files, by column name.

    The format follows the extension (`.csv`, `.tsv`, `.jsonl`/`.json` with one
    object per line); CSV and TSV need a header. CSV honours quotes, as
    spreadsheets write them; TSV does not, as GLUE writes it. Without
    `label_names` the labels are read from the train file (`infer_labels`), unless
    `regression` (then it is scored by Pearson and Spearman). Without `eval_file`,
    a seeded `eval_share` of the train file's rows is the eval split.
    """
    text_columns = (text_a,) if text_b is None else (text_a, text_b)

    def layout(path: str | Path) -> SplitFile:
        fmt = _format_of(Path(path))
        return SplitFile(str(path), text_columns, label, format=fmt, quoting=fmt == "csv")

    if label_names is None and not regression:
        label_names = infer_labels(train_file, layout(train_file), regression)
    names = None if label_names is None else tuple(str(n) for n in label_names)
    metrics = ("pearson", "spearman") if names is None else ("accuracy",)
    files, share = custom_files(train_file, eval_file, eval_share, layout)
    return TaskSpec("custom", text_columns, names, metrics, ("validation",), files, eval_from_train=share)


def custom_files(train_file: str | Path, eval_file: str | Path | None, eval_share: float,
                 layout: Callable[[str | Path], SplitFile]) -> tuple[dict[str, SplitFile], float | None]:
    """A user task's `train` and `validation` files, and the share of the train file that is the eval split when
    there is no eval file (then `validation` reads the train file, and `load_raw` splits it)."""
    files = {"train": layout(train_file), "validation": layout(eval_file or train_file)}
    if eval_file:
        return files, None
    note(f"note: no data.custom.eval_file: a seeded {eval_share:.0%} of {train_file} is the eval split, the rest trains "
         "(data.custom.eval_share, data.seed)")
    return files, eval_share


def infer_labels(path: str | Path, layout: SplitFile, regression: bool | None) -> tuple[str, ...] | None:
    """The label names of a user's train file, sorted (numerically when every label is a number), or None for a
    regression: when asked (`regression: true`), or when every label is a number and `regression` is not false.

    Says what it chose, in one line on stderr, once per file and choice.
    """
    if regression:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.custom.train_file: file not found: {path}")
    found = set()
    for line, record in iter_records(path, layout):
        if layout.label_column not in record:
            raise DataError(f"{path}:{line}: no column {layout.label_column!r}")
        found.add(str(record[layout.label_column]).strip())
    values = sorted(found)
    numbers = _as_numbers(values)
    if numbers is not None and regression is None:
        note(f"note: every label in {path} is a number, so the task is a regression (set data.custom.regression: false for classes)")
        return None
    names = tuple(v for _, v in sorted(zip(numbers, values))) if numbers is not None else tuple(values)
    note(f"note: labels from {path}: {', '.join(names)} (ids 0-{len(names) - 1}; set data.custom.label_names to choose)")
    return names


def _as_numbers(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _format_of(path: Path) -> FileFormat:
    suffix = path.suffix.lower()
    formats: dict[str, FileFormat] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
    if suffix not in formats:
        raise ValueError(f"{path}: unknown data file type {suffix!r}; use .csv, .tsv or .jsonl")
    return formats[suffix]
