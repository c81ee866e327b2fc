"""A cached run and the commands that should answer at once, before and after (issue 36, part 7), side by side.

Two checkouts, the code at `--before` (a git ref, in a temporary worktree) and this one, are timed in interleaved
rounds on one project (tiny model by default, or `--params`), so both see the same load: per round, each side's
`lowrank run` on a store its warm-up run filled, then `--help`, `methods`, `schema` and `check`, each a fresh
process. Reported: the median and the range of the wall-clock seconds, and whether the command imported torch.
Each side keeps its own store entries (the code is part of every fingerprint). Run it on a quiet machine:

    .venv/bin/python benchmarks/cached_run.py --before d44ce51 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import ROOT, table, write_section

PARAMS = "{params}"  # stands for the project's params.yaml
COMMANDS = {"run (cached)": ["run", "--params", PARAMS], "--help": ["--help"], "methods": ["methods"], "schema": ["schema"],
            "check": ["check", "--params", PARAMS]}
# Printed by the child after the command: whether it imported torch (the four quick commands should not).
PROBE = ("import sys, runpy\nsys.argv = ['lowrank', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('flows.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)")


def _env(code: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LOWRANK_"))}
    return {**env, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _time(code: Path, project: Path, args: list[str]) -> tuple[float, bool]:
    """Wall-clock seconds of one command in a fresh interpreter, and whether it imported torch."""
    started = time.perf_counter()
    args = [str(project / "params.yaml") if arg == PARAMS else arg for arg in args]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=project, env=_env(code), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} with {code}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return seconds, "torch imported: True" in done.stderr


def _tiny_project(folder: Path) -> Path:
    """The tests' seconds-long pipeline (tests/conftest.py) as a project of its own."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import GLUE_DIR, save_tiny_model, tiny_params

    tiny_params(folder, save_tiny_model(folder / "model"), GLUE_DIR)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git ref of the code to compare against (e.g. the main before the change)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--params", type=Path, help="a params.yaml to run instead of the tiny pipeline (its folder is the project)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)  # the old code, no git state touched
        project = args.params.resolve().parent if args.params else _tiny_project(Path(scratch) / "project")
        sides = {f"before ({args.before})": before, "after (this checkout)": ROOT}
        for code in sides.values():  # warm-up: fills each side's store entries and MLflow
            _time(code, project, COMMANDS["run (cached)"])
        seconds = {(side, name): [] for side in sides for name in COMMANDS}
        torch_seen = {}
        for _ in range(args.rounds):
            for side, code in sides.items():
                for name, command in COMMANDS.items():
                    took, imported = _time(code, project, command)
                    seconds[side, name].append(took)
                    torch_seen[side, name] = imported

    rows = [[name, side, statistics.median(seconds[side, name]), f"{min(seconds[side, name]):.2f}-{max(seconds[side, name]):.2f}",
             "yes" if torch_seen[side, name] else "no"] for name in COMMANDS for side in sides]
    body = (f"{args.rounds} interleaved rounds, each command a fresh process; `run (cached)` on a store a warm-up run filled.\n\n"
            + table(["command", "code", "median s", "range s", "imports torch"], rows))
    print(body)
    command = f"python benchmarks/cached_run.py --before {args.before} --rounds {args.rounds}"
    write_section("cached-run", "A cached run and the quick commands, before and after (issue 36)", command, body, results="pipeline.md")


if __name__ == "__main__":
    main()
