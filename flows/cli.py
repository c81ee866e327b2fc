"""The `lowrank` command line: run the flow, run one stage (for DVC), open the UIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import lifecycle
from .environment import configure as configure_environment

configure_environment()

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)

PARAMS = typer.Option("params.yaml", "--params", "-p", help="The params file.")
SET = typer.Option(None, "--set-param", "-S", help="Override a param, DVC style: -S finetune.lr=3e-5.")


def _print(obj: object) -> None:
    """The command's result, alone on stdout (progress and logs go to stderr): `lowrank run | jq .` works."""
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of a bad input too (or LOWRANK_DEBUG=1)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Hide progress bars."),
) -> None:
    """Compress fine-tuned Transformer encoders by importance-weighted low-rank factorization."""
    lifecycle.configure(debug, quiet)


def _checked(params: Path, overrides: list[str], run_remote_code: bool = False):
    """The validated params, with every input they name checked: before Prefect starts or a model loads."""
    from lowrank.config import load_params
    from lowrank.pipeline import preflight

    config = load_params(params, overrides)
    preflight(config, run_remote_code)
    return config


@app.command()
def run(params: Path = PARAMS, set_param: Optional[List[str]] = SET, no_cache: bool = typer.Option(False, help="Rerun every stage.")) -> None:
    """Run the whole `compress` flow under Prefect, tracked in MLflow."""
    overrides = list(set_param or [])
    if no_cache:
        overrides.append("orchestration.cache=false")
    with lifecycle.user_errors():
        config = _checked(params, overrides)  # a bad input fails here, before anything starts
        owner = lifecycle.claim()  # before Prefect starts its temporary server, which inherits the mark
        from prefect import tags

        from .runners import shared_api

        def prepare():  # while the server starts: what died cleaned up, the flow's imports (MLflow, the stages)
            lifecycle.recover(config)
            from .compress import compress

            return compress

        with shared_api(prepare) as compress, tags(lifecycle.OWNER_PREFECT_TAG + owner):
            summary = compress(str(params), overrides, checked=True)
    from .console import print_table, run_table

    print_table(run_table(summary), "dense against compressed")
    _print(summary)


