"""The factorize path's stages: Fisher of the dense model, factorize it, fine-tune the factors ("+ ft").

    finetune -> fisher -> factorize -> finetune_compressed, each model evaluated
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lowrank.config import Params
from lowrank.devices import place
from lowrank.api import compress_, target_names
from lowrank.io.files import atomic_dir
from lowrank.methods import get_method, method_names
from lowrank.pipeline.common import register_evaluation, train_and_save
from lowrank.pipeline.prepared import PreparedData
from lowrank.pipeline.stage import StageIO, StageResult, stage


@stage(
    "fisher",
    params=("fisher", "factorize.targets", "factorize.exclude"),
    inputs={"model": "finetune.model", "data": "prepare.data"},
    outputs={"importance": "fisher"},
)
def fisher(p: Params, io: StageIO) -> StageResult:
    """Fisher and Taylor importance of every targeted weight, and the statistics of each one's input (ASVD's
    `abs_mean`, SVD-LLM's `gram`), one `<kind>.safetensors` each, computed in one pass for all methods."""
    from lowrank.io.checkpoints import load_compressed
    from lowrank.train.importance import collect_importance, save_importance

    cfg = p.fisher
    prepared = PreparedData.open(io.inputs["data"])
    model = place(load_compressed(io.inputs["model"]))
    names = target_names(model, p.factorize.targets, p.factorize.exclude)
    started = time.perf_counter()
    scores = collect_importance(
        model, prepared.pass_loader("train", cfg.batch_size, p.data.seed), names, max_samples=cfg.max_samples,
        per_example=cfg.per_example, only_misclassified=cfg.only_misclassified, activations=True,
    )
    with atomic_dir(io.outputs["importance"]) as tmp:
        for kind, importance in scores.items():
            save_importance(importance, tmp / f"{kind}.safetensors")
    metrics = {"layers": len(names), "samples": scores["fisher"].num_samples, "seconds": time.perf_counter() - started}
    return io.finish(metrics)


def calibration_loss(prepared: PreparedData, samples: int, batch_size: int, seed: int):
    """The model's mean task loss on the first `samples` examples of the selection split (the rank search's measure)."""
    from lowrank.data.loading import SELECT
    from lowrank.devices import model_device, to_device

    batches, seen = [], 0
    for batch in prepared.pass_loader(SELECT, batch_size, seed):
        take = min(batch["input_ids"].shape[0], samples - seen)
        batches.append({k: v[:take] for k, v in batch.items()})
        seen += take
        if seen >= samples:
            break

    @torch.no_grad()
    def loss(model: torch.nn.Module) -> float:
        model.eval()
        device = model_device(model)
        total = sum(float(model(**to_device(b, device)).loss) * b["input_ids"].shape[0] for b in batches)
        return total / seen

    return loss


def _mean_by_type(rows: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["type"], []).append(row[key])
    return {kind: sum(values) / len(values) for kind, values in groups.items()}


def cut(model: torch.nn.Module, p: Params, importance_dir: Path, data_dir: Path, keep_ratio: float):
    """Factorize the model's targeted Linear layers in place with the `factorize` section at `keep_ratio`.

    Returns the `compress_` report, the target names and the Fisher scores (the factorize stage's phi reads them).
    """
    from lowrank.train.importance import load_importance

    cfg = p.factorize
    spec = get_method(cfg.method)
    if not spec.accepts("factorize"):
        raise ValueError(f"factorize.method: {cfg.method} factorizes pruned matrices; the factorize stage takes {', '.join(method_names('factorize'))}")
    fisher_scores = load_importance(importance_dir / "fisher.safetensors").scores
    importance = None
    if spec.importance != "none":
        importance = fisher_scores if spec.importance == "fisher" else load_importance(importance_dir / f"{spec.importance}.safetensors").scores
    names = target_names(model, cfg.targets, cfg.exclude)
    missing = [n for n in names if n not in fisher_scores]
    if missing:
        raise ValueError(f"importance at {importance_dir} lacks {missing[0]}: rerun the fisher stage for these targets")
    loss_fn = calibration_loss(PreparedData.open(data_dir), cfg.search_samples, p.fisher.batch_size, p.data.seed) if cfg.allocation == "search" else None
    report = compress_(model, replace(cfg, keep_ratio=keep_ratio), importance=importance, fisher=fisher_scores, loss_fn=loss_fn)
    return report, names, fisher_scores


