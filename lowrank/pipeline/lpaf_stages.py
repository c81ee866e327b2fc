"""LPAF's stages (Ren & Zhu 2023): prune, factorize the pruned matrices, mixed-rank fine-tuning.

Fine-tuned weights are effectively full rank, so factorizing them directly
loses much at moderate compression; first-order pruning leaves matrices of
low effective rank, which factorize well. The path is

    finetune -> prune -> factorize_pruned -> mrft, each model evaluated

prune writes the pruned model (pruned entries zero) and its masks and scores;
factorize_pruned the factors and a copy of the masks (mrft's sparse paths);
mrft the final model, factors only, which loads with `load_compressed`.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lowrank.config import DistillationConfig, FactorizeConfig, FisherConfig, Params, check_lpaf_factorize
from lowrank.devices import model_device, place
from lowrank.io.files import atomic_dir, write_json
from lowrank.methods import get_method
from lowrank.pipeline.common import register_evaluation, train_metrics
from lowrank.api import compress_, target_names
from lowrank.pipeline.prepared import PreparedData
from lowrank.pipeline.stage import StageIO, StageResult, stage


def _teacher(cfg: DistillationConfig, teacher_dir: Path, loaded: torch.nn.Module | None = None) -> torch.nn.Module | None:
    """The dense fine-tuned model to distil from, or None when distillation is off."""
    from lowrank.io.checkpoints import load_compressed

    if not cfg.enabled:
        return None
    return loaded or place(load_compressed(teacher_dir))


# --------------------------------------------------------------------------- prune


def _mean_ratios(rows: list[dict]) -> dict[str, float]:
    keys = [k for k in rows[0] if k.endswith("_ratio")]
    return {key: sum(row[key] for row in rows) / len(rows) for key in keys}


def _mean_tail_share(rows: list[dict]) -> float:
    """Mean over the factorized matrices of the energy share beyond their rank: LPAF's premise, in one number."""
    shares = [row["tail_share"] for row in rows if "tail_share" in row]
    return sum(shares) / max(len(shares), 1)


