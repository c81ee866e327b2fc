"""Benchmark (issue 19): sweeps through `lowrank sweep`, on one worker, two, and a Dask cluster.

1. The 3 x 3 sweep of benchmarks/specs/sweep-sst2.yaml from an empty store on 2 local workers:
   the seconds of the shared stages and of each configuration, and each one's score.
2. The same sweep again: every stage from the store; the flow's own seconds.
3. The engines, on benchmarks/specs/sweep-sst2-engines.yaml (four of those configurations), each in a
   fresh store holding only the shared stages (linked from run 1): 1 worker x 1 thread, 2 local
   workers x 1 thread, a local Dask cluster of 2 workers x 1 thread, 1 worker x 2 threads.

Every run is a `lowrank sweep` subprocess, one at a time (never time two things at once).

    .venv/bin/python benchmarks/sweep_engines.py
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
ENGINES = {  # key (its folder) -> (name in the report, lowrank sweep options)
    "local-1x1": ("1 worker x 1 thread", ["--workers", "1", "--threads", "1"]),
    "local-2x1": ("2 workers x 1 thread", ["--workers", "2", "--threads", "1"]),
    "dask-2x1": ("Dask, 2 workers x 1 thread", ["--runner", "dask", "--workers", "2", "--threads", "1"]),
    "local-1x2": ("1 worker x 2 threads", ["--workers", "1", "--threads", "2"]),
}


def sweep(folder: Path, spec: str, options: list[str], name: str = "summary") -> tuple[dict, float]:
    """One `lowrank sweep` in its own store; returns its summary and the command's wall seconds (kept as `<name>.json`)."""
    overrides = [
        f"paths.artifacts={folder / 'artifacts'}", f"paths.metrics={folder / 'metrics'}",
        f"tracking.uri=sqlite:///{RUNS / 'mlflow.db'}", f"tracking.artifact_location={RUNS / 'mlartifacts'}",
    ]
    summary, wall = run_sweep(SPECS / spec, overrides, options)
    (folder / f"{name}.json").write_text(json.dumps({**summary, "wall_seconds": wall}, indent=1))
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


def longest_chain(summary: dict) -> float:
    """The longest configuration's own stages, back to back: no number of workers finishes sooner."""
    return max(configuration_seconds(c) for c in summary["configs"])


def run(args: argparse.Namespace) -> None:
    """Every sweep of the benchmark, one after the other; each leaves its summary in its folder."""
    cold_dir = RUNS / "cold"
    if not args.engines_only:
        if cold_dir.exists():
            shutil.rmtree(cold_dir)
        sweep(cold_dir, "sweep-sst2.yaml", ["--workers", "2", "--threads", "1"])
        rerun, _ = sweep(cold_dir, "sweep-sst2.yaml", ["--workers", "2", "--threads", "1"], name="rerun")
        assert all(row["ran"] == 0 for row in rerun["stages"].values()), rerun["stages"]
    for key in args.engines.split(","):
        if key not in args.keep.split(","):  # --keep: measured before, in a store seeded from a cold run of the same code
            seed(cold_dir, RUNS / key)
            sweep(RUNS / key, "sweep-sst2-engines.yaml", ENGINES[key][1])