@stage(
    "factorize",
    params=("factorize",),
    inputs={"model": "finetune.model", "importance": "fisher.importance", "data": "prepare.data"},
    outputs={"model": "factorize/model"},
    plots={"phi": "factorize_phi.png"},
)
def factorize(p: Params, io: StageIO) -> StageResult:
    """Replace each targeted Linear by two low-rank ones (`lowrank.compress_`), and report phi per matrix."""
    from transformers import AutoTokenizer

    from lowrank.io.checkpoints import load_compressed, save_compressed
    from lowrank.linalg.risk import svd_risks
    from lowrank.pipeline.plots import plot_phi

    cfg, model_dir = p.factorize, io.inputs["model"]
    spec = get_method(cfg.method)
    model = place(load_compressed(model_dir))
    report, names, fisher_scores = cut(model, p, io.inputs["importance"], io.inputs["data"], cfg.keep_ratio)
    phi = svd_risks({n: fisher_scores[n] for n in names})
    # The paper's phi shrinks as 1/N; times N it compares matrices of different shapes.
    phi_scaled = svd_risks({n: fisher_scores[n] for n in names}, size_invariant=True)
    for row in report.layers:
        row["phi"], row["phi_size_invariant"] = phi[row["layer"]], phi_scaled[row["layer"]]
    extra = {"keep_ratio": cfg.keep_ratio, "allocation": cfg.allocation, "solver": spec.solver_name(cfg.solver), "options": asdict(cfg.method_options())}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    save_compressed(model, io.outputs["model"], method=cfg.method, targets=names, tokenizer=tokenizer, extra=extra)
    plot_phi(report.layers, io.plots["phi"])
    metrics = report.metrics()
    metrics["phi_by_type"] = _mean_by_type(report.layers, "phi")
    metrics["phi_size_invariant_by_type"] = _mean_by_type(report.layers, "phi_size_invariant")
    return io.finish(metrics)


register_evaluation("evaluate_factorized", "factorize.model")


def collapse_report(history: list[dict], majority: float | None) -> dict[str, Any]:
    """Every epoch at which fine-tuning took a model that scored above the task kind's trivial answer down to
    exactly it (`majority` is that answer's score: the majority class, all `O` tags, empty answers; the key keeps
    its name). `collapsed` is true when any epoch did, also when keep_best ended on another one. A kind without
    a trivial answer (`majority` None: a language model's perplexity) never collapses.
    """
    start = history[0]["score"] if history and history[0]["epoch"] == 0 else None
    fell = [] if start is None or majority is None or start <= majority + 1e-9 else [
        int(row["epoch"]) for row in history[1:] if abs(row["score"] - majority) <= 1e-9
    ]
    return {"start_score": start, "majority_score": majority, "collapsed": bool(fell), "collapsed_epochs": fell}


