"""`python -m flows.watchdog TOKEN`: when the lowrank process TOKEN names dies, end every process it started.

`lifecycle.claim` starts it in a session of its own, with a parent-death signal
(Linux), so it runs on when its owner is killed by any signal, SIGKILL
included, and within a second or so ends what carries the owner's mark:
sweep workers (process pool or Dask), multiprocessing's resource tracker,
Prefect's temporary server. A worker started by a worker is found too: the
mark is in the environment every child inherits, not in the process tree,
which a dead parent's children leave.
"""

from __future__ import annotations

import signal
import sys
import threading

from .lifecycle import end_processes, marked, owner_alive

POLL_S = 0.5  # where no parent-death signal comes (not Linux), how often it looks


def main(token: str) -> None:
    died = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: died.set())  # the parent-death signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the run: the run unwinds, this one waits
    while not died.wait(POLL_S):
        if not owner_alive(token):
            break
    end_processes(marked(token))


if __name__ == "__main__":
    main(sys.argv[1])
