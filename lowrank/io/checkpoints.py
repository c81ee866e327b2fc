"""Saving and loading compressed models: the recipe (ranks, method) travels with the weights.

A compressed model is an ordinary `save_pretrained` folder (safetensors)
whose `config.json` has a `lowrank` entry: the schema version, the method and
the rank of every targeted layer (`null` for a layer kept dense).
`load_compressed` builds the architecture from the config, swaps in
FactorizedLinear layers of those ranks, then loads the weights strictly, so a
wrong or truncated file fails loudly instead of leaving random weights.
A folder without the entry is a dense model and loads as one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn
from transformers import AutoConfig, PreTrainedModel

from lowrank.io.files import atomic_dir, check_safetensors, load_tensors
from lowrank.modules.layers import LINEAR_TYPES, FactorizedLinear, linear_weight
from lowrank.modules.surgery import replace_modules

SCHEMA_VERSION = 1
CONFIG_KEY = "lowrank"


def layer_ranks(model: nn.Module) -> dict[str, int]:
    """The rank of every FactorizedLinear in the model, by module name."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def recipe(model: PreTrainedModel) -> dict[str, Any]:
    """The `lowrank` entry of a model's config ({} for a dense model)."""
    return dict(getattr(model.config, CONFIG_KEY, None) or {})


def recipe_extra(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe's own notes (keep ratio, solver, ...), without what `write_compressed` sets itself."""
    return {k: v for k, v in entry.items() if k not in ("version", "method", "ranks")}


def write_compressed(
    model: PreTrainedModel,
    folder: str | Path,
    *,
    method: str,
    targets: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the model (safetensors) with its recipe in config.json into an existing folder.

    Args:
        targets: every targeted layer name; those not factorized are recorded as
            dense (`null`), so evaluation counts the same parameters before and after.
    """
    ranks: dict[str, int | None] = {name: None for name in targets or []}
    ranks.update(layer_ranks(model))
    setattr(model.config, CONFIG_KEY, {**(extra or {}), "version": SCHEMA_VERSION, "method": method, "ranks": ranks})
    model.save_pretrained(str(folder), safe_serialization=True)


def save_compressed(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    method: str,
    targets: list[str] | None = None,
    tokenizer: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """`write_compressed` plus the tokenizer, atomically: `out_dir` appears complete or not at all."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_compressed(model, tmp, method=method, targets=targets, extra=extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def load_compressed(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a model folder written by `save_compressed` (or any dense classifier folder).

    This is the one call a user needs: `lowrank.load_compressed("artifacts/finetune_compressed/model")`.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a model folder (no config.json): {path}")
    from lowrank.kinds import SEQUENCE_KIND, architecture_kind, auto_class

    for weights in sorted(path.glob("*.safetensors")):  # a truncated file: one line naming it, not transformers' traceback
        check_safetensors(weights)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model_class = auto_class(architecture_kind(getattr(config, "architectures", None)) or SEQUENCE_KIND)
    entry = getattr(config, CONFIG_KEY, None)
    if not entry:
        return model_class.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    version = entry.get("version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}/config.json: lowrank schema version {version!r}, this library reads {SCHEMA_VERSION}")
    weights_file = path / "model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"compressed model has no model.safetensors: {weights_file}")
    model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    ranks = {name: rank for name, rank in entry.get("ranks", {}).items() if rank is not None}

    def make(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, LINEAR_TYPES):  # a Conv1D (GPT-2) becomes the same FactorizedLinear as a Linear
            raise ValueError(f"{path}: recipe names {name!r}, which is not a Linear layer of {type(model).__name__}")
        out_features, in_features = linear_weight(module).shape
        return FactorizedLinear(in_features, out_features, ranks[name], bias=module.bias is not None)

    replace_modules(model, list(ranks), make)
    state = load_tensors(weights_file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{weights_file}: weights do not fit the recipe: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model
