"""One Prefect task that runs any registered stage out of the content-addressed store.

The store is the cache: an entry's folder is named by the stage's fingerprint
(params sections, upstream fingerprints, library code) and holds its outputs and
its result, so Prefect's own result cache would only keep a second copy under
the same key. A hit ends the task run in a state named `Cached`, as Prefect's
cache does, so the UI tells computed from reused.
"""

from __future__ import annotations

import threading
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from lowrank.config import Params
from lowrank.pipeline import Layout
from lowrank.pipeline.store import run_stored


class PeakMemory:
    """Peak resident set size of this process while the block runs (sampled every 20 ms), in MiB."""

    def __enter__(self) -> "PeakMemory":
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss / 2**20)
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads in this process (a worker's share of the cores); None leaves torch's default."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@task(task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(name: str, params: Params, layout: Layout, threads: int | None = None):
    """Run stage `name` into its store entry, or reuse the entry another run finished (unless `orchestration.cache` is off).

    Returns the result, whether it came from the store, and what it cost: seconds and the worker's peak memory.
    """
    started = time.perf_counter()
    set_threads(threads)
    with PeakMemory() as memory:
        result, cached = run_stored(name, params, layout, refresh=not params.orchestration.cache)
    costs = {"seconds": time.perf_counter() - started, "peak_rss_mib": memory.peak}
    return Completed(name="Cached" if cached else "Completed", data=(result, cached, costs))