@stage(
    "prune",
    params=("prune", "train", "model", "factorize.keep_ratio", "factorize.rank_multiple", "factorize.targets", "factorize.exclude"),
    inputs={"model": "finetune.model", "data": "prepare.data"},
    outputs={"model": "prune/model", "masks": "prune/masks.safetensors"},
    plots={"ranks": "prune_ranks.png"},
    reports={"ranks": "prune_ranks.json"},
    trains=True,
)
def prune(p: Params, io: StageIO) -> StageResult:
    """Prune the targeted matrices during fine-tuning, then compare their effective ranks.

    Starts from the dense fine-tuned model (or the pretrained one), prunes to
    `prune.final_density` (default `density_factor` x `factorize.keep_ratio`)
    on a cubic schedule, and writes the pruned model and its masks and scores.
    The rank analysis (LPAF's premise) reports the effective ranks of the dense
    model, of a one-shot magnitude pruning at the same density, and of this
    stage's model.
    """
    from lowrank.io.checkpoints import load_compressed, save_compressed
    from lowrank.io.models import load_for_task
    from lowrank.linalg.ranks import allocate_ranks
    from lowrank.linalg.spectra import rank_report
    from lowrank.modules.surgery import dense_weights
    from lowrank.pipeline.plots import plot_rank_report
    from lowrank.train.loop import total_steps, train
    from lowrank.train.pruning import Pruner, prune_once
    from lowrank.train.rank_pull import pruning_pull_hooks

    cfg, factorize_cfg = p.prune, p.factorize
    # Under `dvc repro evaluate_lpaf` the path setting is not checked: fail before pruning, not after.
    check_lpaf_factorize(factorize_cfg)
    prepared = PreparedData.open(io.inputs["data"])
    dense = place(load_compressed(io.inputs["model"]))
    names = target_names(dense, factorize_cfg.targets, factorize_cfg.exclude)
    if cfg.start_from == "pretrained":
        torch.manual_seed(cfg.train.seed)
        model = place(load_for_task(p.model, prepared.spec))
    else:
        model = copy.deepcopy(dense)
    loader = prepared.loader("train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    warmup, cooldown = cfg.schedule_steps(total_steps(cfg.train, len(loader)))
    density = cfg.density(factorize_cfg.keep_ratio)
    pruner = Pruner(
        names, method=cfg.method, final_density=density, warmup_steps=warmup, cooldown_steps=cooldown,
        scope=cfg.scope, update_every=cfg.update_every, taylor_beta=cfg.taylor_beta,
    )
    shapes = {n: tuple(w.shape) for n, w in dense_weights(dense, names).items()}
    ranks = {n: r for n, r in allocate_ranks(shapes, factorize_cfg.keep_ratio, "uniform", factorize_cfg.rank_multiple).items() if r}
    hooks: list = [pruner]
    if cfg.rank_pull > 0:
        hooks = pruning_pull_hooks(pruner, ranks, cfg.rank_pull, cfg.rank_pull_every, cfg.rank_pull_importance, cfg.rank_pull_pruned_weight)
    teacher = _teacher(cfg.distill, io.inputs["model"], dense)
    result = train(
        model, loader, cfg.train, evaluate=prepared.select_fn(cfg.train.eval_batch_size), hooks=hooks,
        teacher=teacher, distill=cfg.distill if teacher is not None else None, keep_best=False, description="prune",
    )
    extra = {"prune_method": cfg.method, "density": density, "scope": cfg.scope, "start_from": cfg.start_from, "rank_pull": cfg.rank_pull, "rank_pull_importance": cfg.rank_pull_importance}
    with atomic_dir(io.outputs["model"].parent) as tmp:
        save_compressed(model, tmp / io.outputs["model"].name, method="pruned", targets=names, tokenizer=prepared.tokenizer, extra=extra)
        pruner.save(tmp / io.outputs["masks"].name)

    masks = pruner.masks()
    metrics: dict[str, Any] = {
        "density_target": density,
        "density": pruner.density(),
        "density_per_matrix": {name: float(masks[name].float().mean()) for name in names},
        "warmup_steps": warmup,
        "cooldown_steps": cooldown,
        **train_metrics(result, "score"),
    }
    energies = tuple(cfg.rank_energies or ())
    reports = {"dense": rank_report(dense_weights(dense, names), energies, ranks)}
    if energies:
        one_shot = copy.deepcopy(dense)
        prune_once(one_shot, names, density, scope=cfg.scope)
        reports["magnitude_one_shot"] = rank_report(dense_weights(one_shot, names), energies, ranks)
    reports[cfg.method] = rank_report(dense_weights(model, names), energies, ranks)
    # what factorizing at the ranks of factorize.keep_ratio would lose, before and after pruning
    metrics["tail_share_dense"] = _mean_tail_share(reports["dense"])
    metrics["tail_share"] = _mean_tail_share(reports[cfg.method])
    if energies:
        write_json(io.reports["ranks"], {"density": density, "models": reports})
        plot_rank_report(reports, io.plots["ranks"])
        metrics["rank_ratio"] = {label: _mean_ratios(rows) for label, rows in reports.items()}
    return io.finish(metrics, {"history": result.history})


# --------------------------------------------------------------------------- factorize_pruned


def pruned_importance(
    cfg: FactorizeConfig, fisher_cfg: FisherConfig, model: torch.nn.Module, names: list[str],
    scores: dict[str, torch.Tensor], prepared: PreparedData, seed: int = 0,
) -> dict[str, torch.Tensor] | None:
    """The importance the sparse methods weigh entries by: the pruned model's Fisher, or the pruning scores.

    The Fisher is collected on the pruned model (not the dense one): its
    gradients are those of the function the factors must reproduce.
    """
    from lowrank.train.importance import collect_importance

    if get_method(cfg.method).importance != "sparse":
        return None
    if cfg.method_options().importance == "scores":  # a sparse method's options say which (the registry insists)
        return dict(scores)
    collected = collect_importance(
        model, prepared.pass_loader("train", fisher_cfg.batch_size, seed), names, max_samples=fisher_cfg.max_samples,
        per_example=fisher_cfg.per_example, only_misclassified=fisher_cfg.only_misclassified,
    )
    return collected["fisher"].scores


@stage(
    "factorize_pruned",
    params=("factorize", "fisher"),
    inputs={"model": "prune.model", "masks": "prune.masks", "data": "prepare.data"},
    outputs={"model": "factorize_pruned/model", "masks": "factorize_pruned/masks.safetensors"},
)
def factorize_pruned(p: Params, io: StageIO) -> StageResult:
    """Factorize the pruned matrices at the ranks `factorize.keep_ratio` gives, sparsity-aware (`lowrank.compress_`)."""
    from transformers import AutoTokenizer

    from lowrank.io.checkpoints import load_compressed, recipe, save_compressed
    from lowrank.train.pruning import load_pruning_state

    cfg = p.factorize
    check_lpaf_factorize(cfg)
    model = place(load_compressed(io.inputs["model"]))
    device = model_device(model)
    masks, scores = ({n: t.to(device) for n, t in state.items()} for state in load_pruning_state(io.inputs["masks"]))
    names = [name for name, _ in model.named_modules() if name in masks]  # model order
    started = time.perf_counter()
    importance = pruned_importance(cfg, p.fisher, model, names, scores, PreparedData.open(io.inputs["data"]), p.data.seed)
    importance_seconds = time.perf_counter() - started
    report = compress_(model, cfg, importance=importance, masks=masks)

    pruned_entry = recipe(model)
    extra = {
        "keep_ratio": cfg.keep_ratio,
        "allocation": "uniform",
        "solver": get_method(cfg.method).solver_name(cfg.solver),
        "options": asdict(cfg.method_options()),
        "pruned": {k: pruned_entry[k] for k in ("prune_method", "density", "scope") if k in pruned_entry},
    }
    tokenizer = AutoTokenizer.from_pretrained(str(io.inputs["model"]))
    with atomic_dir(io.outputs["model"].parent) as tmp:
        save_compressed(model, tmp / io.outputs["model"].name, method=cfg.method, targets=names, tokenizer=tokenizer, extra=extra)
        shutil.copyfile(io.inputs["masks"], tmp / io.outputs["masks"].name)
    metrics = report.metrics()
    metrics["importance_seconds"] = importance_seconds
    return io.finish(metrics)


register_evaluation("evaluate_pruned_factorized", "factorize_pruned.model")


# --------------------------------------------------------------------------- mrft


@stage(
    "mrft",
    params=("train", "mrft"),
    inputs={
        "pruned": "prune.model", "factorized": "factorize_pruned.model", "masks": "factorize_pruned.masks",
        "teacher": "finetune.model", "data": "prepare.data",
    },
    outputs={"model": "mrft/model"},
    trains=True,
)
def mrft(p: Params, io: StageIO) -> StageResult:
    """Mixed-rank fine-tuning: factors trained beside their sparse matrices, then saved alone.

    Each factorized layer of the pruned model becomes a MixedRankLinear (the
    pruned `W * M` and the factors of factorize_pruned); after training only
    the factors remain, so the saved folder is an ordinary compressed model.
    """
    from lowrank.io.checkpoints import load_compressed, recipe, recipe_extra, save_compressed
    from lowrank.linalg.ranks import kept_ratio
    from lowrank.modules.layers import FactorizedLinear
    from lowrank.modules.mixed_rank import finalize, to_mixed_rank
    from lowrank.train.loop import train
    from lowrank.train.mixed_rank import MixedRankScheduler
    from lowrank.train.pruning import load_pruning_state

    cfg = p.mrft
    prepared = PreparedData.open(io.inputs["data"])
    model = place(load_compressed(io.inputs["pruned"]))
    factorized = place(load_compressed(io.inputs["factorized"]))
    entry = recipe(factorized)
    factors = {
        name: (m.up.weight.detach(), m.down.weight.detach())  # (out, rank), (rank, in)
        for name, m in factorized.named_modules()
        if isinstance(m, FactorizedLinear)
    }
    del factorized
    masks, _ = load_pruning_state(io.inputs["masks"])
    mixed = to_mixed_rank(model, factors, masks, train_sparse=cfg.train_sparse)

    scheduler = MixedRankScheduler(cfg.p0, cfg.ramp_share, cfg.seed)
    teacher = _teacher(cfg.distill, io.inputs["teacher"])
    loader = prepared.loader("train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    result = train(
        model, loader, cfg.train, evaluate=prepared.select_fn(cfg.train.eval_batch_size), hooks=[scheduler],
        teacher=teacher, distill=cfg.distill if teacher is not None else None, description="mrft", goal=prepared.kind.goal,
    )
    finalize(model)
    targets = list(entry.get("ranks", {}))
    extra = recipe_extra(entry)
    extra.update({"factorize_method": entry.get("method"), "mixed_rank": {"p0": cfg.p0, "ramp_share": cfg.ramp_share}})
    save_compressed(model, io.outputs["model"], method="lpaf", targets=targets, tokenizer=prepared.tokenizer, extra=extra)

    shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
    ranks = {name: factors[name][0].shape[1] if name in factors else None for name in shapes}
    metrics = {"layers_mixed": len(mixed), "keep_ratio_reached": kept_ratio(shapes, ranks), **train_metrics(result, "score")}
    return io.finish(metrics, {"history": result.history})


register_evaluation("evaluate_lpaf", "mrft.model")
