"""The task registry (GLUE and user files) and the one reader of their rows.

A `TaskSpec` says everything the pipeline needs to know about a task: its text
columns, its labels, its metrics, its evaluation splits and, for each split,
which file holds it and how that file is laid out. The GLUE files carry a few
traps (CoLA has no header, MRPC's header starts with a byte-order mark, MNLI's
dev files have more columns than its train file, quotes are literal text), so
the layout is written down per file here instead of being guessed at read time.

Every reading error names the file and the line, so a broken row is found
without a debugger. Each task kind reads its rows (lowrank/kinds); the layouts
and the shared readers (UTF-8 check, TSV/CSV/JSONL records) live here, a user's
own files in `custom.py`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from lowrank.config.base import InputError

Column = int | str  # a position (files without a header) or a header / JSON key name
FileFormat = Literal["tsv", "csv", "jsonl", "conll", "squad", "text"]  # the last three: token, span and lm kinds (lowrank/kinds)


class DataError(InputError):
    """A data file that cannot be read as its task says: the message starts with `file:line`."""


@dataclass(frozen=True)
class SplitFile:
    """Where one split lives and how its columns are read.

    `path` is relative to the task's GLUE folder for GLUE tasks and a path of
    its own for user tasks. `num_columns` is only needed (and only allowed)
    without a header, where it is the only check that a row is whole; with a
    header, every row must have as many fields as the header. `quoting` is off
    for GLUE: its TSVs hold literal `"` characters, and reading them as CSV
    quotes silently merges rows.
    """

    path: str
    text_columns: tuple[Column, ...]
    label_column: Column
    format: FileFormat = "tsv"
    header: bool = True
    num_columns: int | None = None
    quoting: bool = False

    def __post_init__(self) -> None:
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"{self.path}: a task has one or two text columns, got {self.text_columns}")
        columns = (*self.text_columns, self.label_column)
        if self.format in ("conll", "squad", "text"):
            return  # read by their kind's own reader, which knows the columns
        if self.header or self.format == "jsonl":
            if self.num_columns is not None:
                raise ValueError(f"{self.path}: num_columns is only for files without a header")
            if self.format == "jsonl" and not all(isinstance(c, str) for c in columns):
                raise ValueError(f"{self.path}: JSONL columns are keys, got {columns}")
        else:
            if self.num_columns is None or not all(isinstance(c, int) for c in columns):
                raise ValueError(f"{self.path}: a file without a header needs num_columns and column positions")
            if max(columns) >= self.num_columns:
                raise ValueError(f"{self.path}: column position {max(columns)} beyond {self.num_columns} columns")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its kind (lowrank/kinds: `sequence` classification or regression, `token`, `span`) and its files.

    Attributes:
        name: registry name (`sst2`, ... or `custom`); also the hub config name for GLUE.
        text_fields: names of the text columns in the hub dataset (GLUE) or the
            user's files; one name for single sentences, two for pairs.
        label_names: the classes' names; the class at position i gets id i. None for
            regression. For GLUE the order and the names are the hub's, so hub labels
            need no mapping (SST-2: negative, positive).
        label_values: the labels as written in the files, in the same order, where they
            differ from the names (GLUE's binary files write 0 and 1).
        metrics: what `metrics.compute_metrics` reports; their mean is the score.
        eval_splits: the splits scored after training (MNLI has two).
        files: the file of `train` and of every evaluation split.
        glue_folder: the task's folder under the GLUE directory; None for user files.
        label_range: inclusive bounds a regression label must lie in, if any.
        allow_empty_text: QQP's official train file has two rows with an empty
            question; refusing them would refuse the task, so QQP allows it.
        kind: the task kind's registry name; it reads the rows, builds features, scores.
        home: for a task shipped as files outside GLUE (CoNLL-2003), the environment
            variable naming its folder and the folder used when it is unset.
        test_splits: splits only the evaluate stages score (reported, never used to
            select a model), e.g. CoNLL-2003's test split.
        eval_from_train: the first eval split is this seeded share of the train file's
            rows (the rest trains), for a user who gave one file; its file is the train file.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...]
    files: Mapping[str, SplitFile] = field(hash=False)
    glue_folder: str | None = None
    label_range: tuple[float, float] | None = None
    allow_empty_text: bool = False
    kind: str = "sequence"
    home: tuple[str, str] | None = None
    test_splits: tuple[str, ...] = ()
    eval_from_train: float | None = None
    label_values: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        missing = [s for s in self.splits if s not in self.files]
        if missing:
            raise ValueError(f"task {self.name}: no file given for split(s) {', '.join(missing)}")
        names = self.label_names
        if names is not None and (not names or len(set(names)) != len(names)):
            raise ValueError(f"task {self.name}: label names must be distinct and non-empty, got {self.label_names}")
        for split, spec in self.files.items():
            if len(spec.text_columns) != len(self.text_fields):
                raise ValueError(f"task {self.name}, split {split}: {len(self.text_fields)} text fields but columns {spec.text_columns}")

    @property
    def label_ids(self) -> dict[str, int] | None:
        """A label as written in the files -> its class id; None for regression."""
        if self.label_names is None:
            return None
        return {value: i for i, value in enumerate(self.label_values or self.label_names)}

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def num_labels(self) -> int:
        """Outputs of the model head: one score for regression, one logit per class otherwise."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.eval_splits, *self.test_splits)

    @property
    def reported_splits(self) -> tuple[str, ...]:
        """What the evaluate stages report: the task's own test split where it has one (CoNLL-2003, whose dev split
        selects), else its dev split."""
        return self.test_splits or self.eval_splits