@app.command()
def sweep(
    params: Path = PARAMS,
    set_param: Optional[List[str]] = SET,
    spec: Optional[Path] = typer.Option(None, help="A sweep spec file (grid:, configs:); default: the sweep section of the params file."),
    runner: str = typer.Option("local", help="local (a process pool) or dask (a local cluster, or --address)."),
    workers: Optional[int] = typer.Option(None, help="Jobs at once (default: the cores)."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per job (default: the cores / workers)."),
    address: Optional[str] = typer.Option(None, help="A running Dask scheduler, e.g. tcp://10.0.0.5:8786."),
    gpu: bool = typer.Option(False, help="Dask: each training stage takes a worker resource GPU=1."),
    yes: bool = typer.Option(False, "--yes", help="Run a sweep of more than 50 configurations."),
) -> None:
    """Run many configurations side by side: shared stages once, every artifact kept, in parallel."""
    overrides = list(set_param or [])
    with lifecycle.user_errors():
        from lowrank.pipeline.sweep_plan import plan, sweep_spec

        from .runners import engine as make_engine

        run_engine = make_engine(runner, workers, threads, address, gpu)  # an address that does not answer fails here
        configs, _ = plan(params, sweep_spec(params, spec, overrides), overrides, yes=yes)
        lifecycle.recover(configs[0].params)
        owner = lifecycle.claim()
        from prefect import tags

        from .sweep_flow import sweep as sweep_flow

        from .runners import shared_api

        with shared_api(), tags(lifecycle.OWNER_PREFECT_TAG + owner):
            summary = sweep_flow.with_options(task_runner=run_engine.runner)(
                str(params), str(spec) if spec else None, overrides, run_engine.threads, gpu, yes, not lifecycle.quiet(),
            )
    _print({**summary, "engine": run_engine.describe()})
    if (summary.get("champion") or {}).get("error"):  # the sweep ran; its select section named nothing it logged
        typer.echo(f"error: {summary['champion']['error']}", err=True)
        raise typer.Exit(2)
    if any(config["status"] != "completed" for config in summary["configs"]):
        raise typer.Exit(1)


@app.command()
def compare(
    params: Path = PARAMS,
    sweep: Optional[str] = typer.Option(None, help="The sweep id (its runs' `sweep` tag); default: the last sweep."),
    fmt: str = typer.Option("table", "--format", help="table (rich, Pareto rows in bold), csv or markdown."),
) -> None:
    """A sweep's configurations side by side from MLflow: score, parameters kept, latency; the Pareto front marked."""
    with lifecycle.user_errors():
        from lowrank.config import InputError, load_params
        from tasks.tracking import sweep_rows

        if fmt not in ("table", "csv", "markdown"):
            raise InputError(f"--format {fmt}: choose table, csv or markdown")
        config = load_params(params)
        try:
            sweep_id, rows = sweep_rows(config.tracking, sweep)
        except LookupError as err:
            raise InputError(str(err)) from None
    columns = ["run", "status", "method", "keep_ratio", "score", "params_kept", "latency_ms.batch_1", "latency_ms.batch_32", "pareto"]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)  # noqa: E731
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows([["" if row[c] is None else row[c] for c in columns] for row in rows])  # full precision
    elif fmt == "markdown":
        typer.echo("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            typer.echo("| " + " | ".join(cell(row[c]) for c in columns) + " |")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"sweep {sweep_id}: Pareto front (score up, parameters kept down) in bold")
        for column in columns[:-1]:
            table.add_column(column)
        for row in rows:
            table.add_row(*(cell(row[c]) for c in columns[:-1]), style="bold" if row["pareto"] else "dim")
        Console().print(table)


@app.command()
def stage(name: str, params: Path = PARAMS, set_param: Optional[List[str]] = SET) -> None:
    """Run one stage (what `dvc repro` calls) out of the store, as `lowrank run` does; then its files are where dvc.yaml says."""
    with lifecycle.user_errors():
        from lowrank.config import load_params
        from lowrank.pipeline import Layout, get_stage, preflight_stage
        from lowrank.pipeline.store import fingerprints, unfinished_upstream
        from tasks import tracking

        from .steps import run_alone

        config = load_params(params, list(set_param or []))
        layout = Layout.from_params(config, fingerprints(config, [name]))
        computed = unfinished_upstream(name, layout)
        preflight_stage(name, config, computed)
        lifecycle.die_with_dvc()
        lifecycle.recover(config)
        lifecycle.claim()
        result, cached = run_alone(name, config, layout, computed)
        if tracking.configure(config.tracking):
            from tasks.models import log_results

            with tracking.flow_run(config, name, {"driver": "dvc"}):
                tracking.log_stage(name, config, result, cached=cached, layout=layout, nested=True)
                log_results({name: result}, config, layout)
    workspace = {key: str(path) for key, path in get_stage(name).output_paths(layout.workspace()).items()}
    _print({"stage": name, "cached": cached, "entry": str(layout.entry(name)), "outputs": workspace, "metrics": result.metrics})


@app.command()
def check(
    params: Path = PARAMS, set_param: Optional[List[str]] = SET,
    run_remote_code: bool = typer.Option(False, help="With model.trust_remote_code: run the checkpoint's code to check its config and targets."),
) -> None:
    """Validate params.yaml and every input it names, without running anything (a checkpoint's own code only if asked)."""
    from lowrank.config import flatten

    with lifecycle.user_errors():
        config = _checked(params, list(set_param or []), run_remote_code)
    _print(flatten(config))


@app.command()
def stages(params: Path = PARAMS) -> None:
    """List the stages of the configured pipeline with their params sections and artifacts."""
    from lowrank.config import load_params
    from lowrank.pipeline import Layout, get_stage, pipeline

    config = load_params(params)
    layout = Layout.from_params(config)
    rows = []
    for name in pipeline(config):
        st = get_stage(name)
        rows.append({"stage": name, "params": st.params, "deps": [str(p) for p in st.input_paths(layout).values()], "outs": [str(p) for p in st.written_paths(layout).values()]})
    _print(rows)


@app.command()
def methods() -> None:
    """List the method table: each factorization method, its importance, solver, masks and path."""
    from lowrank.methods import METHODS

    _print([method.row() for method in METHODS.values()])


@app.command()
def tasks() -> None:
    """List the task kinds (what each model head and score is) and the registered datasets of each."""
    from lowrank.data.catalog import TASKS
    from lowrank.kinds import KINDS

    datasets = lambda kind: [name for name, spec in TASKS.items() if spec.kind == kind] + ["custom"]  # noqa: E731
    _print([{**kind.row(), "datasets": datasets(kind.name)} for kind in KINDS.values()])


@app.command(name="dvc-yaml")
def dvc_yaml() -> None:
    """Print the dvc.yaml the stage declarations imply (the committed one is this output)."""
    from lowrank.pipeline.dvc import dvc_yaml as render

    typer.echo(render(), nl=False)


@app.command()
def schema() -> None:
    """Print the JSON Schema of params.yaml."""
    from lowrank.config import params_schema

    _print(params_schema())


@app.command()
def export(
    model_dir: Path,
    out: Path = typer.Option(None, help="ONNX file (default: MODEL_DIR/model.onnx)."),
    int8: bool = typer.Option(False, "--int8", help="Also write the graph with int8 weights (OUT with .int8.onnx) and a parity report."),
    params: Optional[Path] = typer.Option(None, "--params", "-p", help="With --int8: score both graphs on this params file's task (its dev set)."),
) -> None:
    """Export a (compressed) model folder to ONNX and check its outputs against PyTorch (with --int8, the quantized graph too).

    The graph takes input_ids, attention_mask and, for a model with token types (BERT), token_type_ids.
    """
    with lifecycle.user_errors():
        from lowrank import load_compressed
        from lowrank.io.export import export_onnx, onnx_session, parity, quantize_int8, takes_token_types

        config = None
        if params is not None:
            from lowrank.config import load_params

            config = load_params(params)  # a bad params file fails before the export
        model = load_compressed(model_dir)
        path = out or model_dir / "model.onnx"
        report = {"fp32": {"path": str(path), **export_onnx(model, path, token_types=takes_token_types(model))}}
        if int8:
            quantized = path.with_suffix(".int8.onnx")
            report["int8"] = {"path": str(quantized), **quantize_int8(path, quantized),
                              "max_abs_diff": parity(model, onnx_session(quantized))}
            if config is not None:
                report["task"] = _dev_scores(model, model_dir, config, {"torch": model, "onnxruntime": onnx_session(path),
                                                                        "onnxruntime_int8": onnx_session(quantized)})
            quantized.with_suffix(".json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    _print(report)


def _dev_scores(model, model_dir: Path, config, scored: dict) -> dict:
    """Each of `scored` (the model and its graphs) on the dev set of the params file's task, tokenized as prepare does."""
    from transformers import AutoTokenizer

    from lowrank.data import loading as data_lib
    from lowrank.pipeline import PreparedData

    spec = data_lib.resolve_task(config.data)
    raw = data_lib.load_raw_from_config(config.data, spec)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prepared = PreparedData(spec, data_lib.tokenize(raw, spec, tokenizer, config.data.max_length), tokenizer, config.data.group_by_length)
    evaluate = prepared.evaluate_fn(config.evaluate.batch_size)
    return {name: evaluate(what) for name, what in scored.items()}


@app.command()
def ui(params: Path = PARAMS, port: int = 5000, host: str = "127.0.0.1") -> None:
    """Start the MLflow UI on the project's store (one worker) and say how to start Prefect's."""
    from lowrank.config import load_params

    config = load_params(params)
    typer.echo(
        "Prefect UI: in another shell run\n"
        f"  PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start\n"
        "then open http://127.0.0.1:4200 (set PREFECT_API_URL=http://127.0.0.1:4200/api for runs to report there).\n"
        f"MLflow UI: http://{host}:{port}"
    )
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", config.tracking.uri,
        "--default-artifact-root", Path(config.tracking.artifact_location).resolve().as_uri(),
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    raise typer.Exit(subprocess.call(command, env=env))


@app.command()
def serve(
    params: Path = PARAMS,
    cron: Optional[str] = typer.Option(None, help="Cron schedule, e.g. '0 3 * * *' (default: orchestration.cron)."),
    name: str = "scheduled",
    sweep: bool = typer.Option(False, "--sweep", help="Serve the sweep flow instead of one run."),
    spec: Optional[Path] = typer.Option(None, help="With --sweep: a sweep spec file."),
    runner: str = typer.Option("local", help="With --sweep: local or dask."),
    workers: Optional[int] = typer.Option(None, help="With --sweep: jobs at once."),
    address: Optional[str] = typer.Option(None, help="With --sweep: a Dask scheduler."),
) -> None:
    """Register a scheduled deployment of `compress` (or of `sweep`) and serve it (needs `prefect server start`)."""
    with lifecycle.user_errors():
        from lowrank.config import ConfigError, load_params

        config = load_params(params)
        schedule = cron or config.orchestration.cron
        if not schedule:
            raise ConfigError("serve: give --cron or set orchestration.cron")
        if sweep:
            from lowrank.pipeline.sweep_plan import plan, sweep_spec

            from .runners import engine as make_engine
            from .sweep_flow import sweep as sweep_flow

            run_engine = make_engine(runner, workers, None, address)
            plan(params, sweep_spec(params, spec, []), check=True)  # a bad spec fails now, not at 3 am
            parameters = {"params_path": str(params.resolve()), "spec_path": str(spec.resolve()) if spec else None,
                          "threads": run_engine.threads, "live": False}
            target = sweep_flow.with_options(task_runner=run_engine.runner)
        else:
            from .compress import compress as target

            parameters = {"params_path": str(params.resolve())}
    target.serve(name=name, cron=schedule, parameters=parameters)


if __name__ == "__main__":
    app()