@stage(
    "finetune_compressed",
    params=("train", "finetune_compressed"),
    inputs={"model": "factorize.model", "teacher": "finetune.model", "data": "prepare.data", "importance": "fisher.importance"},
    outputs={"model": "finetune_compressed/model"},
    trains=True,
)
def finetune_compressed(p: Params, io: StageIO) -> StageResult:
    """Fine-tune a compressed model again ("+ ft" in the papers), keeping its ranks.

    The compressed model is scored first (epoch 0), so `keep_best` ends on it
    when no epoch does better; `finetune_compressed.distill` distils from the
    dense model (in two stages with `distill.intermediate`). With `schedule`,
    the dense model is cut gradually instead (`gradual`), and epoch 0 is the
    model after the last cut. An epoch that falls to the trivial answer's score
    (majority class, all `O`, empty answers) from above it is reported
    (`collapsed`, `collapsed_epochs`) with a warning.
    """
    from lowrank.io.checkpoints import load_compressed, recipe, recipe_extra, write_compressed

    cfg = p.finetune_compressed
    prepared = PreparedData.open(io.inputs["data"])
    model = place(load_compressed(io.inputs["model"]))
    teacher = place(load_compressed(io.inputs["teacher"])) if cfg.distill.enabled else None
    entry = recipe(model)
    extra = {**recipe_extra(entry), "finetuned": True}
    schedule: dict[str, Any] = {}
    if cfg.schedule:
        model, schedule = gradual(p, io, prepared, teacher)
        extra["schedule"] = [*cfg.schedule, p.factorize.keep_ratio]

    def save(m: torch.nn.Module, path: Path) -> None:
        write_compressed(m, path, method=entry.get("method", "dense"), targets=list(entry.get("ranks", {})), extra=extra)

    def report(result) -> dict:
        found = collapse_report(result.history, prepared.baseline_score())
        if found["collapsed"]:
            sys.stderr.write(  # not print: inside a Prefect flow that becomes a (quiet) log record
                f"warning: finetune_compressed fell to the trivial answer's score {found['majority_score']:.4f} at epoch(s) "
                f"{', '.join(map(str, found['collapsed_epochs']))}, from {found['start_score']:.4f} before fine-tuning\n"
            )
        return {**found, **schedule}

    return train_and_save(
        model, prepared, cfg, io, "finetune_compressed", save, report,
        teacher=teacher, distill=cfg.distill if teacher is not None else None, score_start=True,
    )


def gradual(p: Params, io: StageIO, prepared: PreparedData, teacher: torch.nn.Module | None) -> tuple[torch.nn.Module, dict]:
    """Cut the dense model at each keep ratio of `finetune_compressed.schedule`, training after each cut, then
    cut it to `factorize.keep_ratio`; each cut factorizes the product of the current factors again.

    The training after a cut is `schedule_epochs` long, with stage 1's loss when distilling (the blocks'
    outputs and attention maps: what keeps the next cut close to the dense model), else the task loss.
    Returns the model at the target ratio, before its + ft, and what the schedule did.
    """
    from lowrank.io.checkpoints import load_compressed
    from lowrank.modules.surgery import densify_
    from lowrank.train.loop import LossWeights, Phase, train

    cfg = p.finetune_compressed
    model = place(load_compressed(io.inputs["teacher"]))  # the dense fine-tuned model
    run = replace(cfg, epochs=cfg.schedule_epochs, max_steps=None, keep_best=False)
    weights = LossWeights.intermediate(cfg.distill) if teacher is not None else LossWeights()
    loader = prepared.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    cuts = []
    for ratio in cfg.schedule:
        cut(model, p, io.inputs["importance"], io.inputs["data"], ratio)
        result = train(model, loader, run, evaluate=prepared.select_fn(cfg.eval_batch_size), teacher=teacher,
                       distill=cfg.distill if teacher is not None else None, plan=[Phase("cut", run, weights)],
                       description=f"finetune_compressed cut {ratio:g}")
        cuts.append({"keep_ratio": ratio, "steps": result.steps, "train_seconds": result.seconds, "score": result.best_score})
        densify_(model)
    cut(model, p, io.inputs["importance"], io.inputs["data"], p.factorize.keep_ratio)
    total = len(cfg.schedule) * cfg.schedule_epochs + cfg.distill.intermediate.epochs * (teacher is not None) + cfg.epochs
    return model, {"cuts": cuts, "total_epochs": total}


register_evaluation("evaluate_compressed", "finetune_compressed.model")
