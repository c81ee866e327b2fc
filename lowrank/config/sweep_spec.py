"""A sweep: many configurations of params.yaml, as a grid and a list.

`grid` maps dotted param keys to lists of values (the configurations are their
product); `configs` adds configurations one by one, each a mapping of
overrides. Both live in the `sweep:` section of params.yaml or in a file of
their own (`lowrank sweep --spec FILE`), and every configuration is checked
like a `-S` override before anything runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from lowrank.config.base import ConfigError, InputError, check

MAX_CONFIGS = 50  # more needs --yes: a typo in a grid should not queue days of training


# What the evaluate stage logs of a model: `metric` must name one of these families (e.g. task.score, latency.batch_1.median_ms).
EVALUATE_METRICS = ("task", "params", "size_bytes", "eval_seconds", "latency", "latency_onnxruntime")


@dataclass(frozen=True)
class SelectConfig:
    """Which configuration a sweep ships: the best `metric` of its final model among those within the budgets.

    The winner is registered in the MLflow Model Registry as `name` (default `lowrank-<task>`) with the alias
    `champion`; `register: false` only reports it. A budget that no configuration meets registers nothing.
    """

    metric: str = "task.score"
    goal: str | None = None  # max or min (a latency or a size); null: the task's for a task.* metric (min for an lm's perplexity), else max
    max_keep_ratio: float | None = None  # the configured factorize.keep_ratio, at most this
    max_latency_ms: float | None = None  # `latency_metric` of the final model, at most this
    latency_metric: str = "latency.batch_1.median_ms"
    register: bool = True
    name: str | None = None

    def goal_for(self, task_goal: str) -> str:
        """The goal of `metric`: as configured, else the task's (`task_goal`) for a task metric, else max."""
        return self.goal or (task_goal if self.metric.startswith("task.") else "max")

    def __post_init__(self) -> None:
        for key in ("metric", "latency_metric"):
            value = getattr(self, key)
            check(value.split(".", 1)[0] in EVALUATE_METRICS, f"sweep.select.{key}",
                  f"{value} is not a metric of the evaluate stage (its metrics start with {', '.join(EVALUATE_METRICS)})")
        check(self.goal in ("max", "min", None), "sweep.select.goal", f"max, min or null, got {self.goal}")
        check(self.max_keep_ratio is None or 0 < self.max_keep_ratio <= 1, "sweep.select.max_keep_ratio", "must be in (0, 1] or null")
        check(self.max_latency_ms is None or self.max_latency_ms > 0, "sweep.select.max_latency_ms", "must be positive or null")


@dataclass(frozen=True)
class SweepConfig:
    """grid: dotted key -> list of values (their product); configs: further configurations, each a mapping of overrides;
    select: which configuration becomes the registered champion."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    configs: list[dict[str, Any]] = field(default_factory=list)
    select: SelectConfig = field(default_factory=SelectConfig)


def expand(spec: SweepConfig) -> list[dict[str, Any]]:
    """The configurations of a sweep, as override mappings: the grid's product, then `configs`."""
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key}: give a non-empty list of values")
    keys = list(spec.grid)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))] if keys else []
    configs = grid + [dict(c) for c in spec.configs]
    if not configs:
        raise ConfigError("sweep: the grid is empty and there are no configs: nothing to run")
    return configs


def as_overrides(config: dict[str, Any]) -> list[str]:
    """`-S` strings for a configuration (values as JSON, which the YAML parser reads back unchanged)."""
    return [f"{key}={json.dumps(value)}" for key, value in config.items()]


def label(config: dict[str, Any]) -> str:
    """A configuration's short name: its values, in key order."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in config.items()) or "(base)"


def check_key(root: Any, dotted: str) -> None:
    """A sweep key must name a param: every part a field of its section (inside a mapping param, anything goes)."""
    node = root
    for depth, part in enumerate(dotted.split(".")):
        if dataclasses.is_dataclass(node):
            names = [f.name for f in dataclasses.fields(node)]
            if part not in names:
                where = ".".join(dotted.split(".")[:depth]) or "params.yaml"
                raise ConfigError(f"sweep key {dotted} is not a param ({where} has no {part})")
            node = getattr(node, part)
        elif isinstance(node, dict) or node is None:
            return
        else:
            raise ConfigError(f"sweep key {dotted} is not a param ({'.'.join(dotted.split('.')[:depth])} is a value)")
