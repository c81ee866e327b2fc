"""The public calls: `compress_` factorizes a model in place, `fisher_importance` gives what it weighs by.

Shaped like torchao's `quantize_(model, config, filter_fn)`: the model is
changed in place and a report comes back. The pipeline's factorize stages
call these same functions, so a notebook and `lowrank run` compute the same
factors.

    importance = lowrank.fisher_importance(model, loader)
    report = lowrank.compress_(model, method="tfwsvd", keep_ratio=0.3, importance=importance)
    report = lowrank.compress_(model, FactorizeConfig(method="asvd", options={"alpha": 0.25}), importance=abs_mean)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from lowrank.config import FactorizeConfig, build, to_dict
from lowrank.linalg.ranks import allocate_ranks, kept_ratio, weighted_spectrum
from lowrank.linalg.solvers import get_solver, weighted_error
from lowrank.methods import get_method
from lowrank.modules.matching import Targets, find_targets, matrix_type, require_targets
from lowrank.modules.surgery import dense_weights, factorize_model
from lowrank.train.importance import Importance, collect_importance
from lowrank.train.rank_search import search_ranks

Scores = Mapping[str, Tensor] | Importance


@dataclass
class CompressReport:
    """What `compress_` did: the method, the ranks, the share of parameters kept, one row per targeted layer.

    Each row holds `layer`, `type`, `shape`, `rank` (None: left dense, a rank
    that would not save parameters) and, for factorized layers, `seconds` and
    `error` (mean squared error of `A B` against the weight, or against `W * M`
    under masks); `fisher_error` when a Fisher was given, `density` and
    `kept_error` (over kept entries) under masks.
    """

    method: str
    keep_ratio_target: float
    keep_ratio_reached: float
    ranks: dict[str, int | None]
    layers: list[dict[str, Any]] = field(default_factory=list)
    solve_seconds: float = 0.0
    allocation: dict[str, float] = field(default_factory=dict)  # allocation search: what it measured and cost

    def metrics(self) -> dict[str, Any]:
        """The stage metrics of a factorization: the ratio reached, layer counts, mean errors, the rows."""
        factorized = [row for row in self.layers if row["rank"] is not None]
        metrics: dict[str, Any] = {
            "keep_ratio_target": self.keep_ratio_target,
            "keep_ratio_reached": self.keep_ratio_reached,
            "layers_factorized": len(factorized),
            "layers_dense": len(self.layers) - len(factorized),
            "solve_seconds": self.solve_seconds,
            **self.allocation,
        }
        for key in ("fisher_error", "error", "kept_error"):
            if factorized and key in factorized[0]:
                metrics[f"mean_{key}"] = sum(row[key] for row in factorized) / len(factorized)
        metrics["layers"] = self.layers
        return metrics


def target_names(model: nn.Module, targets: Targets | None = None, exclude: Targets | None = None) -> list[str]:
    """The Linear layers `targets` / `exclude` select (default: every Linear in the blocks); an InputError naming
    the model's family when none does."""
    return require_targets(model, targets, exclude)


def _scores(importance: Scores | None) -> Mapping[str, Tensor] | None:
    return importance.scores if isinstance(importance, Importance) else importance


