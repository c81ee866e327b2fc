"""params.yaml to `Params`: read, apply `-S` overrides, share the training defaults, convert and check (`convert.build`)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from lowrank.config.base import ConfigError, InputError, TrainConfig
from lowrank.config.convert import build
from lowrank.config.sections import Params
from lowrank.config.sweep_spec import MAX_CONFIGS, SweepConfig, as_overrides, check_key, expand, label

# A params file is a few hundred values; YAML aliases can make a 9 KB file stand for billions ("billion laughs"),
# which loads as shared references in a moment and then takes minutes and gigabytes to copy, check and hash.
MAX_YAML_VALUES = 100_000


class _SizedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document that stands for more than MAX_YAML_VALUES values or refers to itself."""

    def construct_document(self, node: yaml.Node) -> Any:
        _count(node, {}, set())
        return super().construct_document(node)


class _Unbounded(ValueError):
    def __init__(self, node: yaml.Node, what: str) -> None:
        super().__init__(what)
        self.line, self.what = node.start_mark.line + 1, what


def _count(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `node` stands for with every alias expanded, counted without expanding them."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise _Unbounded(node, "an alias refers to the value that contains it")
    open_.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_count(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_count(key, sizes, open_) + _count(value, sizes, open_) for key, value in node.value)
    else:
        size = 1
    open_.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise _Unbounded(node, f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
    sizes[id(node)] = size
    return size


def load_yaml(text: str, where: str, file: bool = True) -> Any:
    """`yaml.safe_load` with a bound on what aliases expand to; errors name `where` (`file:line`, or an override)."""
    try:
        return yaml.load(text, Loader=_SizedLoader)  # noqa: S506  a SafeLoader subclass
    except _Unbounded as err:
        raise ConfigError(f"{where}:{err.line}: {err.what}" if file else f"{where}: {err.what}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply DVC-style `section.key=value` overrides; values are parsed as YAML."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if node.get(part) is None:  # a section that is null today (`data.custom`) takes nested keys too
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = load_yaml(text, f"override {dotted}", file=False)
    return raw


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read params.yaml, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = load_yaml(path.read_text(), str(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _train_runs(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if isinstance(hint, type) and issubclass(hint, TrainConfig):
            found.append(prefix + item.name)
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            found += _train_runs(hint, f"{prefix}{item.name}.")
    return found


# The training runs of the pipeline, read from the params' types (every TrainConfig, at any depth, but `train` itself,
# their defaults): each starts from the `train` section and overrides what differs.
TRAIN_SECTIONS = tuple(name for name in _train_runs(Params) if name != "train")


def share_train_defaults(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Fill each train section from `train:`, its own keys winning (so `-S prune.train.lr=...` still works)."""
    raw = _deep_copy(raw)
    defaults = raw.get("train")
    if defaults is None:
        return raw
    build(TrainConfig, defaults, "train")  # its own errors name `train.*`, not the first section using it
    for dotted in TRAIN_SECTIONS:
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(node, dict) and isinstance(node.get(leaf) or {}, dict):
            node[leaf] = {**defaults, **(node.get(leaf) or {})}
    return raw


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read, override and validate params.yaml."""
    return build(Params, share_train_defaults(apply_overrides(read_yaml(path), overrides)))


def params_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml, from the same dataclasses (`lowrank schema`)."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(Params).json_schema()
    schema["title"] = "lowrank params.yaml"
    return schema


def select(params: Params, dotted: str) -> Any:
    """`select(p, "factorize.targets")`: a section or a single key, as stages declare them."""
    value: Any = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (for hashing, JSON and MLflow)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: the key form MLflow and `-S` use."""
    data = to_dict(obj)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def load_spec(path: str | Path) -> SweepConfig:
    """A sweep spec file: the same two keys as params.yaml's `sweep:` section (or that section, nested)."""
    raw = read_yaml(path)
    raw = raw.get("sweep", raw) if set(raw) <= {"sweep"} else raw
    try:
        return build(SweepConfig, raw, "sweep")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def configurations(params_path: str | Path, spec: SweepConfig, overrides: Sequence[str] = (), *, yes: bool = False) -> list[tuple[dict[str, Any], Any]]:
    """Each configuration's overrides and validated Params; errors name the configuration."""
    configs = expand(spec)
    if len(configs) > MAX_CONFIGS and not yes:
        raise InputError(f"sweep: {len(configs)} configurations (more than {MAX_CONFIGS}); pass --yes to run them all")
    for config in configs:
        for key in config:
            check_key(Params(), key)  # the structure only: the base alone need not be valid, each configuration must
    built = []
    for number, config in enumerate(configs, 1):
        try:
            built.append((config, load_params(params_path, [*overrides, *as_overrides(config)])))
        except InputError as err:
            raise type(err)(f"sweep configuration {number} ({label(config)}): {err}") from None
    return built
