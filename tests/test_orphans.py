"""Nothing a lowrank process started outlives it: its watchdog ends its workers, whatever killed it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import GLUE_DIR, LOWRANK, REPO, lowrank_env, save_tiny_model, tiny_params
from flows.lifecycle import end_processes, still_running

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # starts and kills processes; looks machine-wide for strays

# A stand-in for a sweep: claims, then starts what a sweep starts (spawn workers, which bring the resource
# tracker, and a plain child), prints their pids and waits to be killed.
OWNER = """
import json, multiprocessing, subprocess, sys, time
from concurrent.futures import ProcessPoolExecutor
from flows import lifecycle

if __name__ == "__main__":
    lifecycle.claim()
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(time.sleep, [0, 0]))  # the workers start on first use
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    pids = [p.pid for p in pool._processes.values()] + [child.pid]
    print(json.dumps(pids), flush=True)
    sys.stdin.readline()  # until the test closes it (an exit without a signal), or a signal comes
    pool.shutdown()
    child.kill()
"""


def _watchdogs(owner: int) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "flows.watchdog" in " ".join(p.info["cmdline"] or ())
            and f":{owner}:" in " ".join(p.info["cmdline"])]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, None], ids=["SIGKILL", "SIGTERM", "exit"])
def test_when_the_owner_dies_by_any_signal_its_workers_end_within_seconds(tmp_path: Path, sig: int | None) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LOWRANK_OWNER", None)
    owner = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    pids: list[int] = []
    try:
        pids = json.loads(owner.stdout.readline())
        tracker = [p.pid for p in psutil.Process(owner.pid).children() if "resource_tracker" in " ".join(p.cmdline())]
        pids += tracker + _watchdogs(owner.pid)
        assert len(still_running(pids)) == 5 and len(tracker) == 1  # two workers, a child, the tracker, the watchdog
        owner.send_signal(sig) if sig else owner.stdin.close()
        owner.wait(10)
        assert still_running(pids, 10) == []  # the watchdog too: it ends once it has ended the rest
    finally:
        owner.kill()
        for pid in still_running(pids):
            os.kill(pid, signal.SIGKILL)


# Killed a few milliseconds after `claim`, while its watchdog still imports: the death signal must not kill the
# watchdog too (it did, when that signal was SIGTERM: every child outlived the owner).
EARLY_OWNER = """
import json, subprocess, sys
from flows import lifecycle

lifecycle.claim()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(json.dumps([child.pid]), flush=True)
sys.stdin.readline()
"""


def test_an_owner_killed_as_soon_as_it_claims_still_has_its_child_ended() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LOWRANK_OWNER", None)
    children: list[int] = []
    try:
        for _ in range(3):
            owner = subprocess.Popen([sys.executable, "-c", EARLY_OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
            children += json.loads(owner.stdout.readline())
            owner.kill()
            owner.wait(10)
        assert still_running(children, 10) == []
    finally:
        for pid in still_running(children):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("argv", [(), ("prefect.server.api.server:create_app",)], ids=["worker", "prefect-server"])
def test_the_next_start_ends_what_a_dead_owner_left(tmp_path: Path, argv: tuple[str, ...]) -> None:
    from flows import lifecycle

    dead = f"{socket.gethostname()}:{2 ** 22 + 7}:1.000"  # a pid above the kernel's default maximum: never alive
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", *argv]
    left = subprocess.Popen(sleeper, env={**os.environ, lifecycle.OWNER_ENV: dead})
    mine = subprocess.Popen(sleeper, env={**os.environ, lifecycle.OWNER_ENV: lifecycle.owner_token()})
    try:
        time.sleep(0.5)
        stopped = lifecycle.stop_orphans()
        left.wait(5)  # ended: by this call, or by another lowrank process's start on the machine, which recovers too
        assert mine.pid not in stopped and mine.poll() is None
    finally:
        left.kill(), mine.kill()


def _marked_by(pid: int) -> list[psutil.Process]:
    from flows import lifecycle

    return [p for p in lifecycle.marked() if p.environ()[lifecycle.OWNER_ENV].split(":")[1] == str(pid)]


def test_a_sweep_killed_with_sigkill_leaves_no_worker_tracker_or_server(tmp_path: Path) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    sweep = {"grid": {"factorize.keep_ratio": [0.5, 0.3]}}
    tiny_params(tmp_path, save_tiny_model(tmp_path / "model"), GLUE_DIR, evaluate={"latency": False}, sweep=sweep,
                finetune={"epochs": 200})  # long enough to be killed while the workers train
    env = lowrank_env(PREFECT_HOME=str(tmp_path / ".prefect"))  # no server configured: the sweep starts its own
    sweep_process = subprocess.Popen([*LOWRANK, "--quiet", "sweep", "--workers", "2", "--threads", "1"], cwd=tmp_path, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and sum("spawn_main" in " ".join(p.cmdline()) for p in _marked_by(sweep_process.pid)) < 1:
            time.sleep(1)
        started = _marked_by(sweep_process.pid)
        kinds = " ".join(" ".join(p.cmdline()) for p in started)
        assert "spawn_main" in kinds and "resource_tracker" in kinds and "prefect.server" in kinds
        sweep_process.kill()
        sweep_process.wait(10)
        assert still_running(started, 15) == []
    finally:
        sweep_process.kill()
        for process in _marked_by(sweep_process.pid):
            process.kill()


# A parent that never reaps its child, as a container's PID 1 that reaps nothing: the child, once ended, stays a zombie.
NEVER_REAPS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_end_processes_takes_a_zombie_as_ended():
    parent = subprocess.Popen([sys.executable, "-c", NEVER_REAPS], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        start = time.monotonic()
        assert end_processes([child], grace=5) == [child.pid]
        assert time.monotonic() - start < 2  # not the grace twice (SIGTERM's, then SIGKILL's), as when a zombie counted as running
        assert child.status() == psutil.STATUS_ZOMBIE and still_running([child]) == []
        assert still_running([parent.pid]) == [parent.pid]
    finally:
        parent.kill()
        parent.wait(10)
