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
import time

from .lifecycle import DEATH_SIGNAL, end_processes, marked, owner_alive

POLL_S = 0.25  # how often it looks whether the owner still runs (the parent-death signal only shortens the wait)


def main(token: str) -> None:
    died = []
    # The handler only appends: one that took a lock (threading.Event.set) could deadlock with the wait it interrupts.
    for signum in (DEATH_SIGNAL, signal.SIGTERM):  # the parent-death signal, or a plain request to end
        signal.signal(signum, lambda *_: died.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the run: the run unwinds, this one waits
    while not died and owner_alive(token):
        time.sleep(POLL_S)
    end_processes(marked(token))


if __name__ == "__main__":
    main(sys.argv[1])
