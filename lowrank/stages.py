"""The pipeline's stages: one plain function each, driven by both Prefect and DVC.

Each `run_*` function takes its config section and artifact paths, writes its
outputs atomically and its metrics to `metrics/<stage>.json`, and returns a
`StageResult`. `STAGES` records, for every stage, which params sections and
which upstream artifacts it depends on: the Prefect cache key and `dvc.yaml`
are built from the same facts.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import data as data_lib
from .config import DataConfig, EvaluateConfig, FactorizeConfig, FisherConfig, ModelConfig, Params, TrainConfig
from .devices import default_device, model_device, place
from .io import atomic_dir, atomic_write_bytes, read_json, write_json
from .models import load_classifier, load_tokenizer


@dataclass
class StageResult:
    """Paths a stage wrote and the numbers it measured (flat, for MLflow)."""

    outputs: dict[str, str]
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """Where each artifact lives; derived from `paths` in params.yaml only."""

    artifacts: Path
    metrics: Path

    @classmethod
    def from_params(cls, params: Params) -> "Layout":
        return cls(Path(params.paths.artifacts), Path(params.paths.metrics))

    @property
    def data(self) -> Path:
        return self.artifacts / "data"

    def model(self, stage: str) -> Path:
        return self.artifacts / stage / "model"

    @property
    def importance(self) -> Path:
        return self.artifacts / "fisher"

    def metrics_file(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"


def _numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Keep the numbers of a nested dict, flattening keys with dots."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_numeric(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _finish(metrics_path: Path, outputs: dict[str, Path], metrics: dict[str, Any], info: dict | None = None) -> StageResult:
    write_json(metrics_path, metrics)
    return StageResult({k: str(v) for k, v in outputs.items()}, _numeric(metrics), info or {})


# --------------------------------------------------------------------------- prepare


def run_prepare(data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: Path, metrics_path: Path) -> StageResult:
    """Read the task's files, subsample, tokenize once, and save with the tokenizer."""
    spec = data_lib.resolve_task(data_cfg)
    raw = data_lib.load_raw_from_config(data_cfg, spec)
    tokenizer = load_tokenizer(model_cfg)
    tokenized = data_lib.tokenize(raw, spec, tokenizer, data_cfg.max_length)
    with atomic_dir(out_dir) as tmp:
        tokenized.save_to_disk(str(tmp / "dataset"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_json(tmp / "task.json", data_lib.task_to_dict(spec))
    metrics = {split: {"rows": len(ds)} for split, ds in tokenized.items()}
    for split, ds in tokenized.items():
        lengths = [len(ids) for ids in ds["input_ids"]]
        metrics[split]["mean_tokens"] = sum(lengths) / max(len(lengths), 1)
        metrics[split]["max_tokens"] = max(lengths, default=0)
    return _finish(metrics_path, {"data": out_dir}, metrics)


@dataclass
class PreparedData:
    """The prepare stage's artifact, opened."""

    spec: data_lib.TaskSpec
    dataset: Any
    tokenizer: Any

    @classmethod
    def open(cls, data_dir: Path) -> "PreparedData":
        from datasets import load_from_disk
        from transformers import AutoTokenizer

        if not (data_dir / "task.json").is_file():
            raise FileNotFoundError(f"prepared data not found at {data_dir}: run the prepare stage first")
        spec = data_lib.task_from_dict(read_json(data_dir / "task.json"))
        dataset = load_from_disk(str(data_dir / "dataset"))
        tokenizer = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
        return cls(spec, dataset, tokenizer)

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0):
        return data_lib.make_loader(self.dataset[split], self.tokenizer, batch_size, shuffle=shuffle, seed=seed)

    def evaluate_fn(self, batch_size: int) -> Callable[[torch.nn.Module], dict[str, float]]:
        """Score on every evaluation split; `score` is the mean of their main scores."""
        from .evaluation import predict
        from .metrics import compute_metrics

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            results: dict[str, float] = {}
            scores = []
            for split in self.spec.eval_splits:
                logits, labels = predict(model, self.loader(split, batch_size))
                split_metrics = compute_metrics(self.spec, logits, labels)
                scores.append(split_metrics["score"])
                prefix = "" if len(self.spec.eval_splits) == 1 else f"{split}."
                results.update({f"{prefix}{k}": v for k, v in split_metrics.items() if k != "score"})
            results["score"] = sum(scores) / len(scores)
            return results

        return evaluate


# --------------------------------------------------------------------------- training


def _train_and_save(
    model: torch.nn.Module,
    prepared: PreparedData,
    cfg: TrainConfig,
    out_dir: Path,
    metrics_path: Path,
    description: str,
    save: Callable[[torch.nn.Module, Path], None],
) -> StageResult:
    from .training import train

    loader = prepared.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    result = train(
        model,
        loader,
        cfg,
        evaluate=prepared.evaluate_fn(cfg.eval_batch_size),
        description=description,
    )
    with atomic_dir(out_dir) as tmp:
        save(model, tmp)
        prepared.tokenizer.save_pretrained(str(tmp))
    metrics = {
        "best_score": result.best_score,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "train_samples_per_s": result.train_samples_per_s,
        "history": result.history,
    }
    return _finish(metrics_path, {"model": out_dir}, metrics, {"history": result.history})


def run_finetune(
    cfg: TrainConfig, model_cfg: ModelConfig, data_dir: Path, out_dir: Path, metrics_path: Path
) -> StageResult:
    """Fine-tune the pretrained encoder on the task: the dense teacher."""
    prepared = PreparedData.open(data_dir)
    torch.manual_seed(cfg.seed)
    model = place(load_classifier(model_cfg, list(prepared.spec.label_names) if prepared.spec.label_names else None))

    def save(m: torch.nn.Module, path: Path) -> None:
        m.save_pretrained(str(path), safe_serialization=True)

    return _train_and_save(model, prepared, cfg, out_dir, metrics_path, "finetune", save)


def run_finetune_compressed(
    cfg: TrainConfig, model_dir: Path, data_dir: Path, out_dir: Path, metrics_path: Path
) -> StageResult:
    """Fine-tune a compressed model again ("+ ft" in the papers), keeping its ranks."""
    from .compressed import load_compressed, recipe, recipe_extra, write_compressed

    prepared = PreparedData.open(data_dir)
    model = place(load_compressed(model_dir))
    entry = recipe(model)
    extra = recipe_extra(entry)

    def save(m: torch.nn.Module, path: Path) -> None:
        write_compressed(m, path, method=entry.get("method", "dense"), targets=list(entry.get("ranks", {})), extra={**extra, "finetuned": True})

    return _train_and_save(model, prepared, cfg, out_dir, metrics_path, "finetune_compressed", save)


# --------------------------------------------------------------------------- evaluate


def run_evaluate(cfg: EvaluateConfig, model_dir: Path, data_dir: Path, metrics_path: Path) -> StageResult:
    """Task score, parameter counts, size on disk and CPU latency of one model folder."""
    from .compressed import load_compressed, recipe
    from .evaluation import count_parameters, dir_size_bytes, measure_latency
    from .matching import DEFAULT_EXCLUDE, DEFAULT_TARGETS, find_targets

    prepared = PreparedData.open(data_dir)
    model = place(load_compressed(model_dir))
    started = time.perf_counter()
    scores = prepared.evaluate_fn(cfg.batch_size)(model)
    eval_seconds = time.perf_counter() - started
    model.cpu()  # latency is a CPU figure: the compressed models are meant to serve there
    targets = list(recipe(model).get("ranks", {})) or find_targets(model, DEFAULT_TARGETS, DEFAULT_EXCLUDE)
    metrics: dict[str, Any] = {
        "task": scores,
        "eval_seconds": eval_seconds,
        "params": count_parameters(model, targets),
        "size_bytes": dir_size_bytes(model_dir),
    }
    timing = {
        "batch_sizes": tuple(cfg.latency_batch_sizes), "seq_len": cfg.latency_seq_len,
        "warmup": cfg.latency_warmup, "repeats": cfg.latency_repeats, "threads": cfg.threads,
    }
    for runtime in cfg.latency_runtimes if cfg.latency else ():
        metrics["latency" if runtime == "torch" else f"latency_{runtime}"] = measure_latency(model, runtime=runtime, **timing)
    return _finish(metrics_path, {}, metrics)


# --------------------------------------------------------------------------- fisher and factorize


def _targets(model: torch.nn.Module, cfg: FactorizeConfig) -> list[str]:
    from .matching import DEFAULT_EXCLUDE, DEFAULT_TARGETS, find_targets

    names = find_targets(model, cfg.targets or DEFAULT_TARGETS, cfg.exclude or DEFAULT_EXCLUDE)
    if not names:
        raise ValueError(f"factorize.targets: no Linear layer of the model matches {cfg.targets or DEFAULT_TARGETS!r}")
    return names


def run_fisher(
    cfg: FisherConfig, factorize_cfg: FactorizeConfig, model_dir: Path, data_dir: Path, out_dir: Path, metrics_path: Path
) -> StageResult:
    """Fisher (and Taylor, for TVD) importance of every targeted weight, computed once for all methods."""
    from .compressed import load_compressed
    from .importance import collect_importance, save_importance

    prepared = PreparedData.open(data_dir)
    model = place(load_compressed(model_dir))
    names = _targets(model, factorize_cfg)
    loader = prepared.loader("train", cfg.batch_size)
    started = time.perf_counter()
    scores = collect_importance(
        model, loader, names, max_samples=cfg.max_samples, per_example=cfg.per_example,
        only_misclassified=cfg.only_misclassified,
    )
    fisher, taylor = scores["fisher"], scores["taylor"]
    with atomic_dir(out_dir) as tmp:
        save_importance(fisher, tmp / "fisher.safetensors")
        save_importance(taylor, tmp / "taylor.safetensors")
    metrics = {
        "layers": len(names),
        "samples": fisher.num_samples,
        "seconds": time.perf_counter() - started,
    }
    return _finish(metrics_path, {"importance": out_dir}, metrics)


def _importance_for(method: str, importance_dir: Path) -> dict[str, torch.Tensor] | None:
    from .importance import load_importance

    if method == "svd":
        return None
    # The solvers move importance to the weight's device themselves.
    return load_importance(importance_dir / ("taylor.safetensors" if method == "tvd" else "fisher.safetensors")).scores


def run_factorize(
    cfg: FactorizeConfig, model_dir: Path, importance_dir: Path, out_dir: Path, metrics_path: Path
) -> StageResult:
    """Replace each targeted Linear by two low-rank ones, with ranks from `keep_ratio` and `allocation`."""
    from .compressed import load_compressed, save_compressed
    from .importance import load_importance
    from .matching import matrix_type
    from .ranks import allocate_ranks, weighted_spectrum
    from .risk import svd_risks
    from .solvers import get_solver, weighted_error
    from .surgery import dense_weights, factorize_model
    from transformers import AutoTokenizer

    if cfg.method not in ("svd", "fwsvd", "tfwsvd", "tvd"):
        raise ValueError(f"factorize.method: {cfg.method} factorizes pruned matrices; the factorize stage takes svd, fwsvd, tfwsvd or tvd")
    model = place(load_compressed(model_dir))
    names = _targets(model, cfg)
    device = model_device(model)
    fisher = {n: t.to(device) for n, t in load_importance(importance_dir / "fisher.safetensors").scores.items()}
    missing = [n for n in names if n not in fisher]
    if missing:
        raise ValueError(f"importance at {importance_dir} lacks {missing[0]}: rerun the fisher stage for these targets")
    importance = _importance_for(cfg.method, importance_dir)
    weights = dense_weights(model, names)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    spectra = {n: weighted_spectrum(weights[n], fisher[n]) for n in names} if cfg.allocation == "fisher" else None
    ranks = allocate_ranks(shapes, cfg.keep_ratio, cfg.allocation, cfg.rank_multiple, spectra, cfg.min_rank_share)

    iterative = cfg.method in ("tfwsvd", "tvd")
    solver = get_solver(cfg.solver if iterative else cfg.method)
    options = {"steps": cfg.solver_steps, **cfg.solver_options} if iterative else {}
    phi = svd_risks({n: fisher[n] for n in names})
    # The paper's phi shrinks as 1/N; times N it compares matrices of different shapes.
    phi_scaled = svd_risks({n: fisher[n] for n in names}, size_invariant=True)
    factors, rows = {}, []
    started = time.perf_counter()
    for name in names:
        weight, rank = weights[name], ranks[name]
        row = {"layer": name, "type": matrix_type(name), "shape": list(shapes[name]), "rank": rank, "phi": phi[name],
               "phi_size_invariant": phi_scaled[name]}
        if rank is not None:
            layer_started = time.perf_counter()
            a, b = solver(weight, rank, importance=None if importance is None else importance[name], **options)
            factors[name] = (a, b)
            row["seconds"] = time.perf_counter() - layer_started
            row["fisher_error"] = weighted_error(weight, a, b, fisher[name])
            row["error"] = weighted_error(weight, a, b)
        rows.append(row)
    solve_seconds = time.perf_counter() - started
    factorize_model(model, factors)
    extra = {"keep_ratio": cfg.keep_ratio, "allocation": cfg.allocation, "solver": cfg.solver if iterative else cfg.method}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    save_compressed(model, out_dir, method=cfg.method, targets=names, tokenizer=tokenizer, extra=extra)
    plot = _plot_phi(rows, metrics_path.with_name("factorize_phi.png"))
    metrics = factorization_metrics(cfg.keep_ratio, shapes, ranks, rows, solve_seconds, ("fisher_error", "error"))
    metrics["phi_by_type"] = _mean_by_type(rows, "phi")
    metrics["phi_size_invariant_by_type"] = _mean_by_type(rows, "phi_size_invariant")
    return _finish(metrics_path, {"model": out_dir}, metrics, {"plots": [str(plot)]})


def factorization_metrics(
    keep_ratio: float, shapes: dict, ranks: dict, rows: list[dict], seconds: float, errors: tuple[str, ...]
) -> dict[str, Any]:
    """What every factorizing stage reports: the ratio reached, layer counts, mean errors, the per-layer rows."""
    from .ranks import kept_ratio

    factorized = [r for r in rows if r["rank"] is not None]
    metrics: dict[str, Any] = {
        "keep_ratio_target": keep_ratio,
        "keep_ratio_reached": kept_ratio(shapes, ranks),
        "layers_factorized": len(factorized),
        "layers_dense": len(rows) - len(factorized),
        "solve_seconds": seconds,
    }
    for key in errors:
        metrics[f"mean_{key}"] = sum(r[key] for r in factorized) / max(len(factorized), 1)
    metrics["layers"] = rows
    return metrics


def _mean_by_type(rows: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["type"], []).append(row[key])
    return {kind: sum(values) / len(values) for kind, values in groups.items()}


def _plot_phi(rows: list[dict], path: Path) -> Path:
    """Bar chart of phi per targeted matrix, coloured by matrix type (TFWSVD Eq. 13)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["type"] for r in rows})
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.25), 3.5))
    ax.bar(range(len(rows)), [r["phi"] for r in rows], color=[colours[r["type"]] for r in rows])
    blocks = [re.search(r"\.(\d+)\.", r["layer"]) for r in rows]
    ax.set_xticks(range(len(rows)), [m.group(1) if m else "" for m in blocks], fontsize=6)
    ax.set_xlabel("block of each targeted matrix (model order)")
    ax.set_ylabel("phi (SVD risk)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds], labels=kinds, fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Stage:
    """A stage's dependencies (params sections, upstream artifacts), outputs, and how to run it."""

    name: str
    sections: tuple[str, ...]  # params sections, or single dotted keys, that it reads
    inputs: Callable[[Layout], dict[str, Path]]
    outputs: Callable[[Layout], dict[str, Path]]
    run: Callable[[Params, Layout], StageResult]
    after: tuple[str, ...] = ()


def _evaluate_stage(name: str, model_stage: str) -> Stage:
    return Stage(
        name=name,
        sections=("evaluate",),
        inputs=lambda lay: {"model": lay.model(model_stage), "data": lay.data},
        outputs=lambda lay: {},
        run=lambda p, lay: run_evaluate(p.evaluate, lay.model(model_stage), lay.data, lay.metrics_file(name)),
        after=(model_stage,),
    )


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage; names are unique because dvc.yaml and the flow refer to them."""
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    STAGES[stage.name] = stage
    return stage


register(
    Stage(
        name="prepare",
        sections=("data", "model"),
        inputs=lambda lay: {},
        outputs=lambda lay: {"data": lay.data},
        run=lambda p, lay: run_prepare(p.data, p.model, lay.data, lay.metrics_file("prepare")),
    )
)
register(
    Stage(
        name="finetune",
        sections=("model", "finetune"),
        inputs=lambda lay: {"data": lay.data},
        outputs=lambda lay: {"model": lay.model("finetune")},
        run=lambda p, lay: run_finetune(p.finetune, p.model, lay.data, lay.model("finetune"), lay.metrics_file("finetune")),
        after=("prepare",),
    )
)
register(_evaluate_stage("evaluate_dense", "finetune"))
register(
    Stage(
        name="fisher",
        sections=("fisher", "factorize.targets", "factorize.exclude"),
        inputs=lambda lay: {"model": lay.model("finetune"), "data": lay.data},
        outputs=lambda lay: {"importance": lay.importance},
        run=lambda p, lay: run_fisher(
            p.fisher, p.factorize, lay.model("finetune"), lay.data, lay.importance, lay.metrics_file("fisher")
        ),
        after=("finetune",),
    )
)
register(
    Stage(
        name="factorize",
        sections=("factorize",),
        inputs=lambda lay: {"model": lay.model("finetune"), "importance": lay.importance},
        outputs=lambda lay: {"model": lay.model("factorize")},
        run=lambda p, lay: run_factorize(
            p.factorize, lay.model("finetune"), lay.importance, lay.model("factorize"), lay.metrics_file("factorize")
        ),
        after=("fisher",),
    )
)
register(_evaluate_stage("evaluate_factorized", "factorize"))
register(
    Stage(
        name="finetune_compressed",
        sections=("finetune_compressed",),
        inputs=lambda lay: {"model": lay.model("factorize"), "data": lay.data},
        outputs=lambda lay: {"model": lay.model("finetune_compressed")},
        run=lambda p, lay: run_finetune_compressed(
            p.finetune_compressed, lay.model("factorize"), lay.data, lay.model("finetune_compressed"),
            lay.metrics_file("finetune_compressed"),
        ),
        after=("factorize",),
    )
)
register(_evaluate_stage("evaluate_compressed", "finetune_compressed"))


def get_stage(name: str) -> Stage:
    """The stage called `name`; the error lists the known ones."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name]


# --------------------------------------------------------------------------- pipelines

PIPELINES: dict[str, tuple[str, ...]] = {
    "dense": ("prepare", "finetune", "evaluate_dense"),
    "factorize": (
        "prepare", "finetune", "evaluate_dense", "fisher", "factorize", "evaluate_factorized",
        "finetune_compressed", "evaluate_compressed",
    ),
    "lpaf": (
        "prepare", "finetune", "evaluate_dense", "prune", "factorize_pruned", "evaluate_pruned_factorized",
        "mrft", "evaluate_lpaf",
    ),
}


def pipeline(params: Params) -> list[str]:
    """The stages of the configured path, in the order they run."""
    return list(PIPELINES[params.orchestration.path])


def preflight(params: Params) -> None:
    """Check every input the run names (data files, model, output folders) before any work."""
    from .io import check_writable
    from .models import check_model

    check_writable(params.paths.artifacts)
    check_writable(params.paths.metrics)
    check_model(params.model)
    data_lib.check_sources(params.data)
    default_device()  # a bad LOWRANK_DEVICE fails here, not at the first stage that trains


def preflight_stage(name: str, params: Params) -> None:
    """For one stage: its upstream artifacts must exist (else say which stage makes them)."""
    stage = get_stage(name)
    layout = Layout.from_params(params)
    if name == "prepare":
        preflight(params)
    for key, path in stage.inputs(layout).items():
        if not Path(path).exists():
            raise FileNotFoundError(f"stage {name}: input {key} not found at {path}; run {', '.join(stage.after)} first")


from . import lpaf  # noqa: E402,F401  registers the LPAF stages
