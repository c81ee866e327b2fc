"""The last stage of each compressing path: the compressed models beside the dense one, as ratios.

`summary_<path>` reads the metrics of the path's evaluations and writes
`metrics/summary_<path>.json`: each model's score, parameters, size and
latency, and against the dense model the share of the score and of the
parameters kept and the speed-up. Being last, it is what `dvc repro
summary_<path>` names to run the whole path, every evaluation included.

The speed-ups come from one measurement here, the models timed in turn round
after round in this process (`latency_side_by_side`); each evaluation's own
latency, taken minutes apart under whatever load the machine had then, is
kept as `standalone_latency_ms`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank.config import EvaluateConfig, Params
from lowrank.io.files import read_json
from lowrank.pipeline.common import EVALUATIONS
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


def compare(evaluations: dict[str, dict[str, Any]], side_by_side: dict[str, dict[str, Any]] | None = None,
            goal: str = "max") -> dict[str, Any]:
    """Each model's headline figures, and the compressed ones' ratios to the first (dense) one.

    `score_kept` is the score's ratio to the dense one's, inverted where lower is better (`goal` min: a perplexity),
    so 1 is the dense model's quality and less is worse either way.

    `side_by_side` (runtime -> `latency_side_by_side`'s result) gives `latency_ms` and `speedup` (medians, with
    `speedup_spread` [p10, p90]); without it there are no speed-ups, only each evaluation's standalone latency.
    """
    models = {
        label: {
            "score": metrics["task"]["score"],
            "params_target_linear": metrics["params"]["target_linear"],
            "params_total": metrics["params"]["total"],
            "size_bytes": metrics["size_bytes"],
            "standalone_latency_ms": _latencies(metrics),
        }
        for label, metrics in evaluations.items()
    }
    dense_label = next(iter(models))
    dense = models[dense_label]
    for label, model in models.items():
        timed = {f"{runtime}.{batch}": result for runtime, batches in (side_by_side or {}).items() for batch, result in batches.items()}
        if timed:
            model["latency_ms"] = {key: result["ms"][label]["median"] for key, result in timed.items()}
        if label == dense_label:
            continue
        model["score_kept"] = score_kept(model["score"], dense["score"], goal)
        model["params_kept"] = model["params_target_linear"] / dense["params_target_linear"]
        model["size_kept"] = model["size_bytes"] / dense["size_bytes"]
        if timed:
            model["speedup"] = {key: result["speedup"][label]["median"] for key, result in timed.items()}
            model["speedup_spread"] = {key: [result["speedup"][label]["p10"], result["speedup"][label]["p90"]] for key, result in timed.items()}
    return models


def time_side_by_side(cfg: EvaluateConfig, folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The models of `folders` (the dense one first) timed side by side, per runtime `evaluate` names."""
    from lowrank.evaluation import latency_side_by_side
    from lowrank.io.checkpoints import load_compressed

    if not cfg.latency:
        return {}
    models = {label: load_compressed(folder).cpu() for label, folder in folders.items()}  # a CPU figure, as evaluate's
    return {
        runtime: latency_side_by_side(models, cfg.latency_batch_sizes, cfg.latency_seq_len, cfg.latency_warmup,
                                      cfg.latency_repeats, cfg.threads, runtime)
        for runtime in cfg.latency_runtimes
    }


MODELS: dict[str, tuple[str, ...]] = {}  # summary stage -> its models' labels, the dense one first, the shipped one last


def register_summary(path: str, evaluations: dict[str, str]) -> None:
    """`summary_<path>`: `evaluations` maps a model's label to its evaluate stage, the dense one first."""
    MODELS[f"summary_{path}"] = tuple(evaluations)

    def summarize(p: Params, io: StageIO) -> StageResult:
        from lowrank.kinds import task_goal

        timed = time_side_by_side(p.evaluate, {label: io.inputs[f"model_{label}"] for label in evaluations})
        goal = task_goal(p.data.task, p.data.custom.kind if p.data.custom else None)
        return io.finish(compare({label: read_json(io.inputs[label]) for label in evaluations}, timed, goal))

    inputs = {label: f"{name}.metrics" for label, name in evaluations.items()}
    inputs.update({f"model_{label}": EVALUATIONS[name] for label, name in evaluations.items()})
    stage(f"summary_{path}", params=("evaluate",), inputs=inputs, ends_path=path)(summarize)


register_summary("factorize", {"dense": "evaluate_dense", "factorized": "evaluate_factorized", "compressed": "evaluate_compressed"})
register_summary("factorize_only", {"dense": "evaluate_dense", "factorized": "evaluate_factorized"})
register_summary("lpaf", {"dense": "evaluate_dense", "pruned_factorized": "evaluate_pruned_factorized", "lpaf": "evaluate_lpaf"})


def score_kept(score: float, dense: float, goal: str = "max") -> float | None:
    """The share of the dense model's score a model keeps: score / dense, or dense / score where lower is better."""
    num, den = (score, dense) if goal == "max" else (dense, score)
    return num / den if den else None


def pareto(points: list[tuple[float, float]], goal: str = "max") -> list[bool]:
    """Which (score, cost) points no other point beats: a score at least as good (`goal`) at a cost at most as
    low, one of them strictly."""
    from lowrank.kinds import better

    return [
        not any(not better(score, s, goal) and c <= cost and (better(s, score, goal) or c < cost) for s, c in points)
        for score, cost in points
    ]
