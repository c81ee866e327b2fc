"""The product's stages, run on a benchmark's own folders (until the benchmarks run as sweeps).

quality.py and lpaf.py keep many configurations side by side, so they give each
stage its own paths instead of the workspace's; the stage code is the one
`lowrank run` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank.config import Params
from lowrank.io.files import read_json
from lowrank.pipeline import StageIO, get_stage


def call_stage(
    name: str, params: Params, metrics: Path, inputs: dict[str, Path] | None = None, outputs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Run stage `name` reading `inputs` and writing `outputs` (by the keys its declaration names); its metrics go to `metrics`."""
    st = get_stage(name)
    inputs, outputs = dict(inputs or {}), dict(outputs or {})
    missing = (set(st.inputs) - set(inputs)) | (set(st.outputs) - set(outputs))
    if missing:
        raise ValueError(f"stage {name}: no path given for {sorted(missing)}")
    beside = lambda rel: metrics.with_name(f"{metrics.stem}.{rel}")  # noqa: E731  plots and reports next to the metrics
    io = StageIO(
        {k: Path(v) for k, v in inputs.items()}, {k: Path(v) for k, v in outputs.items()},
        {k: beside(rel) for k, rel in st.plots.items()}, {k: beside(rel) for k, rel in st.reports.items()}, metrics,
    )
    st.fn(params, io)
    return read_json(metrics)


def dense_runs(out: Path, params: Params) -> tuple[Path, Path, Path, Path]:
    """A benchmark task folder's shared stages, run once: (data, dense model, Fisher, metrics folder)."""
    data, dense, fisher, metrics = out / "data", out / "finetune" / "model", out / "fisher", out / "metrics"
    if not data.exists():
        call_stage("prepare", params, metrics / "prepare.json", outputs={"data": data})
    if not dense.exists():
        call_stage("finetune", params, metrics / "finetune.json", {"data": data}, {"model": dense})
    if not fisher.exists():
        call_stage("fisher", params, metrics / "fisher.json", {"model": dense, "data": data}, {"importance": fisher})
    return data, dense, fisher, metrics