# --------------------------------------------------------------------------- GLUE registry

_BINARY = ("0", "1")  # as the binary tasks' files write their labels; each task names its two classes (the hub's names)
_NLI2 = ("entailment", "not_entailment")


def _glue(
    name: str,
    folder: str,
    text_fields: tuple[str, ...],
    text_columns: tuple[Column, ...],
    label_column: Column,
    label_names: tuple[str, ...] | None,
    metrics: tuple[str, ...],
    dev_files: Mapping[str, str] | None = None,
    **extra: Any,
) -> TaskSpec:
    """A GLUE task whose train and dev files share one layout (true of all but MNLI's column count)."""
    dev_files = dev_files or {"validation": "dev.tsv"}
    header = not extra.pop("no_header", False)
    num_columns = extra.pop("num_columns", None)

    def layout(path: str) -> SplitFile:
        return SplitFile(path, text_columns, label_column, header=header, num_columns=num_columns)

    files = {"train": layout("train.tsv"), **{split: layout(path) for split, path in dev_files.items()}}
    return TaskSpec(name, text_fields, label_names, metrics, tuple(dev_files), files, folder, **extra)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        # CoLA: no header; columns are source, label, the original author's mark, sentence.
        _glue("cola", "CoLA", ("sentence",), (3,), 1, ("unacceptable", "acceptable"), ("matthews_correlation",), no_header=True,
              num_columns=4, label_values=_BINARY),
        _glue("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive"), ("accuracy",), label_values=_BINARY),
        # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String (header with a BOM, hence utf-8-sig).
        _glue("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"),
              ("f1", "accuracy"), label_values=_BINARY),
        # STS-B: ten columns, the pair at 7 and 8, the 0-5 score last.
        _glue("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"), label_range=(0.0, 5.0)),
        # QQP: id, qid1, qid2, question1, question2, is_duplicate.
        _glue("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"),
              ("f1", "accuracy"), allow_empty_text=True, label_values=_BINARY),
        # MNLI: 12 columns in train, 16 in dev (five annotator labels); sentence1/2 at 8/9, gold_label last.
        _glue(
            "mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
            ("entailment", "neutral", "contradiction"), ("accuracy",),
            dev_files={"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
        ),
        _glue("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", _NLI2, ("accuracy",)),
        _glue("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", _NLI2, ("accuracy",)),
        # WNLI: 1 = entailment, 0 = not, matching the hub's class ids.
        _glue("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"), ("accuracy",),
              label_values=_BINARY),
    )
}