def compress_(
    model: nn.Module,
    config: FactorizeConfig | None = None,
    *,
    importance: Scores | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    fisher: Scores | None = None,
    loss_fn: Callable[[nn.Module], float] | None = None,
    **overrides: Any,
) -> CompressReport:
    """Factorize the targeted Linear layers of `model` in place; returns what was done.

    Args:
        config: the `factorize` params section (default: `FactorizeConfig()`, the
            shipped defaults): the method (`lowrank methods`), `keep_ratio`,
            `allocation`, targets / exclude (peft's rules; GPT-2's Conv1D counts as
            one; default: every Linear inside the Transformer blocks, never
            embeddings or heads), the solver keys and the method's `options`.
        importance: per-entry scores by layer name, the kind the method weighs by
            (`fisher_importance` for fwsvd and tfwsvd; Taylor scores for tvd; the
            pruned model's Fisher or pruning scores for the sparse methods).
        filter_fn: `filter_fn(name, module) -> bool` keeps only the layers it accepts,
            besides targets / exclude (torchao's `quantize_` filter).
        masks: pruning masks by layer name, because the sparse methods factorize
            `W * M` and weigh entries by M; the layers factorized are the masked ones.
        fisher: Fisher scores, because `allocation="fisher"` spreads ranks by them
            and the `fisher_error` column reports against them; defaults to
            `importance` when the method weighs by Fisher.
        loss_fn: the model's task loss on calibration batches (e.g. the mean
            `model(**batch).loss` over a few of them), because `allocation="search"`
            measures it.
        overrides: fields of `config` to change (`method="svd"`, `keep_ratio=0.3`,
            `options={"alpha": 0.25}` or the method's options object), checked like
            params.yaml (the config rebuilt with them, through the same key and type checks).

    Raises:
        ConfigError: an unknown method, key or option, or an impossible value.
        ValueError: no layer matches, or the method's importance or masks are missing.
    """
    cfg = configure(config, overrides)
    spec, options = get_method(cfg.method), cfg.method_options()
    scores, fisher_scores = _scores(importance), _scores(fisher)
    if fisher_scores is None and spec.importance == "fisher":
        fisher_scores = scores
    if masks is not None:
        names = [name for name, _ in model.named_modules() if name in masks]  # model order
    else:
        names = target_names(model, cfg.targets, cfg.exclude)
    if filter_fn is not None:
        modules = dict(model.named_modules())
        names = [name for name in names if filter_fn(name, modules[name])]
    if not names:
        raise ValueError("masks: none of them names a module of the model" if masks is not None and filter_fn is None
                         else "filter_fn: it accepts none of the targeted layers")
    if spec.needs_masks and masks is None:
        raise ValueError(f"method {spec.name!r} factorizes pruned matrices: pass their masks")
    if spec.importance not in ("none", "sparse"):
        _check_covers(scores, names, f"method {spec.name!r} weighs entries by {spec.importance} importance")
    if cfg.allocation == "fisher":
        _check_covers(fisher_scores, names, "allocation 'fisher' spreads ranks by Fisher-weighted spectra")
    if cfg.allocation == "search" and loss_fn is None:
        raise ValueError("allocation 'search' measures the task loss: pass loss_fn (the model's loss on calibration batches)")

    weights = dense_weights(model, names)
    device = next(iter(weights.values())).device
    shapes = {name: tuple(weight.shape) for name, weight in weights.items()}
    spectra = None
    if cfg.allocation == "fisher":
        spectra = {name: weighted_spectrum(weights[name], fisher_scores[name].to(device)) for name in names}
    method = factorizer(cfg)

    def solve(name: str, rank: int, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        entry_scores = None if scores is None or spec.importance == "none" else scores[name].to(device)
        return method(target, rank, importance=entry_scores, mask=mask)  # (out, rank), (rank, in)

    searched: dict[str, float] = {}
    if cfg.allocation == "search":
        uniform = allocate_ranks(shapes, cfg.keep_ratio, "uniform", cfg.rank_multiple)
        ranks, searched = search_ranks(
            model, uniform, shapes, lambda name, rank: solve(name, rank, weights[name], None), loss_fn,
            min_share=cfg.min_rank_share, max_share=cfg.search_max_share, points=cfg.search_points, multiple=cfg.rank_multiple,
            nested=spec.is_nested(options),
        )
    else:
        ranks = allocate_ranks(shapes, cfg.keep_ratio, cfg.allocation, cfg.rank_multiple, spectra, cfg.min_rank_share)

    factors, rows = {}, []
    started = time.perf_counter()
    for name in names:
        mask = None if masks is None else masks[name].to(device)
        target = weights[name] if mask is None else weights[name] * mask.to(weights[name].dtype)  # (out, in)
        row: dict[str, Any] = {"layer": name, "type": matrix_type(name), "shape": list(shapes[name]), "rank": ranks[name]}
        if mask is not None:
            row["density"] = float(mask.float().mean())
        if ranks[name] is not None:
            layer_started = time.perf_counter()
            a, b = solve(name, ranks[name], target, mask)
            factors[name] = (a, b)
            row["seconds"] = time.perf_counter() - layer_started
            if fisher_scores is not None:
                row["fisher_error"] = weighted_error(target, a, b, fisher_scores[name].to(device))
            row["error"] = weighted_error(target, a, b)
            if mask is not None:
                row["kept_error"] = weighted_error(weights[name], a, b, mask) / max(row["density"], 1e-12)
        rows.append(row)
    solve_seconds = time.perf_counter() - started
    factorize_model(model, factors)
    return CompressReport(cfg.method, cfg.keep_ratio, kept_ratio(shapes, ranks), ranks, rows, solve_seconds, searched)


def factorizer(config: FactorizeConfig) -> Callable[..., tuple[Tensor, Tensor]]:
    """The configured method on one matrix: `f(weight, rank, *, importance=None, mask=None) -> (A, B)`, with the
    method's options object and the configured solver (`factorize.solver`, its steps and options) bound."""
    spec, options = get_method(config.method), config.method_options()
    iterative = get_solver(config.solver)

    def solve(weight: Tensor, rank: int, *, importance: Tensor | None) -> tuple[Tensor, Tensor]:
        return iterative(weight, rank, importance=importance, steps=config.solver_steps, **config.solver_options)

    def factorize(weight: Tensor, rank: int, *, importance: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return spec.fn(weight, rank, importance=importance, mask=mask, options=options, solve=solve)

    return factorize


def configure(config: FactorizeConfig | None = None, overrides: Mapping[str, Any] | None = None) -> FactorizeConfig:
    """`config` (default: `FactorizeConfig()`) with `overrides` applied, every key and value checked as in params.yaml;
    `options` may be the method's options object as well as a mapping."""
    if config is not None and not isinstance(config, FactorizeConfig):
        raise TypeError(f"config: expected a FactorizeConfig, got {config!r} (a method name goes in method=...)")
    overrides = dict(overrides or {})
    if is_dataclass(overrides.get("options")):
        overrides["options"] = asdict(overrides["options"])
    base = config if config is not None else FactorizeConfig()
    if not overrides:
        return base
    return build(FactorizeConfig, {**to_dict(base), **overrides}, "factorize")


def _check_covers(scores: Mapping[str, Tensor] | None, names: list[str], why: str) -> None:
    if scores is None:
        raise ValueError(f"{why}: pass it (lowrank.fisher_importance gives the Fisher)")
    missing = [name for name in names if name not in scores]
    if missing:
        raise ValueError(f"{why}, and it lacks {missing[0]}: collect it for these targets")


def fisher_importance(
    model: nn.Module,
    dataloader: Iterable[dict[str, Tensor]],
    targets: Targets | None = None,
    exclude: Targets | None = None,
    *,
    max_samples: int | None = None,
    kind: str = "fisher",
) -> dict[str, Tensor]:
    """Per-entry importance of the targeted Linear weights over batches with labels: what `compress_` takes.

    Args:
        dataloader: batches of `input_ids`, `attention_mask` and the targets the
            model's loss takes (`labels`; `start_positions` and `end_positions` for
            question answering), as a transformers data collator gives them.
        kind: "fisher" (mean squared gradient) or "taylor" (|gradient * weight|, for tvd).
    """
    names = find_targets(model, targets or None, exclude or None)
    with torch.enable_grad():
        return collect_importance(model, dataloader, names, max_samples=max_samples)[kind].scores
