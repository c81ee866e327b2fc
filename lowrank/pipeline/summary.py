"""The last stage of each compressing path: the compressed models beside the dense one, as ratios.

`summary_<path>` reads the metrics of the path's evaluations and writes
`metrics/summary_<path>.json`: each model's score, parameters, size and
latency, and against the dense model the share of the score and of the
parameters kept and the speed-up. Being last, it is what `dvc repro
summary_<path>` names to run the whole path, every evaluation included.
"""

from __future__ import annotations

from typing import Any

from lowrank.config import Params
from lowrank.io.files import read_json
from lowrank.pipeline.stage import StageIO, StageResult, stage


def _latencies(metrics: dict[str, Any]) -> dict[str, float]:
    """`runtime.batch_N` -> median ms, for every runtime the evaluation timed."""
    found = {}
    for key, value in metrics.items():
        if key == "latency" or key.startswith("latency_"):
            runtime = "torch" if key == "latency" else key[len("latency_"):]
            for batch, timing in value.items():
                if isinstance(timing, dict) and "median_ms" in timing:
                    found[f"{runtime}.{batch}"] = timing["median_ms"]
    return found


def compare(evaluations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each model's headline figures, and the compressed ones' ratios to the first (dense) one."""
    models = {
        label: {
            "score": metrics["task"]["score"],
            "params_target_linear": metrics["params"]["target_linear"],
            "params_total": metrics["params"]["total"],
            "size_bytes": metrics["size_bytes"],
            "latency_ms": _latencies(metrics),
        }
        for label, metrics in evaluations.items()
    }
    dense = next(iter(models.values()))
    for model in list(models.values())[1:]:
        model["score_kept"] = model["score"] / dense["score"] if dense["score"] else None
        model["params_kept"] = model["params_target_linear"] / dense["params_target_linear"]
        model["size_kept"] = model["size_bytes"] / dense["size_bytes"]
        model["speedup"] = {k: dense["latency_ms"][k] / v for k, v in model["latency_ms"].items() if k in dense["latency_ms"] and v}
    return models


def register_summary(path: str, evaluations: dict[str, str]) -> None:
    """`summary_<path>`: `evaluations` maps a model's label to its evaluate stage, the dense one first."""

    def summarize(p: Params, io: StageIO) -> StageResult:
        return io.finish(compare({label: read_json(io.inputs[label]) for label in evaluations}))

    stage(f"summary_{path}", params=(), inputs={label: f"{name}.metrics" for label, name in evaluations.items()})(summarize)


register_summary("factorize", {"dense": "evaluate_dense", "factorized": "evaluate_factorized", "compressed": "evaluate_compressed"})
register_summary("factorize_only", {"dense": "evaluate_dense", "factorized": "evaluate_factorized"})
register_summary("lpaf", {"dense": "evaluate_dense", "pruned_factorized": "evaluate_pruned_factorized", "lpaf": "evaluate_lpaf"})


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which (score, cost) points no other point beats: a score at least as high at a cost at most as low, one of them strictly."""
    return [
        not any(s >= score and c <= cost and (s > score or c < cost) for s, c in points)
        for score, cost in points
    ]
