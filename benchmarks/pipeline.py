"""Benchmark (issue 2): the default run per stage, a cached rerun, padding, and orchestration overhead.

    .venv/bin/python benchmarks/pipeline.py            # all parts (~15 min on 2 cores)
    .venv/bin/python benchmarks/pipeline.py --skip-default

1. `lowrank run --no-cache` on params.yaml, then `lowrank run` again: seconds per stage, and the cached rerun.
2. Training samples/s on SST-2 with MiniLM: batches padded to their longest row vs to `max_length`.
3. Overhead: the same tiny pipeline (tiny BERT, 48 SST-2 sentences) called through the library
   directly, through the Prefect flow with MLflow tracking, and through `dvc repro`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from report import table, write_section  # noqa: E402

BIN = Path(sys.executable).parent


def lowrank_run(*extra: str) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "lowrank"), "run", *extra], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout[done.stdout.index("{") :]), seconds


def default_run() -> str:
    first, first_total = lowrank_run("--no-cache")  # runs every stage and refreshes the cache
    second, second_total = lowrank_run()
    rows = [[name, first[name]["seconds"], second[name]["seconds"], second[name]["cached"]] for name in first]
    rows.append(["whole command (with imports, Prefect start)", first_total, second_total, ""])
    return (
        "`lowrank run --no-cache` on params.yaml (MiniLM-L6, 2,000 SST-2 sentences, 3 epochs, FWSVD at keep ratio 0.5, "
        "1 + ft run), then `lowrank run` again with nothing changed.\n\n"
        + table(["stage", "seconds (first run)", "seconds (rerun)", "cached on rerun"], rows)
    )


def padding(steps: int) -> str:
    from transformers import DataCollatorWithPadding

    from lowrank.config import load_params
    from lowrank.data.loading import get_task, load_raw, tokenize
    from lowrank.io.models import load_for_task, load_tokenizer

    params = load_params(ROOT / "params.yaml")
    spec = get_task("sst2")
    raw = load_raw(spec, params.data.resolved_glue_dir(), max_train_samples=32 * steps, max_eval_samples=8, seed=0)
    tokenizer = load_tokenizer(params.model)
    data = tokenize(raw, spec, tokenizer, params.data.max_length)["train"]
    model = load_for_task(params.model, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []
    for label, collator in (
        ("longest in batch", DataCollatorWithPadding(tokenizer)),
        (f"max_length ({params.data.max_length})", DataCollatorWithPadding(tokenizer, padding="max_length", max_length=params.data.max_length)),
    ):
        loader = torch.utils.data.DataLoader(data, batch_size=32, collate_fn=collator)
        batches = list(loader)
        model.train()
        started = time.perf_counter()
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - started
        mean_len = sum(b["input_ids"].shape[1] for b in batches) / len(batches)
        rows.append([label, mean_len, len(batches) * 32 / seconds])
    return (
        f"{steps} training steps of batch 32 on SST-2 sentences (forward, backward, AdamW), MiniLM-L6, one after the other.\n\n"
        + table(["padding", "mean padded length", "samples/s"], rows)
        + f"\n\nPer-batch padding is {rows[0][2] / rows[1][2]:.2f}x faster."
    )


def from_prefect_history(runs: int = 2) -> str:
    """Seconds per stage of the last `runs` `compress` flow runs, as Prefect recorded them (.prefect/prefect.db)."""
    import sqlite3

    database = Path(os.environ.get("PREFECT_HOME", ROOT / ".prefect")) / "prefect.db"
    with sqlite3.connect(database) as connection:
        flows = connection.execute(
            "select f.id, f.name, f.start_time, f.end_time from flow_run f join flow on flow.id = f.flow_id "
            "where flow.name = 'compress' and f.end_time is not null order by f.start_time desc limit ?", (runs,)
        ).fetchall()[::-1]
        per_run = []
        for flow_id, *_ in flows:
            tasks = connection.execute(
                "select name, start_time, end_time, state_name from task_run where flow_run_id = ? order by start_time", (flow_id,)
            ).fetchall()
            per_run.append({name: (_seconds(start, end), state) for name, start, end, state in tasks})
    names = list(per_run[0])
    rows = [[name, *(f"{run[name][0]:.1f} ({run[name][1]})" if name in run else "" for run in per_run)] for name in names]
    rows.append(["flow run", *(f"{_seconds(start, end):.1f}" for _, _, start, end in flows)])
    header = ["stage", *(f"{name} ({start[:16]})" for _, name, start, _ in flows)]
    return table(header, rows)


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def overhead() -> str:
    from conftest import save_tiny_model, tiny_params

    from lowrank.config import load_params
    from lowrank.pipeline import Layout, get_stage, pipeline, preflight

    glue = Path(os.environ.get("GLUE_DIR", ROOT.parent / "shared" / "data" / "glue"))
    work = Path(tempfile.mkdtemp(prefix="lowrank-overhead-"))
    model = save_tiny_model(work / "tiny")
    rows = []

    def library(root: Path) -> float:
        root.mkdir(parents=True)
        params = load_params(tiny_params(root, model, glue))
        started = time.perf_counter()
        preflight(params)
        layout = Layout.from_params(params)
        for name in pipeline(params):
            get_stage(name).run(params, layout)
        return time.perf_counter() - started

    rows.append(["library, in process", library(work / "lib")])
    (work / "prefect").mkdir()
    params_path = tiny_params(work / "prefect", model, glue)
    for label in ("Prefect flow + MLflow, new temporary server", "Prefect flow + MLflow, cached rerun"):
        started = time.perf_counter()
        done = subprocess.run([str(BIN / "lowrank"), "run", "-p", str(params_path)], cwd=work / "prefect", capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        rows.append([label + " (subprocess)", time.perf_counter() - started])

    project = work / "dvc"
    project.mkdir()
    shutil.copytree(ROOT / "lowrank", project / "lowrank", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    params = json.loads(json.dumps(__import__("yaml").safe_load(tiny_params(project, model, glue).read_text())))
    params["paths"] = {"artifacts": "artifacts", "metrics": "metrics"}
    params["factorize"].update(targets=None, exclude=None)  # dvc.yaml names these keys: they must be in the file
    (project / "params.yaml").write_text(json.dumps(params))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=project, check=True, env=env)
    for label in ("dvc repro (a subprocess per stage, MLflow per stage)", "dvc repro, nothing changed"):
        started = time.perf_counter()
        done = subprocess.run(["dvc", "repro", "evaluate_compressed"], cwd=project, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        rows.append([label, time.perf_counter() - started])
    shutil.rmtree(work, ignore_errors=True)
    base = rows[0][1]
    return (
        "The factorize path (8 stages) on a tiny BERT (2 blocks, hidden 32) and 48 SST-2 sentences, so the time is "
        "mostly orchestration. Subprocess rows include Python start-up and imports.\n\n"
        + table(["driver", "seconds", "over the library"], [[r[0], r[1], r[1] - base] for r in rows])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--rerun-only", action="store_true", help="only time `lowrank run` on what is already cached")
    parser.add_argument("--history", action="store_true", help="only report the last two flow runs from Prefect's records")
    parser.add_argument("--padding-steps", type=int, default=15)
    args = parser.parse_args()
    if args.history:
        body = (
            "Seconds per stage (Prefect task run time; state in brackets) of the last two `compress` flow runs on "
            "params.yaml (MiniLM-L6, 2,000 SST-2 sentences, 3 epochs, FWSVD at keep ratio 0.5, 3 epochs + ft), "
            "read from Prefect's records after `lowrank run --no-cache` and a second `lowrank run`.\n\n" + from_prefect_history()
        )
        write_section("pipeline-history", "Pipeline: the default run per stage (issue 2)", "python benchmarks/pipeline.py --history", body,
                      results="pipeline.md", headline=body)
        return
    if args.rerun_only:
        summary, total = lowrank_run()
        rows = [[name, summary[name]["seconds"], summary[name]["cached"]] for name in summary]
        rows.append(["whole command (with imports, Prefect start)", total, ""])
        body = "`lowrank run` on params.yaml after a complete run with the same code and params.\n\n" + table(["stage", "seconds", "cached"], rows)
        write_section("pipeline-rerun", "Pipeline: a cached rerun (issue 2)", "python benchmarks/pipeline.py --rerun-only", body,
                      results="pipeline.md", headline=body)
        return
    parts = []
    if not args.skip_default:
        parts.append("### Default run, per stage\n\n" + default_run())
    parts.append("### Padding\n\n" + padding(args.padding_steps))
    parts.append("### Orchestration overhead\n\n" + overhead())
    command = "python benchmarks/pipeline.py" + (" --skip-default" if args.skip_default else "")
    write_section("pipeline", "Pipeline: stages, cache, padding, overhead (issue 2)", command, "\n\n".join(parts),
                  results="pipeline.md", headline="\n\n".join(parts))


if __name__ == "__main__":
    main()
