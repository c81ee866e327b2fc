"""What a person reads on stderr at the end of `run` and `sweep`: the dense model against the compressed ones.

The figures are the summary stage's (lowrank/pipeline/summary.py): score, parameters of the targeted layers, file
size, and latency from its side-by-side timing (the speed-up in brackets). stdout keeps the JSON alone.
"""

from __future__ import annotations

from typing import Any


def _models(stage: str, metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"dense.score": 0.9, "dense.latency_ms.torch.batch_1": 3.1, ...}` -> `{"dense": {"score": 0.9, ...}}`, in the
    summary stage's order (the dense model first, the shipped one last), whatever order the keys were stored in."""
    from lowrank.pipeline.summary import MODELS

    models: dict[str, dict[str, Any]] = {label: {} for label in MODELS[stage]}
    for key, value in metrics.items():
        label, _, rest = key.partition(".")
        models.setdefault(label, {})[rest] = value
    return {label: model for label, model in models.items() if model}


def _first_latency(model: dict[str, Any]) -> str | None:
    """The first side-by-side timing (the first runtime at the smallest batch), e.g. `torch.batch_1`."""
    return next((key[len("latency_ms."):] for key in model if key.startswith("latency_ms.")), None)


def _size(value: float | None) -> str:
    if value is None:
        return ""
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def model_rows(stage: str, metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per model of a summary stage's flat metrics, the dense one first."""
    models = _models(stage, metrics)
    timing = _first_latency(next(iter(models.values()), {}))
    header = ["model", "score", "params", "size", f"latency {timing.replace('.batch_', ', batch ')}" if timing else "latency"]
    rows = []
    for label, model in models.items():
        kept = model.get("params_kept")
        params = f"{model.get('params_target_linear', 0):,.0f}" + (f" ({kept:.0%})" if kept is not None else "")
        latency = ""
        if timing and f"latency_ms.{timing}" in model:
            latency = f"{model[f'latency_ms.{timing}']:.2f} ms"
            if f"speedup.{timing}" in model:
                latency += f" ({model[f'speedup.{timing}']:.2f}x)"
        rows.append([label, f"{model.get('score', float('nan')):.4f}", params, _size(model.get("size_bytes")), latency])
    return header, rows


def run_table(summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """`lowrank run`'s table, from its summary stage; None when the path has none (a run that stopped early)."""
    stage = next((name for name in summary if name.startswith("summary_")), None)
    return model_rows(stage, summary[stage]["metrics"]) if stage else None


def sweep_table(configs: list[tuple[str, str, dict[str, Any] | None]]) -> tuple[list[str], list[list[str]]] | None:
    """`lowrank sweep`'s table from (label, summary stage, its metrics or None if it failed): per configuration, its
    dense model and the model it ships (its summary's last)."""
    header, rows = ["configuration"], []
    for label, stage, metrics in configs:
        if not metrics:
            rows.append([label, "failed"])
            continue
        head, models = model_rows(stage, metrics)
        header = ["configuration", *head]
        rows += [[label, *models[0]], ["", *models[-1]]]
    return (header, rows) if len(header) > 1 else None


def print_table(table: tuple[list[str], list[list[str]]] | None, title: str) -> None:
    """The table on stderr (plain text when stderr is not a terminal)."""
    if table is None:
        return
    from rich.console import Console
    from rich.table import Table

    header, rows = table
    view = Table(title=title, box=None, title_justify="left", pad_edge=False)
    for column in header:
        view.add_column(column, justify="left" if column in ("model", "configuration") else "right")
    for row in rows:
        view.add_row(*row, *[""] * (len(header) - len(row)))
    Console(stderr=True, width=200 if not Console(stderr=True).is_terminal else None).print(view)
