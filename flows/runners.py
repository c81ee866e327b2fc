"""Where a sweep's stage jobs run: a local process pool, or Dask (a local cluster or a scheduler's address).

Dask rather than Ray: its scheduler and workers are two pure-Python commands
(`dask scheduler`, `dask worker ADDR`) that install with pip in seconds beside
Prefect, run on any machine that can import `lowrank`, and give a GPU to a job
through worker resources; Ray brings a large native runtime for features a
sweep of stage jobs does not use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from lowrank.config import InputError

from .lifecycle import end_with_parent

RUNNERS = ("local", "dask")


def cores() -> int:
    """The cores this process may use (a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Engine:
    """A Prefect task runner, how many jobs it runs at once, and the torch threads of each job."""

    runner: Any
    kind: str
    workers: int | None  # None: whatever the scheduler at `address` has
    threads: int | None  # None: torch's default on the worker's machine
    address: str | None = None
    gpu: bool = False

    def describe(self) -> dict[str, Any]:
        return {"runner": self.kind, "workers": self.workers, "threads": self.threads, "address": self.address}


def check_address(address: str) -> None:
    """A scheduler address must answer before the sweep plans any work."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise InputError(f"--address {address}: give host:port, e.g. tcp://10.0.0.5:8786")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=3).close()
    except OSError as err:
        raise InputError(f"--address {address}: no scheduler answers ({err.strerror or err})") from None


def engine(kind: str, workers: int | None = None, threads: int | None = None, address: str | None = None, gpu: bool = False) -> Engine:
    """The task runner for `lowrank sweep --runner KIND`; locally, workers x threads never exceeds the cores."""
    if kind not in RUNNERS:
        raise InputError(f"--runner {kind}: choose one of {', '.join(RUNNERS)}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: give at least 1")
    if address and kind != "dask":
        raise InputError("--address needs --runner dask")
    if address:
        check_address(address)
        from prefect_dask import DaskTaskRunner

        return Engine(DaskTaskRunner(address=address), kind, None, threads, address, gpu)
    workers = workers or cores()
    threads = threads or max(1, cores() // workers)
    if kind == "local":
        from prefect.task_runners import ProcessPoolTaskRunner

        return Engine(ProcessPoolTaskRunner(max_workers=workers), kind, workers, threads)
    import dask
    from prefect_dask import DaskTaskRunner

    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand memory back after
    # every large free: a training step allocates and frees hundreds of MiB, and ran 26% slower so (BENCHMARKS.md).
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    cluster = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    if gpu:
        cluster["resources"] = {"GPU": 1}
    return Engine(DaskTaskRunner(cluster_kwargs=cluster), kind, workers, threads, gpu=gpu)


def _owned_server() -> Any:
    """Prefect's temporary server, in a session of its own, ending with the lowrank process that started it.

    In the lowrank process's own process group, the server took a Ctrl-C or a `kill -- -PGID` meant for the run,
    and stopped first: the run, unwinding, then retried its last report to a server that was gone, and hung for
    minutes. In its own session only `shared_api` stops it, after the flow has recorded how it ended; and if the
    lowrank process is killed outright, the kernel ends the server with it (Linux; elsewhere the next run's
    `lifecycle.recover` does).
    """
    import subprocess
    from functools import partial
    from unittest import mock

    from prefect.server.api.server import SubprocessASGIServer

    class OwnedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> Any:
            detached = partial(subprocess.Popen, start_new_session=True, preexec_fn=end_with_parent())
            with mock.patch.object(subprocess, "Popen", detached):  # Prefect builds the command; only its start changes
                return super()._run_uvicorn_command()

    return OwnedServer()


@contextlib.contextmanager
def shared_api(prepare: Callable[[], Any] = lambda: None) -> Iterator[Any]:
    """One Prefect API for the flow and its workers; yields what `prepare` returns.

    Without a configured server, Prefect starts a temporary one inside the
    process that needs it: each worker process would start its own (15 s and a
    core each) and report its task runs where no UI sees them. So the sweep
    starts that temporary server itself, before the workers, and hands its URL
    down through the environment. `prepare` (the checks and the imports a run
    needs) runs while the server starts; its error is raised at once.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield prepare()
        return
    server, ready, done, failed = _owned_server(), threading.Event(), threading.Event(), []

    def own() -> None:
        # The server ends with the thread that started it (PR_SET_PDEATHSIG names a thread), so this thread starts
        # it, waits for the run to end and stops it; the process's other threads prepare the run meanwhile.
        try:
            server.start()
        except BaseException as err:  # noqa: BLE001  raised in the run's thread below
            failed.append(err)
            return
        finally:
            ready.set()
        done.wait()
        server.stop()

    owner = threading.Thread(target=own, name="prefect-server", daemon=True)
    owner.start()
    try:
        value = prepare()
        ready.wait()
        if failed:
            raise failed[0]
        os.environ["PREFECT_API_URL"] = server.api_url
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield value
    except BaseException:
        done.set()  # an error in `prepare` does not wait for the server to be up: it ends with this process
        raise
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if ready.is_set():
            done.set()
            owner.join()
