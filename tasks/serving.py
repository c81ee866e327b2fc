"""What a served model accepts: text columns of strings, within size limits; anything else is refused, naming where.

MLflow's schema check lets an object column through whatever it holds, so an
integer, a float, a list or a dict reached the tokenizer as its `str()` and got
a prediction (200), and a null got MLflow's generic error. `validate_text_rows`
is the one check every kind of served model calls on its input frame before
tokenizing: a missing column, a null or a non-string is a 400 naming the
column and row; a request of more rows or characters than the limits is a 413.
The limits are the server's, read from its environment when the model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

ROWS_ENV = "LOWRANK_SERVE_MAX_ROWS"
CHARS_ENV = "LOWRANK_SERVE_MAX_CHARS"


@dataclass(frozen=True)
class Limits:
    """The most rows, and characters over all texts, one request may hold."""

    max_rows: int = 1024
    max_chars: int = 1_000_000

    @classmethod
    def from_env(cls) -> "Limits":
        default = cls()
        return cls(int(os.environ.get(ROWS_ENV, default.max_rows)), int(os.environ.get(CHARS_ENV, default.max_chars)))


class RequestError(MlflowException):
    """A refused request: MLflow's scoring server answers with `status` and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.status = status

    def get_http_status_code(self) -> int:  # the scoring server asks the exception for its status
        return self.status


def _kind(value: Any) -> str:
    return "null" if value is None or value != value else type(value).__name__  # NaN: pandas' missing value


def validate_text_rows(frame: Any, columns: Sequence[str], limits: Limits) -> list[list[str]]:
    """The texts of `columns` of the request `frame`, one list per column; RequestError (400 or 413) otherwise."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise RequestError(f"column {missing[0]!r} is missing (the input has {list(frame.columns)}; it needs {list(columns)})")
    if len(frame) > limits.max_rows:
        raise RequestError(f"{len(frame)} rows in one request; at most {limits.max_rows} ({ROWS_ENV})", status=413)
    texts, chars = [], 0
    for column in columns:
        values = frame[column].tolist()
        for row, value in enumerate(values):
            if not isinstance(value, str):
                raise RequestError(f"column {column!r}, row {row}: expected a string, got {_kind(value)}"
                                   + ("" if _kind(value) == "null" else f" ({str(value)[:40]})"))
            chars += len(value)
        texts.append(values)
    if chars > limits.max_chars:
        raise RequestError(f"{chars} characters in one request; at most {limits.max_chars} ({CHARS_ENV})", status=413)
    return texts