# CoNLL-2003 English NER (README of ../shared/data/conll2003): `word tag` lines, tags in the hub's id order;
# dev selects (eval_splits), test is only reported (test_splits).
CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
TASKS["conll2003"] = TaskSpec(
    "conll2003", ("tokens",), CONLL_TAGS, ("f1", "precision", "recall", "accuracy"), ("validation",),
    {split: SplitFile(f"{name}.txt", ("tokens",), "tags", format="conll") for split, name in
     (("train", "train"), ("validation", "dev"), ("test", "test"))},
    kind="token", home=("CONLL_DIR", "../shared/data/conll2003"), test_splits=("test",),
)


def _normalize(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch not in "-_ ")


def get_task(name: str) -> TaskSpec:
    """The registered task called `name`, accepting the usual spellings (`SST-2`, `sts-b`, `MNLI`, `CoNLL-2003`)."""
    key = _normalize(name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or 'custom' with data.custom)")
    return TASKS[key]


def task_to_dict(spec: TaskSpec) -> dict[str, Any]:
    """JSON-ready form, saved with the prepared data so later stages need no registry lookup."""
    return asdict(spec)


def task_from_dict(data: Mapping[str, Any]) -> TaskSpec:
    """Inverse of `task_to_dict` (JSON turns tuples into lists; this turns them back)."""
    data = dict(data)
    files = {
        split: SplitFile(**{**f, "text_columns": tuple(f["text_columns"])}) for split, f in data.pop("files").items()
    }
    for key in ("text_fields", "metrics", "eval_splits", "label_names", "label_range", "home", "test_splits", "label_values"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return TaskSpec(files=files, **data)


# --------------------------------------------------------------------------- reading


def split_path(spec: TaskSpec, split: str, glue_dir: str | Path | None = None) -> Path:
    """The file of `split`: under `glue_dir/<folder>/` for GLUE, as given for user tasks."""
    if split not in spec.files:
        raise ValueError(f"task {spec.name} has no split {split!r}; splits: {', '.join(spec.splits)}")
    relative = spec.files[split].path
    if spec.home is not None:
        variable, default = spec.home
        return Path(os.environ.get(variable) or default).expanduser() / relative
    if spec.glue_folder is None:
        return Path(relative).expanduser()
    if glue_dir is None:
        raise ValueError(f"task {spec.name}: reading GLUE files needs a glue_dir")
    return Path(glue_dir).expanduser() / spec.glue_folder / relative


def check_utf8(path: Path) -> None:
    """DataError at `file:line` unless the whole file decodes as UTF-8 (a fraction of a second for GLUE's largest)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); save the file as UTF-8") from None


def iter_records(path: Path, layout: SplitFile) -> Iterator[tuple[int, dict[Column, Any]]]:
    """(line number, record) for each data row; records are keyed by column name or position."""
    check_utf8(path)
    if layout.format == "jsonl":
        yield from _iter_jsonl(path)
    else:
        yield from _iter_delimited(path, layout)


def _csv_reader(handle: Any, layout: SplitFile) -> Any:
    delimiter = "," if layout.format == "csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if layout.quoting else csv.QUOTE_NONE
    return csv.reader(handle, delimiter=delimiter, quoting=quoting)


def _iter_delimited(path: Path, layout: SplitFile) -> Iterator[tuple[int, dict[Column, Any]]]:
    # utf-8-sig drops the BOM that MRPC's header starts with; without it the
    # first column would be called "\ufeffQuality".
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = _csv_reader(handle, layout)
        names: list[Column] = list(range(layout.num_columns or 0))
        if layout.header:
            names = next(reader, [])
            absent = [c for c in (*layout.text_columns, layout.label_column) if c not in names]
            if absent:
                raise DataError(f"{path}:1: no column {absent[0]!r} in header {names}")
        try:
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(names):
                    raise DataError(f"{path}:{reader.line_num}: expected {len(names)} columns, found {len(fields)}")
                yield reader.line_num, dict(zip(names, fields))
        except csv.Error as err:  # a field over csv's limit (131,072 characters), a stray quote...
            raise DataError(f"{path}:{reader.line_num}: {err}") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[Column, Any]]]:
    with open(path, encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON: {err.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record