def report(args: argparse.Namespace) -> None:
    """The section, from the summaries the runs left."""
    load = lambda path: json.loads(path.read_text())  # noqa: E731
    cold, rerun = load(RUNS / "cold" / "summary.json"), load(RUNS / "cold" / "rerun.json")
    first = cold["configs"][0]["stages"]
    shared_rows = [[name, first[name]["seconds"], first[name].get("peak_rss_mib") or "not measured"] for name in SHARED]
    config_rows = [
        [c["overrides"]["factorize.method"], c["overrides"]["factorize.keep_ratio"], c["keep_ratio_reached"],
         c["scores"].get("evaluate_factorized"), c["score"], configuration_seconds(c)]
        for c in cold["configs"]
    ]
    engine_rows, flows = [], {}
    for key in args.engines.split(","):
        name, _ = ENGINES[key]
        summary = load(RUNS / key / "summary.json")
        workers, flow, work = summary["engine"]["workers"], summary["seconds"], busy(summary)
        bound = max(work / workers, longest_chain(summary))  # the least time any schedule of these jobs takes
        flows[key] = flow
        engine_rows.append([name, summary["wall_seconds"], flow, work, longest_chain(summary),
                            (flow - bound) / bound * 100, (workers * flow - work) / work * 100])
    ratios = []
    if {"local-1x1", "local-2x1"} <= set(flows):
        ratios.append(f"- 2 workers x 1 thread over 1 worker x 1 thread: **{flows['local-1x1'] / flows['local-2x1']:.2f}x** (target 1.7x)")
    if {"local-1x2", "local-2x1"} <= set(flows):
        ratios.append(f"- 2 workers x 1 thread over 1 worker x 2 threads: **{flows['local-1x2'] / flows['local-2x1']:.2f}x**")
    if {"dask-2x1", "local-2x1"} <= set(flows):
        ratios.append(f"- Dask over the local process pool, both 2 workers x 1 thread: **{flows['local-2x1'] / flows['dask-2x1']:.2f}x**")
    header = ["engine", "command s", "flow s", "busy s", "longest chain s", "overhead %", "idle %"]

    body = f"""The 3 x 3 sweep (`benchmarks/specs/sweep-sst2.yaml`: SVD, FWSVD, TFWSVD x keep ratio 0.5, 0.3, 0.15; SST-2, 2,000 training examples, + ft 1 epoch, no latency timing) from an empty store on 2 local workers of 1 thread: {cold['wall_seconds']:.0f} s for the command, {cold['seconds']:.0f} s inside the flow. Jobs per stage: {", ".join(f"{k} {v['ran']}" for k, v in cold['stages'].items())}.

Shared stages (run once for the nine configurations): seconds, and the peak memory of the worker process while each ran (MiB):

{table(["stage", "seconds", "peak MiB"], shared_rows)}

Each configuration (its own stages: factorize, evaluate, + ft, evaluate, summary):

{table(["method", "keep ratio", "reached", "score before + ft", "score", "seconds"], config_rows)}

The same sweep again, every stage from the store: {rerun['wall_seconds']:.1f} s for the command, of which {rerun['seconds']:.2f} s inside the flow (planning, reading the store, finding each configuration's MLflow run); the rest is Prefect's start and the imports.

Engines, on four of the configurations (`benchmarks/specs/sweep-sst2-engines.yaml`: SVD and TFWSVD at 0.5 and 0.15), each in a store holding only the shared stages, one after the other on a quiet machine. Busy: the sum of the stage jobs' own seconds. Longest chain: the slowest configuration's stages back to back. Overhead: flow seconds beyond the least any schedule could take (busy / workers, or the longest chain if longer), over that least: worker start, scheduling, MLflow logging. Idle: workers x flow seconds minus busy, over busy, which also counts a worker waiting while the longest chain finishes.

{table(header, engine_rows)}

{chr(10).join(ratios)}
"""
    headline = f"""{table(["engine (4 configurations)", "flow s", "overhead %", "idle %"], [[r[0], r[2], r[5], r[6]] for r in engine_rows])}

{chr(10).join(ratios)}
- The 3 x 3 sweep from an empty store on 2 workers: {cold['seconds']:.0f} s in the flow, the shared stages run once. Run again, it takes every stage from the store in {rerun['seconds']:.2f} s inside the flow ({rerun['wall_seconds']:.1f} s with Prefect's start and the imports)."""
    write_section("sweep", "Sweeps: shared stages once, engines side by side", "python benchmarks/sweep_engines.py", body,
                  results="sweep.md", headline=headline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated keys of the engines to compare: {', '.join(ENGINES)}")
    parser.add_argument("--keep", default="", help="comma-separated engine keys not to run again (their last summary is reported)")
    parser.add_argument("--report-only", action="store_true", help="write the section from the summaries the last runs left")
    parser.add_argument("--engines-only", action="store_true", help="keep the last cold run (its store seeds the engines' stores)")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
