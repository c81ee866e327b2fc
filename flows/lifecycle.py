"""How a `lowrank` process starts and ends: one line for a bad input, clean unwinding on signals.

A bad input (`lowrank.config.InputError`: a params value, a file, the data)
is printed as one line, `error: <key or file>: <what>`, with exit code 2;
`--debug` or `LOWRANK_DEBUG=1` shows its traceback instead. Any other error
keeps its traceback. SIGTERM unwinds like Ctrl-C, so every `with` block runs
its exit: temporary folders go, MLflow runs end as FAILED, Prefect's
temporary server stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator

import typer

DEBUG_ENV = "LOWRANK_DEBUG"
# What hides the progress bars of tqdm, transformers, datasets and the hub; read when they are imported.
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def configure(debug: bool, quiet: bool) -> None:
    """Apply the global options before the libraries that read them are imported."""
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if quiet:
        os.environ.update(QUIET_ENV)
    if not debugging():
        # Errors are reported once, by `user_errors`; Prefect would log each failed task's traceback too.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The body of every command: signals unwind, bad input is one line with exit code 2."""
    from lowrank.config import InputError

    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except InputError as err:
        if debugging():
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
