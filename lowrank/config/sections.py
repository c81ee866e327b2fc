"""Typed view of `params.yaml`: one frozen dataclass per stage section, and `Params`, the whole file.

Every knob of the pipeline lives in `params.yaml`; DVC reads the same file for
its `params:`. Validating it here, before any work starts, turns a typo in a
key or an impossible value into an error that names the key, instead of a
crash an hour into fine-tuning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from lowrank.linalg.solvers import iterative_solvers, solver_options
from lowrank.methods import METHODS, get_method, method_names
from lowrank.config.base import CompressedTrainConfig, ConfigError, TrainConfig, check, note
from lowrank.config.convert import build
from lowrank.config.patterns import check_pattern
from lowrank.config.lpaf_sections import MrftConfig, PruneConfig
from lowrank.config.sweep_spec import SweepConfig

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SHARED_GLUE = "../shared/data/glue"  # the project's data folder, beside the checkout (the Makefile's GLUE_DIR too)


@dataclass(frozen=True)
class PathsConfig:
    """Where stages write. Each path is written once here and referenced by dvc.yaml."""

    artifacts: str = "artifacts"
    metrics: str = "metrics"


@dataclass(frozen=True)
class CustomDataConfig:
    """A user's own train/eval files and which columns hold what.

    kind: the task kind (`lowrank tasks`): `sequence` reads CSV, TSV or JSONL by
        the columns text_a, text_b and label; `token` reads CoNLL columns (`word tag`
        per line, a blank line between sentences) or JSONL with `tokens` and `tags`
        (other keys: text_a, label), its tags listed in label_names; `span` reads
        SQuAD-format JSON; `lm` reads plain text (a document per line) or JSONL (key text_a, default `text`).
    eval_file: null = a seeded `eval_share` of the train file's rows is the eval split (the rest trains).
    label_names: label values (tags) as they appear in the files, mapped to ids in
        this order; null for a sequence task = the train file's labels, sorted.
    regression: a sequence task's labels are scores (Pearson, Spearman); null = only
        when every label in the train file is a number.
    """

    train_file: str
    eval_file: str | None = None
    text_a: str | None = None
    label: str | None = None
    text_b: str | None = None
    label_names: list[str] | None = None
    kind: str = "sequence"
    eval_share: float = 0.2
    regression: bool | None = None

    def __post_init__(self) -> None:
        check(0 < self.eval_share < 1, "data.custom.eval_share", f"must be in (0, 1), got {self.eval_share}")
        check(not (self.regression and self.label_names), "data.custom.regression",
              "a regression has no label_names; drop one of the two")


@dataclass(frozen=True)
class ValidationConfig:
    """The split every choice reads (keep_best, the epoch-0 guard, the collapse flag, the rank search's
    calibration): a seeded share of the training rows, held out before `max_train_samples` draws its subsample,
    so the reported split is scored once, by the evaluate stages, and chooses nothing. A task whose files hold
    a split of their own to select on, beside a reported test split, uses that instead."""

    share: float = 0.1
    max_rows: int = 1000

    def __post_init__(self) -> None:
        check(0 < self.share < 1, "data.validation.share", f"must be in (0, 1), got {self.share}")
        check(self.max_rows > 0, "data.validation.max_rows", f"must be positive, got {self.max_rows}")


@dataclass(frozen=True)
class DataConfig:
    """Which task and how much of it; `glue_dir: null` falls back to $GLUE_DIR, then ../shared/data/glue, then the hub."""

    task: str = "sst2"
    glue_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128
    seed: int = 42
    custom: CustomDataConfig | None = None
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # Batches of similar lengths (transformers' group_by_length): training shuffles mega-batches sorted by
    # length, evaluation runs sorted by length and puts predictions back in order. A batch pads to its longest row.
    # Off by default: on SST-2 and STS-B it cost the dense model 0.7 and 4.8 points over two seeds (BENCHMARKS.md, section 5).
    group_by_length: bool = False

    def __post_init__(self) -> None:
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            check(value is None or value > 0, f"data.{key}", f"must be positive or null, got {value}")
        check(self.max_length >= 8, "data.max_length", f"must be at least 8, got {self.max_length}")
        check(
            (self.task == "custom") == (self.custom is not None),
            "data.custom",
            "is required when data.task is 'custom' and only then",
        )

    def resolved_glue_dir(self) -> Path | None:
        """The GLUE folder to read: `data.glue_dir`, else $GLUE_DIR, else the project's data folder beside the checkout
        (`../shared/data/glue` from the working directory, as the Makefile sets it; said in one line); None: the hub."""
        value = self.glue_dir or os.environ.get("GLUE_DIR")
        if value:
            return Path(value).expanduser()
        beside = Path(SHARED_GLUE).resolve()
        if not beside.is_dir():
            return None
        note(f"note: data.glue_dir and GLUE_DIR are unset: reading GLUE from {beside}, found beside the checkout")
        return beside


@dataclass(frozen=True)
class ModelConfig:
    """Any HF encoder, by hub name or local folder.

    finetuned: `name` is already fine-tuned on this task, its head included: the
        finetune stage takes it as it is (its labels checked against the task's),
        evaluates it and hands it on; false puts a fresh head on `name` and fine-tunes.
    """

    name: str = DEFAULT_MODEL
    trust_remote_code: bool = False
    finetuned: bool = False


@dataclass(frozen=True)
class FisherConfig:
    """How importance is collected on the fine-tuned model."""

    max_samples: int | None = None
    batch_size: int = 32
    per_example: bool = False
    only_misclassified: bool = False

    def __post_init__(self) -> None:
        check(self.max_samples is None or self.max_samples > 0, "fisher.max_samples", "must be positive or null")
        check(self.batch_size > 0, "fisher.batch_size", "must be positive")




@dataclass(frozen=True)
class FactorizeConfig:
    """Which factorizer, how much to keep and how ranks are spread over layers.

    method: a name from the method table (`lowrank methods`, lowrank/methods/),
        which says the path that accepts it: svd, fwsvd, tfwsvd and tvd factorize
        the dense fine-tuned model (the factorize path); sparse_svd and
        sparse_tfwsvd the pruned model (the lpaf path, where svd is the ablation).
    solver: the element-wise solver of the methods that take one (tfwsvd, tvd, sparse_tfwsvd).

    allocation: `uniform` (the papers), `fisher` (ranks from Fisher-weighted
        spectra) or `search` (ranks from the measured task-loss increase of each
        matrix at each rank on `search_samples` training examples, at exactly the
        uniform allocation's parameters; lowrank/train/rank_search.py).
    min_rank_share: under `allocation: fisher` or `search`, every layer keeps at
        least this share of the uniform rank (0: no floor); `search_max_share`
        caps it at that multiple; `search_points` ranks per matrix are measured
        (both ends of that range and the uniform rank among them).
    options: the chosen method's own options (`lowrank methods` lists them with their
        defaults; lowrank/methods/ declares each method's beside its code), checked
        against that method when params.yaml loads; {} keeps the method's defaults.
    """

    method: str = "fwsvd"
    keep_ratio: float = 0.5
    allocation: Literal["uniform", "fisher", "search"] = "uniform"
    rank_multiple: int = 1
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    solver: str = "als"
    solver_steps: int = 10
    solver_options: dict[str, Any] = field(default_factory=dict)
    min_rank_share: float = 0.5
    options: dict[str, Any] = field(default_factory=dict)
    search_samples: int = 32
    search_points: int = 3
    search_max_share: float = 2.0

    # The flat keys of each method's options before they moved into `options` (an old params.yaml or -S fails with this).
    MOVED: ClassVar[dict[str, str]] = {
        "asvd_alpha": "use factorize.options.alpha (method asvd)",
        "whitening_damp": "use factorize.options.damp (method svd_llm)",
        "whitening_update": "use factorize.options.update (method svd_llm)",
        "sparse_importance": "use factorize.options.importance (methods sparse_svd, sparse_tfwsvd)",
        "pruned_weight": "use factorize.options.pruned_weight (methods sparse_svd, sparse_tfwsvd)",
    }

    def __post_init__(self) -> None:
        check(self.method in METHODS, "factorize.method", f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        self.method_options()  # its errors name the method and the key
        known = iterative_solvers()
        check(self.solver in known, "factorize.solver", f"unknown solver {self.solver!r} (known: {', '.join(known)})")
        takes = [o for o in solver_options(self.solver) if o not in ("steps", "callback")]  # steps: factorize.solver_steps
        for option in self.solver_options:
            check(option in takes, f"factorize.solver_options.{option}", f"{self.solver} takes no such option (it takes: {', '.join(takes)})")
        for key in ("targets", "exclude"):
            patterns = getattr(self, key)
            if isinstance(patterns, str):
                check_pattern(patterns, f"factorize.{key}")
        check(0 < self.keep_ratio <= 1, "factorize.keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")
        check(0 <= self.min_rank_share <= 1, "factorize.min_rank_share", f"must be in [0, 1], got {self.min_rank_share}")
        check(self.rank_multiple >= 1, "factorize.rank_multiple", "must be >= 1")
        check(self.solver_steps >= 1, "factorize.solver_steps", "must be >= 1")
        check(self.search_samples >= 1, "factorize.search_samples", "must be >= 1")
        check(self.search_points >= 3, "factorize.search_points", "must be >= 3 (both ends and the uniform rank)")
        check(self.search_max_share >= 1, "factorize.search_max_share", f"must be >= 1, got {self.search_max_share}")

    def method_options(self) -> Any:
        """The method's options object: its options class filled from `options`, the rest at their defaults."""
        spec = get_method(self.method)
        known = spec.option_names()
        for key in self.options:
            check(key in known, f"factorize.options.{key}",
                  f"method {self.method} has no such option (its options: {', '.join(known) or 'none'})")
        return build(spec.options, self.options, "factorize.options")


# eager PyTorch; the checked ONNX export in onnxruntime; that graph with int8 weights (dynamic quantization)
LATENCY_RUNTIMES = ("torch", "onnxruntime", "onnxruntime_int8")


@dataclass(frozen=True)
class EvaluateConfig:
    """What the evaluate stage measures besides the task metric."""

    batch_size: int = 64
    latency: bool = True
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    latency_seq_len: int = 64
    latency_warmup: int = 3
    latency_repeats: int = 10
    latency_runtimes: list[str] = field(default_factory=lambda: ["torch"])
    threads: int | None = None

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "evaluate.batch_size", "must be positive")
        check(
            bool(self.latency_runtimes) and set(self.latency_runtimes) <= set(LATENCY_RUNTIMES),
            "evaluate.latency_runtimes", f"must be a non-empty list of {', '.join(LATENCY_RUNTIMES)}",
        )
        check(all(b > 0 for b in self.latency_batch_sizes), "evaluate.latency_batch_sizes", "must be positive")
        check(self.latency_repeats >= 1, "evaluate.latency_repeats", "must be >= 1")
        check(self.latency_warmup >= 0, "evaluate.latency_warmup", f"must be >= 0, got {self.latency_warmup}")
        check(self.latency_seq_len >= 2, "evaluate.latency_seq_len", f"must be >= 2, got {self.latency_seq_len}")
        check(self.threads is None or self.threads >= 1, "evaluate.threads", f"must be >= 1 or null (torch's default), got {self.threads}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: a local SQLite store by default so that nothing needs a server."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "lowrank"


@dataclass(frozen=True)
class OrchestrationConfig:
    """Which path the flow takes, and Prefect's settings (state stays inside the project)."""

    path: Literal["dense", "factorize", "factorize_only", "lpaf"] = "factorize"
    cache: bool = True
    cron: str | None = None


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # the defaults of the four train sections below
    finetune: TrainConfig = field(default_factory=TrainConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    factorize: FactorizeConfig = field(default_factory=FactorizeConfig)
    finetune_compressed: CompressedTrainConfig = field(default_factory=CompressedTrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    mrft: MrftConfig = field(default_factory=MrftConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # `lowrank sweep`: grid and configs of overrides

    def __post_init__(self) -> None:
        # Checks across sections: which factorizers suit the configured path (the method table says).
        path, method = self.orchestration.path, self.factorize.method
        if path == "lpaf":
            check_lpaf_factorize(self.factorize)
        else:
            check(
                get_method(method).accepts("factorize"),
                "factorize.method",
                f"{method} factorizes pruned matrices: it needs orchestration.path lpaf (path is {path})",
            )


def check_lpaf_factorize(cfg: FactorizeConfig) -> None:
    """ConfigError unless `cfg` can factorize pruned matrices (the lpaf path has no Fisher stage)."""
    check(
        get_method(cfg.method).accepts("lpaf"),
        "factorize.method",
        f"the lpaf path factorizes pruned matrices with {', '.join(method_names('lpaf'))}, got {cfg.method}",
    )
    check(
        cfg.allocation == "uniform",
        "factorize.allocation",
        f"the lpaf path has no Fisher stage: use uniform, got {cfg.allocation}",
    )
