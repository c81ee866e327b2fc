"""LPAF's stages (Ren & Zhu 2023): prune, factorize the pruned matrices, mixed-rank fine-tuning.

Fine-tuned weights are effectively full rank, so factorizing them directly
loses much at moderate compression; first-order pruning leaves matrices of
low effective rank, which factorize well. The path is

    finetune -> prune -> factorize_pruned -> mrft

and each stage here is a plain function like those in `stages.py`, registered
into the same `STAGES` at the bottom of this module. Artifacts:

    artifacts/prune/             model/ (the pruned model, pruned entries zero) + masks.safetensors (masks, scores)
    artifacts/factorize_pruned/  model/ (factors; load_compressed) + masks.safetensors (mrft's sparse paths)
    artifacts/mrft/model         the final model: factors only, loads with load_compressed
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import LPAF_METHODS, SPARSE_METHODS, DistillationConfig, FactorizeConfig, FisherConfig, ModelConfig
from .config import MrftConfig, Params, PruneConfig
from .config import check_lpaf_factorize
from .devices import model_device, place
from .io import atomic_dir, write_json
from .sparsity import DEFAULT_PRUNED_WEIGHT
from .stages import (
    Layout, PreparedData, Stage, StageResult, _evaluate_stage, _finish, _targets, factorization_metrics, register,
)

MASKS_FILE = "masks.safetensors"


def prune_dir(layout: Layout) -> Path:
    """The prune stage's folder: `model/` and the masks beside it."""
    return layout.artifacts / "prune"


def factorize_pruned_dir(layout: Layout) -> Path:
    """The factorize_pruned stage's folder: `model/` and a copy of the masks."""
    return layout.artifacts / "factorize_pruned"


def _distillation(cfg: DistillationConfig, teacher_dir: Path, teacher: torch.nn.Module | None = None):
    """(teacher, DistillConfig) for `train`, or (None, None) when distillation is off."""
    from .compressed import load_compressed
    from .training import DistillConfig

    if not cfg.enabled:
        return None, None
    return teacher or place(load_compressed(teacher_dir)), DistillConfig(cfg.temperature, cfg.weight)


def _train_metrics(result) -> dict[str, Any]:
    return {
        "score": result.best_score,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "train_samples_per_s": result.train_samples_per_s,
        "history": result.history,
    }


# --------------------------------------------------------------------------- prune


def _mean_ratios(rows: list[dict]) -> dict[str, float]:
    keys = [k for k in rows[0] if k.endswith("_ratio")]
    return {key: sum(row[key] for row in rows) / len(rows) for key in keys}


