"""Benchmark (issue 19): sweeps through `lowrank sweep`, on one worker, two, and a Dask cluster.

1. The 3 x 3 sweep of benchmarks/specs/sweep-sst2.yaml from an empty store on 2 local workers:
   the seconds of the shared stages and of each configuration, and each one's score.
2. The same sweep again: every stage from the store; the flow's own seconds.
3. The engines, on benchmarks/specs/sweep-sst2-engines.yaml (four of those configurations), each in a
   fresh store holding only the shared stages (linked from run 1): 1 worker x 1 thread, 2 local
   workers x 1 thread, a local Dask cluster of 2 workers x 1 thread, 1 worker x 2 threads.

Every run is a `lowrank sweep` subprocess, one at a time (never time two things at once).

    .venv/bin/python benchmarks/sweep.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from product import run_sweep
from report import ROOT, table, write_section

RUNS = ROOT / "benchmarks" / "runs" / "sweep"
SPECS = ROOT / "benchmarks" / "specs"
SHARED = ("prepare", "finetune", "evaluate_dense", "fisher")
ENGINES = {  # name -> lowrank sweep options
    "1 worker x 1 thread": ["--workers", "1", "--threads", "1"],
    "2 workers x 1 thread": ["--workers", "2", "--threads", "1"],
    "Dask, 2 workers x 1 thread": ["--runner", "dask", "--workers", "2", "--threads", "1"],
    "1 worker x 2 threads": ["--workers", "1", "--threads", "2"],
}


def sweep(folder: Path, spec: str, options: list[str]) -> tuple[dict, float]:
    """One `lowrank sweep` in its own store; returns its summary and the command's wall seconds."""
    overrides = [
        f"paths.artifacts={folder / 'artifacts'}", f"paths.metrics={folder / 'metrics'}",
        f"tracking.uri=sqlite:///{RUNS / 'mlflow.db'}", f"tracking.artifact_location={RUNS / 'mlartifacts'}",
    ]
    summary, wall = run_sweep(SPECS / spec, overrides, options)
    (folder / "summary.json").write_text(json.dumps({**summary, "wall_seconds": wall}, indent=1))
    return summary, wall


def seed(source: Path, target: Path) -> None:
    """A fresh store holding only the shared stages' entries (hard links), so a run times the configurations alone."""
    if target.exists():
        shutil.rmtree(target)
    for name in SHARED:
        shutil.copytree(source / "artifacts" / "store" / name, target / "artifacts" / "store" / name, copy_function=os.link)


def configuration_seconds(config: dict) -> float:
    return sum(row["seconds"] or 0.0 for name, row in config["stages"].items() if name not in SHARED and not row["cached"])


def busy(summary: dict) -> float:
    """Seconds the stage jobs themselves took (what the workers had to do)."""
    return sum(configuration_seconds(c) for c in summary["configs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated names of ENGINES to compare")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)

    cold_dir = RUNS / "cold"
    if cold_dir.exists():
        shutil.rmtree(cold_dir)
    cold, cold_wall = sweep(cold_dir, "sweep-sst2.yaml", ["--workers", "2", "--threads", "1"])
    rerun, rerun_wall = sweep(cold_dir, "sweep-sst2.yaml", ["--workers", "2", "--threads", "1"])
    assert all(row["ran"] == 0 for row in rerun["stages"].values()), rerun["stages"]

    first = cold["configs"][0]["stages"]
    shared_rows = [[name, first[name]["seconds"]] for name in SHARED]
    config_rows = [
        [c["overrides"]["factorize.method"], c["overrides"]["factorize.keep_ratio"], c["keep_ratio_reached"],
         c["scores"].get("evaluate_factorized"), c["score"], configuration_seconds(c)]
        for c in cold["configs"]
    ]
    engines = {}
    for name in args.engines.split(","):
        folder = RUNS / name.replace(" ", "").replace(",", "-")
        seed(cold_dir, folder)
        engines[name] = sweep(folder, "sweep-sst2-engines.yaml", ENGINES[name])
    engine_rows = []
    for name, (summary, wall) in engines.items():
        workers = summary["engine"]["workers"]
        flow = summary["seconds"]
        engine_rows.append([
            name, wall, flow, busy(summary), (workers * flow - busy(summary)) / busy(summary) * 100,
        ])
    by_name = {row[0]: row for row in engine_rows}
    ratios = []
    if {"1 worker x 1 thread", "2 workers x 1 thread"} <= set(by_name):
        one, two = by_name["1 worker x 1 thread"][2], by_name["2 workers x 1 thread"][2]
        ratios.append(f"- 2 workers x 1 thread over 1 worker x 1 thread: **{one / two:.2f}x** (target 1.7x)")
    if {"1 worker x 2 threads", "2 workers x 1 thread"} <= set(by_name):
        ratios.append(f"- 2 workers x 1 thread over 1 worker x 2 threads: **{by_name['1 worker x 2 threads'][2] / by_name['2 workers x 1 thread'][2]:.2f}x**")
    if {"Dask, 2 workers x 1 thread", "2 workers x 1 thread"} <= set(by_name):
        ratios.append(f"- Dask over the local process pool, both 2 workers x 1 thread: **{by_name['2 workers x 1 thread'][2] / by_name['Dask, 2 workers x 1 thread'][2]:.2f}x**")

    body = f"""The 3 x 3 sweep (`benchmarks/specs/sweep-sst2.yaml`: SVD, FWSVD, TFWSVD x keep ratio 0.5, 0.3, 0.15; SST-2, 2,000 training examples, + ft 1 epoch, no latency timing) from an empty store on 2 local workers of 1 thread: {cold_wall:.0f} s for the command, {cold['seconds']:.0f} s inside the flow. Every stage ran once per fingerprint: {", ".join(f"{k} {v['ran']}" for k, v in cold['stages'].items())}.

Shared stages (run once for the nine configurations), seconds:

{table(["stage", "seconds"], shared_rows)}

Each configuration (its own stages: factorize, evaluate, + ft, evaluate, summary):

{table(["method", "keep ratio", "reached", "score before + ft", "score", "seconds"], config_rows)}

The same sweep again, every stage from the store: {rerun_wall:.1f} s for the command, of which {rerun['seconds']:.2f} s inside the flow (planning, reading the store, finding the MLflow runs); the rest is Prefect's start and the imports.

Engines, on four of the configurations (`benchmarks/specs/sweep-sst2-engines.yaml`: SVD and TFWSVD at 0.5 and 0.15), each in a store holding only the shared stages. "Busy" is the sum of the stage jobs' own seconds; overhead is workers x flow seconds minus busy, over busy (worker start, scheduling, MLflow logging and workers idle at the end):

{table(["engine", "command s", "flow s", "busy s", "overhead %"], engine_rows)}

{chr(10).join(ratios)}
"""
    headline = f"""{table(["engine (4 configurations)", "flow s", "overhead %"], [[r[0], r[2], r[4]] for r in engine_rows])}

{chr(10).join(ratios)}
- The 3 x 3 sweep from an empty store on 2 workers: {cold['seconds']:.0f} s in the flow; a second run takes every stage from the store in {rerun['seconds']:.2f} s inside the flow ({rerun_wall:.1f} s with Prefect's start and the imports)."""
    write_section("sweep", "Sweeps: shared stages once, engines side by side", "python benchmarks/sweep.py", body,
                  results="sweep.md", headline=headline, add_headline=True)


if __name__ == "__main__":
    main()
