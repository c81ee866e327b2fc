"""Typed view of `params.yaml`: one frozen dataclass per section (`base`, `sections`, `lpaf`), and how the file becomes one (`loading`).

Every knob of the pipeline lives in `params.yaml`; DVC reads the same file for
its `params:`. Validating it here, before any work starts, turns a typo in a
key or an impossible value into an error that names the key, instead of a
crash an hour into fine-tuning.
"""

from lowrank.config.loading import (
    TRAIN_SECTIONS, apply_overrides, build, configurations, flatten, load_params, load_spec, params_schema, read_yaml,
    select, to_dict,
)
from lowrank.config.base import (
    CompressedTrainConfig, ConfigError, DistillationConfig, InputError, IntermediateDistillation, MissingInputError, TrainConfig, check,
)
from lowrank.config.lpaf_sections import RANK_PULL_IMPORTANCE, MrftConfig, PruneConfig
from lowrank.config.sweep_spec import MAX_CONFIGS, SelectConfig, SweepConfig, expand, label
from lowrank.config.sections import (
    DEFAULT_MODEL, LATENCY_RUNTIMES, CustomDataConfig, DataConfig, ValidationConfig, EvaluateConfig, FactorizeConfig, FisherConfig,
    ModelConfig, OrchestrationConfig, Params, PathsConfig, TrackingConfig, check_lpaf_factorize,
)

__all__ = [
    "DEFAULT_MODEL", "CompressedTrainConfig", "InputError", "MissingInputError", "LATENCY_RUNTIMES", "RANK_PULL_IMPORTANCE", "TRAIN_SECTIONS", "ConfigError", "CustomDataConfig",
    "DataConfig", "DistillationConfig", "IntermediateDistillation", "EvaluateConfig", "FactorizeConfig", "FisherConfig", "ModelConfig",
    "ValidationConfig", "MrftConfig", "OrchestrationConfig", "Params", "PathsConfig", "PruneConfig", "TrackingConfig", "TrainConfig",
    "MAX_CONFIGS", "SelectConfig", "SweepConfig", "apply_overrides", "build", "configurations", "expand", "label", "load_spec", "check", "check_lpaf_factorize", "flatten", "load_params", "params_schema",
    "read_yaml", "select", "to_dict",
]
