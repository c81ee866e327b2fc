"""How a `lowrank` process starts and ends: one line for a bad input, clean unwinding on signals.

A bad input (`lowrank.config.InputError`: a params value, a file, the data),
or a disk that filled up, is printed as one line, `error: <key or file>: <what>`, with exit code 2;
`--debug` or `LOWRANK_DEBUG=1` shows its traceback instead. Any other error
keeps its traceback. SIGTERM unwinds like Ctrl-C, so every `with` block runs
its exit: temporary folders go, MLflow runs end as FAILED, Prefect's
temporary server stops.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from typing import Any, Iterator

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
    except Exception as err:  # noqa: BLE001  a full disk, whoever hit it, is one line; anything else keeps its traceback
        if debugging() or (line := _disk_full(err)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise typer.Exit(2) from None


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded")


def _disk_full(err: BaseException) -> str | None:
    """What a write that found the disk full says, naming the file where the error does; else None.

    Looked for along the exception's causes, and in the text of libraries that do not raise OSError
    (safetensors' Rust writer, MLflow's artifact upload).
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return f"{seen.filename}: {seen.strerror}" if seen.filename else str(seen.strerror)
        text = str(seen)
        if any(mark in text for mark in _FULL_TEXT):
            return f"no space left on device ({' '.join(text.split())[:300]})"
        seen = seen.__cause__ or seen.__context__
    return None


# --------------------------------------------------------------------------- what a killed run leaves

OWNER_ENV = "LOWRANK_OWNER"  # host:pid:start of the lowrank process; children (Prefect's server) inherit it


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
    """Mark this process as the owner of what it starts from now on (Prefect's server, sweep workers and the
    resource tracker inherit the mark), and start the watchdog that ends them all if this process dies."""
    os.environ[OWNER_ENV] = owner_token()
    _start_watchdog(os.environ[OWNER_ENV])
    return os.environ[OWNER_ENV]


def end_with_parent(signum: int = signal.SIGTERM) -> Any:
    """A `preexec_fn`: on Linux, the child gets `signum` when the thread that started it dies (PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, in the parent: the child only calls it
    except (OSError, AttributeError):  # not Linux
        return None
    return lambda: prctl(1, signum)  # 1: PR_SET_PDEATHSIG


DEATH_SIGNAL = signal.SIGURG  # the watchdog's parent-death signal (see `_start_watchdog`)
_WATCHDOG: list = []  # its Popen, held so that it is never collected (and warned about) while it runs


def _start_watchdog(token: str) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}  # unmarked: it outlives its owner by design
    # Its death signal is one whose default action is to be ignored: an owner killed while the watchdog still
    # imports (tens of milliseconds after `claim`) would otherwise kill it too, before it ends anything.
    _WATCHDOG[:] = [subprocess.Popen(
        [sys.executable, "-m", "flows.watchdog", token], env=env, start_new_session=True,
        preexec_fn=end_with_parent(DEATH_SIGNAL),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )]


def marked(token: str | None = None) -> list:
    """The processes that carry a lowrank owner's mark (`token`'s, or anyone's) in their environment."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            mark = process.environ().get(OWNER_ENV)
        except psutil.Error:
            continue
        if mark and process.pid != os.getpid() and (token is None or mark == token):
            found.append(process)
    return found


def still_running(processes: list, timeout: float = 0.0) -> list:
    """Those of `processes` (psutil.Process objects or pids) still running after up to `timeout` seconds. A zombie has
    ended: it waits only for its parent to reap it (done here when that parent is this process), and in a container
    whose PID 1 reaps nothing an orphan's zombie stays until the machine ends: waiting on it would take the whole timeout."""
    import psutil

    def running(process) -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = process if isinstance(process, psutil.Process) else psutil.Process(process)
            psutil.wait_procs([process], timeout=0)  # reaps it if it is this process's child and has ended
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        return False

    deadline = time.monotonic() + timeout
    while True:
        left = [process for process in processes if running(process)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def end_processes(processes: list, grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds; returns the pids ended."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    for process in still_running(processes, grace):
        with contextlib.suppress(psutil.Error):
            process.kill()
    still_running(processes, grace)
    return [process.pid for process in processes]


def stop_orphans() -> list[int]:
    """End what lowrank processes that died left running (their watchdog did not get to it: killed too, or not
    Linux): Prefect's temporary server, sweep workers, multiprocessing's resource tracker, all found by their mark."""
    import psutil

    orphans = []
    for process in marked():
        with contextlib.suppress(psutil.Error):
            if not owner_alive(process.environ()[OWNER_ENV]):
                orphans.append(process)
    return end_processes(orphans) if orphans else []


def recover(params) -> dict[str, list]:
    """Before a run: remove what runs that died left behind (temporary folders, processes, RUNNING MLflow runs)."""
    from lowrank.io.files import remove_stale_temporaries
    from tasks import tracking

    found: dict[str, list] = {
        "temporaries": [p for root in (params.paths.artifacts, params.paths.metrics) for p in remove_stale_temporaries(root)],
        "processes": stop_orphans(),
        "mlflow_runs": tracking.close_stale_runs(params.tracking, owner_alive) if params.tracking.enabled else [],
    }
    found["failed_mlflow_models"] = tracking.failed_models(params.tracking) if params.tracking.enabled else []
    if any(found.values()):
        print(f"cleaned up after a run that died: {', '.join(f'{len(v)} {k}' for k, v in found.items() if v)}", file=sys.stderr)
    for model in found["failed_mlflow_models"]:
        print(f"warning: MLflow logged model {model} is FAILED (its upload did not finish): not reused, logged again when scored", file=sys.stderr)
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
