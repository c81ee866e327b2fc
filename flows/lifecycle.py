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
import time
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


def quiet() -> bool:
    return os.environ.get("TQDM_DISABLE") == "1"


def configure(debug: bool, quiet: bool) -> None:
    """Apply the global options before the libraries that read them are imported."""
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if quiet:
        os.environ.update(QUIET_ENV)
    elif not sys.stderr.isatty():  # redirected, a bar is hundreds of redraws; the lines per stage and epoch stay
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    # Errors are reported once, by `user_errors`; Prefect would log each failed task's traceback too.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING" if debugging() else "CRITICAL")


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


# --------------------------------------------------------------------------- what a killed run leaves

OWNER_ENV = "LOWRANK_OWNER"  # host:pid:start of the lowrank process; children (Prefect's server) inherit it
_SERVER_MARK = "prefect.server.api.server:create_app"  # in the command line of Prefect's temporary server


def owner_token(pid: int | None = None) -> str:
    """Who a process is, beyond its pid (which the system reuses): host, pid and start time."""
    import socket

    import psutil

    process = psutil.Process(pid)
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.3f}"


def owner_alive(token: str) -> bool:
    """Whether the process a token names still runs; a token from another host counts as alive."""
    import socket

    import psutil

    try:
        host, pid, started = token.rsplit(":", 2)
        if host != socket.gethostname():
            return True
        return f"{psutil.Process(int(pid)).create_time():.3f}" == started
    except (ValueError, psutil.Error):
        return False


def claim() -> str:
    """Mark this process as the owner of what it starts from now on (Prefect's server inherits the mark)."""
    os.environ[OWNER_ENV] = owner_token()
    return os.environ[OWNER_ENV]


def stop_orphan_servers() -> list[int]:
    """Stop the temporary Prefect servers whose lowrank process died without stopping them (SIGKILL where the
    kernel does not end them with it: not Linux, or a server Prefect started itself)."""
    import psutil

    stopped = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if _SERVER_MARK not in " ".join(process.info["cmdline"] or ()):
                continue
            token = process.environ().get(OWNER_ENV)
            if token and not owner_alive(token):
                process.terminate()
                try:
                    process.wait(5)
                except psutil.TimeoutExpired:
                    process.kill()
                stopped.append(process.pid)
        except psutil.Error:
            continue
    return stopped


def recover(params) -> dict[str, list]:
    """Before a run: remove what runs that died left behind (temporary folders, Prefect servers, RUNNING MLflow runs)."""
    from lowrank.io.files import remove_stale_temporaries
    from tasks import tracking

    found: dict[str, list] = {
        "temporaries": [p for root in (params.paths.artifacts, params.paths.metrics) for p in remove_stale_temporaries(root)],
        "servers": stop_orphan_servers(),
        "mlflow_runs": tracking.close_stale_runs(params.tracking, owner_alive) if params.tracking.enabled else [],
    }
    if any(found.values()):
        print(f"cleaned up after a run that died: {', '.join(f'{len(v)} {k}' for k, v in found.items() if v)}", file=sys.stderr)
    return found


def die_with_dvc() -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE), end this stage when the `dvc` process that started it ends, killed or not."""
    import threading

    import psutil

    if "DVC_STAGE" not in os.environ:
        return
    try:
        watched = next((p for p in psutil.Process().parents() if "dvc" in " ".join(p.cmdline()[:2])), None)
    except psutil.Error:
        watched = None
    if watched is None:  # dvc died before this process could look: nobody will record what it writes
        print("error: the dvc process that started this stage has ended", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)

    def watch() -> None:
        try:
            while watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.5)
        except psutil.Error:  # gone between two looks
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-dvc", daemon=True).start()


OWNER_PREFECT_TAG = "lowrank.owner="  # + the owner token, on every flow run a lowrank process starts


def crash_stale_flow_runs() -> list[str]:
    """Inside a flow (the API is up): mark Crashed the flow runs, and their task runs, left RUNNING by a dead process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterStateType, TaskRunFilter, TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    running = [StateType.RUNNING, StateType.PENDING]
    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state={"type": FlowRunFilterStateType(any_=running)}))
        for run in runs:
            owners = [tag[len(OWNER_PREFECT_TAG):] for tag in run.tags if tag.startswith(OWNER_PREFECT_TAG)]
            if not owners or owner_alive(owners[0]):
                continue
            message = "its lowrank process died (found by a later run)"
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state={"type": TaskRunFilterStateType(any_=running)}),
            )
            for task in tasks:
                client.set_task_run_state(task.id, Crashed(message=message), force=True)
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            crashed.append(str(run.id))
    return crashed