def run_prune(
    cfg: PruneConfig,
    factorize_cfg: FactorizeConfig,
    model_cfg: ModelConfig,
    dense_dir: Path,
    data_dir: Path,
    out_dir: Path,
    metrics_path: Path,
) -> StageResult:
    """Prune the targeted matrices during fine-tuning, then compare their effective ranks.

    Starts from the dense fine-tuned model (or the pretrained one), prunes to
    `prune.final_density` (default `factorize.keep_ratio`) on a cubic schedule,
    and writes the pruned model and its masks and scores. The rank analysis
    (LPAF's premise) reports the effective ranks of the dense model, of a
    one-shot magnitude pruning at the same density, and of this stage's model.
    """
    from .compressed import load_compressed, save_compressed
    from .models import load_classifier
    from .pruning import PruneOptions, Pruner, prune_once
    from .rank_analysis import plot_rank_report, rank_report
    from .rank_pull import pruning_pull_hooks
    from .ranks import allocate_ranks
    from .surgery import dense_weights
    from .training import total_steps, train

    prepared = PreparedData.open(data_dir)
    dense = place(load_compressed(dense_dir))
    names = _targets(dense, factorize_cfg)
    if cfg.start_from == "pretrained":
        torch.manual_seed(cfg.train.seed)
        labels = list(prepared.spec.label_names) if prepared.spec.label_names else None
        model = place(load_classifier(model_cfg, labels))
    else:
        model = copy.deepcopy(dense)
    loader = prepared.loader("train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    warmup, cooldown = cfg.schedule_steps(total_steps(cfg.train, len(loader)))
    density = cfg.density(factorize_cfg.keep_ratio)
    pruner = Pruner(names, PruneOptions(cfg.method, density, warmup, cooldown, cfg.scope, cfg.update_every, cfg.taylor_beta))
    shapes = {n: tuple(w.shape) for n, w in dense_weights(dense, names).items()}
    ranks = {n: r for n, r in allocate_ranks(shapes, factorize_cfg.keep_ratio, "uniform", factorize_cfg.rank_multiple).items() if r}
    hooks: list = [pruner]
    if cfg.rank_pull > 0:
        hooks = pruning_pull_hooks(pruner, ranks, cfg.rank_pull, cfg.rank_pull_every, cfg.rank_pull_importance, cfg.rank_pull_pruned_weight)
    teacher, distill = _distillation(cfg.distill, dense_dir, dense)
    result = train(
        model, loader, cfg.train, evaluate=prepared.evaluate_fn(cfg.train.eval_batch_size), hooks=hooks,
        teacher=teacher, distill=distill, keep_best=False, description="prune",
    )
    extra = {"prune_method": cfg.method, "density": density, "scope": cfg.scope, "start_from": cfg.start_from, "rank_pull": cfg.rank_pull, "rank_pull_importance": cfg.rank_pull_importance}
    with atomic_dir(out_dir) as tmp:
        save_compressed(model, tmp / "model", method="pruned", targets=names, tokenizer=prepared.tokenizer, extra=extra)
        pruner.save(tmp / MASKS_FILE)

    masks = pruner.masks()
    metrics: dict[str, Any] = {
        "density_target": density,
        "density": pruner.density(),
        "density_per_matrix": {name: float(masks[name].float().mean()) for name in names},
        "warmup_steps": warmup,
        "cooldown_steps": cooldown,
        **_train_metrics(result),
    }
    plots: list[str] = []
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
        report_path = write_json(metrics_path.with_name("prune_ranks.json"), {"density": density, "models": reports})
        plot_path = plot_rank_report(reports, metrics_path.with_name("prune_ranks.png"))
        metrics["rank_ratio"] = {label: _mean_ratios(rows) for label, rows in reports.items()}
        plots = [str(plot_path), str(report_path)]
    return _finish(metrics_path, {"pruned": out_dir}, metrics, {"history": result.history, "plots": plots})


def _mean_tail_share(rows: list[dict]) -> float:
    """Mean over the factorized matrices of the energy share beyond their rank: LPAF's premise, in one number."""
    shares = [row["tail_share"] for row in rows if "tail_share" in row]
    return sum(shares) / max(len(shares), 1)


# --------------------------------------------------------------------------- factorize_pruned


def factorize_pruned_weight(
    method: str,
    weight: torch.Tensor,
    mask: torch.Tensor,
    rank: int,
    importance: torch.Tensor | None = None,
    *,
    pruned_weight: float = DEFAULT_PRUNED_WEIGHT,
    solver: str = "als",
    steps: int = 50,
    options: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors `A (out, rank)`, `B (rank, in)` with `A B ~ W * M`, by one of the lpaf path's methods.

    Args:
        method: "svd" (plain SVD of the pruned matrix, the ablation), "sparse_svd"
            (row-wise closed form) or "sparse_tfwsvd" (element-wise weighted
            solver, started from the closed form on the same weights).
        weight: `(out, in)`; multiplied by `mask` here in case it was not yet.
        mask: `(out, in)`, True where the weight was kept.
        importance: `(out, in)` importance of the entries (None: uniform).
        pruned_weight: the share of its importance a pruned entry keeps.
        solver, steps, options: the element-wise solver of "sparse_tfwsvd" and its settings.
    """
    from .solvers import get_solver
    from .sparsity import rowwise_sparse_svd, sparsity_importance

    pruned = weight.detach() * mask.to(weight.dtype)  # (out, in)
    if method == "svd":
        return get_solver("svd")(pruned, rank)
    if method == "sparse_svd":
        return rowwise_sparse_svd(pruned, mask, rank, importance, pruned_weight=pruned_weight)
    if method == "sparse_tfwsvd":
        # The solver's init "fwsvd" on sparsity importance is the row-wise closed form.
        weights = sparsity_importance(mask, importance, pruned_weight=pruned_weight)
        return get_solver(solver)(pruned, rank, importance=weights, steps=steps, **dict(options or {}))
    raise ValueError(f"factorize.method: {method!r} cannot factorize pruned matrices (use {', '.join(LPAF_METHODS)})")


def pruned_importance(
    cfg: FactorizeConfig, fisher_cfg: FisherConfig, model: torch.nn.Module, names: list[str],
    scores: Mapping[str, torch.Tensor], data_dir: Path,
) -> dict[str, torch.Tensor] | None:
    """The importance the sparse methods weigh entries by: the pruned model's Fisher, or the pruning scores.

    The Fisher is collected on the pruned model (not the dense one): its
    gradients are those of the function the factors must reproduce.
    """
    from .importance import collect_importance

    if cfg.method not in SPARSE_METHODS:
        return None
    if cfg.sparse_importance == "scores":
        return dict(scores)
    prepared = PreparedData.open(data_dir)
    collected = collect_importance(
        model, prepared.loader("train", fisher_cfg.batch_size), names, max_samples=fisher_cfg.max_samples,
        per_example=fisher_cfg.per_example, only_misclassified=fisher_cfg.only_misclassified,
    )
    return collected["fisher"].scores


def run_factorize_pruned(
    cfg: FactorizeConfig, fisher_cfg: FisherConfig, pruned_dir: Path, data_dir: Path, out_dir: Path, metrics_path: Path
) -> StageResult:
    """Factorize the pruned matrices at the ranks `factorize.keep_ratio` gives, sparsity-aware."""
    from transformers import AutoTokenizer

    from .compressed import load_compressed, recipe, save_compressed
    from .matching import matrix_type
    from .pruning import load_pruning_state
    from .ranks import allocate_ranks
    from .solvers import weighted_error
    from .surgery import dense_weights, factorize_model

    check_lpaf_factorize(cfg)
    model = place(load_compressed(pruned_dir / "model"))
    device = model_device(model)
    masks, scores = (
        {n: t.to(device) for n, t in state.items()} for state in load_pruning_state(pruned_dir / MASKS_FILE)
    )
    names = [name for name, _ in model.named_modules() if name in masks]  # model order
    weights = dense_weights(model, names)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    ranks = allocate_ranks(shapes, cfg.keep_ratio, "uniform", cfg.rank_multiple)
    started = time.perf_counter()
    importance = pruned_importance(cfg, fisher_cfg, model, names, scores, data_dir)
    importance_seconds = time.perf_counter() - started

    factors, rows = {}, []
    started = time.perf_counter()
    for name in names:
        weight, mask, rank = weights[name], masks[name], ranks[name]
        density = float(mask.float().mean())
        row = {"layer": name, "type": matrix_type(name), "shape": list(shapes[name]), "rank": rank, "density": density}
        if rank is not None:
            layer_started = time.perf_counter()
            a, b = factorize_pruned_weight(
                cfg.method, weight, mask, rank, None if importance is None else importance[name],
                pruned_weight=cfg.pruned_weight, solver=cfg.solver, steps=cfg.solver_steps, options=cfg.solver_options,
            )
            factors[name] = (a, b)
            row["seconds"] = time.perf_counter() - layer_started
            row["error"] = weighted_error(weight * mask, a, b)  # mean over all entries of W * M
            row["kept_error"] = weighted_error(weight, a, b, mask) / max(density, 1e-12)  # mean over kept entries
        rows.append(row)
    solve_seconds = time.perf_counter() - started
    factorize_model(model, factors)

    pruned_entry = recipe(model)
    extra = {
        "keep_ratio": cfg.keep_ratio,
        "allocation": "uniform",
        "solver": cfg.solver if cfg.method == "sparse_tfwsvd" else cfg.method,
        **({"sparse_importance": cfg.sparse_importance, "pruned_weight": cfg.pruned_weight} if importance else {}),
        "pruned": {k: pruned_entry[k] for k in ("prune_method", "density", "scope") if k in pruned_entry},
    }
    tokenizer = AutoTokenizer.from_pretrained(str(pruned_dir / "model"))
    with atomic_dir(out_dir) as tmp:
        save_compressed(model, tmp / "model", method=cfg.method, targets=names, tokenizer=tokenizer, extra=extra)
        shutil.copyfile(pruned_dir / MASKS_FILE, tmp / MASKS_FILE)
    metrics = factorization_metrics(cfg.keep_ratio, shapes, ranks, rows, solve_seconds, ("error", "kept_error"))
    metrics["importance_seconds"] = importance_seconds
    return _finish(metrics_path, {"factorized": out_dir}, metrics)


# --------------------------------------------------------------------------- mrft


def run_mrft(
    cfg: MrftConfig,
    pruned_dir: Path,
    factorized_dir: Path,
    teacher_dir: Path,
    data_dir: Path,
    out_dir: Path,
    metrics_path: Path,
) -> StageResult:
    """Mixed-rank fine-tuning: factors trained beside their sparse matrices, then saved alone.

    Each factorized layer of the pruned model becomes a MixedRankLinear (the
    pruned `W * M` and the factors of factorize_pruned); after training only
    the factors remain, so the saved folder is an ordinary compressed model.
    """
    from .compressed import load_compressed, recipe, recipe_extra, save_compressed
    from .layers import FactorizedLinear
    from .mixed_rank import MixedRankOptions, MixedRankScheduler, finalize, to_mixed_rank
    from .pruning import load_pruning_state
    from .ranks import kept_ratio
    from .training import train

    prepared = PreparedData.open(data_dir)
    model = place(load_compressed(pruned_dir / "model"))
    factorized = place(load_compressed(factorized_dir / "model"))
    entry = recipe(factorized)
    factors = {
        name: (m.up.weight.detach(), m.down.weight.detach())  # (out, rank), (rank, in)
        for name, m in factorized.named_modules()
        if isinstance(m, FactorizedLinear)
    }
    del factorized
    masks, _ = load_pruning_state(factorized_dir / MASKS_FILE)
    mixed = to_mixed_rank(model, factors, masks, train_sparse=cfg.train_sparse)

    scheduler = MixedRankScheduler(MixedRankOptions(cfg.p0, cfg.ramp_share, cfg.seed))
    teacher, distill = _distillation(cfg.distill, teacher_dir)
    loader = prepared.loader("train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    result = train(
        model, loader, cfg.train, evaluate=prepared.evaluate_fn(cfg.train.eval_batch_size), hooks=[scheduler],
        teacher=teacher, distill=distill, description="mrft",
    )
    finalize(model)
    targets = list(entry.get("ranks", {}))
    extra = recipe_extra(entry)
    extra.update({"factorize_method": entry.get("method"), "mixed_rank": {"p0": cfg.p0, "ramp_share": cfg.ramp_share}})
    save_compressed(model, out_dir, method="lpaf", targets=targets, tokenizer=prepared.tokenizer, extra=extra)

    shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
    ranks = {name: factors[name][0].shape[1] if name in factors else None for name in shapes}
    metrics = {
        "layers_mixed": len(mixed),
        "keep_ratio_reached": kept_ratio(shapes, ranks),
        **_train_metrics(result),
    }
    return _finish(metrics_path, {"model": out_dir}, metrics, {"history": result.history})


# --------------------------------------------------------------------------- registry


def _run_prune(p: Params, lay: Layout) -> StageResult:
    # Under `dvc repro evaluate_lpaf` the path setting is not checked: fail before pruning, not after.
    check_lpaf_factorize(p.factorize)
    return run_prune(
        p.prune, p.factorize, p.model, lay.model("finetune"), lay.data, prune_dir(lay), lay.metrics_file("prune")
    )


register(
    Stage(
        name="prune",
        sections=("prune", "model", "factorize.keep_ratio", "factorize.rank_multiple", "factorize.targets", "factorize.exclude"),
        inputs=lambda lay: {"model": lay.model("finetune"), "data": lay.data},
        outputs=lambda lay: {"pruned": prune_dir(lay)},
        run=_run_prune,
        after=("finetune",),
    )
)
register(
    Stage(
        name="factorize_pruned",
        sections=("factorize", "fisher"),
        inputs=lambda lay: {"pruned": prune_dir(lay), "data": lay.data},
        outputs=lambda lay: {"factorized": factorize_pruned_dir(lay)},
        run=lambda p, lay: run_factorize_pruned(
            p.factorize, p.fisher, prune_dir(lay), lay.data, factorize_pruned_dir(lay), lay.metrics_file("factorize_pruned")
        ),
        after=("prune",),
    )
)
register(_evaluate_stage("evaluate_pruned_factorized", "factorize_pruned"))
register(
    Stage(
        name="mrft",
        sections=("mrft",),
        inputs=lambda lay: {
            "pruned": prune_dir(lay),
            "factorized": factorize_pruned_dir(lay),
            "teacher": lay.model("finetune"),
            "data": lay.data,
        },
        outputs=lambda lay: {"model": lay.model("mrft")},
        run=lambda p, lay: run_mrft(
            p.mrft, prune_dir(lay), factorize_pruned_dir(lay), lay.model("finetune"), lay.data, lay.model("mrft"),
            lay.metrics_file("mrft"),
        ),
        after=("factorize_pruned",),
    )
)
register(_evaluate_stage("evaluate_lpaf", "mrft"))
