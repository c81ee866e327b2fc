"""Which Linear layers a compression touches: a pure function on dotted module names.

Rules follow peft's target matching, so they read the same to anyone who has
used it: a string is a regular expression that must match the whole name; a
list matches a name exactly or as a dotted suffix (`"output.dense"` matches
`bert.encoder.layer.0.output.dense`). Exclusions are checked first and win.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from lowrank.config.base import InputError
from lowrank.modules.layers import LINEAR_TYPES, FactorizedLinear

Targets = str | Sequence[str]

# Every Linear inside a numbered Transformer block (BERT/RoBERTa `layer.N`,
# DistilBERT `transformer.layer.N`, GPT-style `h.N`, T5 `block.N`, Llama `layers.N`).
DEFAULT_TARGETS: str = r".*\.(layer|layers|h|block|blocks)\.\d+\..+"
# Never the embeddings, the pooler or the task head, even inside a block.
DEFAULT_EXCLUDE: str = r".*(embed|pooler|classifier|lm_head|score|qa_outputs).*"

# The one table of families whose blocks DEFAULT_TARGETS does not reach, by `config.model_type`.
FAMILY_TARGETS: dict[str, str] = {
    # One layer group shared by every block (`albert_layer_groups.G.albert_layers.L`): found, and factorized, once.
    "albert": r".*\.albert_layers\.\d+\..+",
}

# Suffixes inside a block -> short matrix types, the same across families, for tables and per-type analysis.
# A fused projection keeps its own type (`qkv`; ModernBERT's `mlp.Wi` is the gate and input side of a GLU).
_TYPES = {
    **dict.fromkeys(["attention.self.query", "attention.q_lin", "attention.query", "attention.self.query_proj",
                     "attention.attn.q", "self_attn.q_proj"], "query"),
    **dict.fromkeys(["attention.self.key", "attention.k_lin", "attention.key", "attention.self.key_proj",
                     "attention.attn.k", "self_attn.k_proj"], "key"),
    **dict.fromkeys(["attention.self.value", "attention.v_lin", "attention.value", "attention.self.value_proj",
                     "attention.attn.v", "self_attn.v_proj"], "value"),
    **dict.fromkeys(["attn.Wqkv", "attn.c_attn"], "qkv"),
    **dict.fromkeys(["attention.output.dense", "attention.out_lin", "attention.dense", "attention.attn.o",
                     "attn.Wo", "attn.c_proj", "self_attn.o_proj"], "attention_output"),
    **dict.fromkeys(["intermediate.dense", "ffn.lin1", "ffn", "mlp.c_fc", "mlp.up_proj"], "ffn_in"),
    "mlp.Wi": "ffn_gate_in",
    "mlp.gate_proj": "ffn_gate",
    **dict.fromkeys(["output.dense", "ffn.lin2", "ffn_output", "mlp.Wo", "mlp.c_proj", "mlp.down_proj"], "ffn_out"),
}
_BLOCK = re.compile(r".*\.(?:layer|layers|h|block|blocks|albert_layers)\.\d+\.(.+)")


def _matches_any(name: str, patterns: Targets) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith(f".{p}") for p in patterns)


def matches(name: str, targets: Targets, exclude: Targets | None = None) -> bool:
    """Whether the module called `name` is a target: excluded names never are."""
    if exclude and _matches_any(name, exclude):
        return False
    return _matches_any(name, targets)


def family(model: nn.Module) -> str:
    """The model's family as transformers names it (`config.model_type`), or its class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def default_targets(model: nn.Module) -> str:
    """The targets a model gets when none are set: its family's entry in FAMILY_TARGETS, else DEFAULT_TARGETS."""
    return FAMILY_TARGETS.get(family(model), DEFAULT_TARGETS)


def find_targets(model: nn.Module, targets: Targets | None = None, exclude: Targets | None = None) -> list[str]:
    """Names of the model's Linear layers (transformers' Conv1D included) that match, in module order.

    `None` means the defaults (`default_targets`, DEFAULT_EXCLUDE); a layer that is
    already factorized is found through the name it had before. A layer shared by
    several blocks is one module, so it is found once. Works on a model built on
    the meta device (names and types only).
    """
    targets = default_targets(model) if targets is None else targets
    exclude = DEFAULT_EXCLUDE if exclude is None else exclude
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (*LINEAR_TYPES, FactorizedLinear)) and matches(name, targets, exclude)
    ]


def require_targets(model: nn.Module, targets: Targets | None = None, exclude: Targets | None = None) -> list[str]:
    """`find_targets`, or a one-line InputError naming the family, some of its Linear layers and the key to set."""
    names = find_targets(model, targets or None, exclude or None)
    if names:
        return names
    linear = [name for name, module in model.named_modules() if isinstance(module, (*LINEAR_TYPES, FactorizedLinear))]
    some = ", ".join(linear[:3]) + (", ..." if len(linear) > 3 else "") if linear else "none"
    which = f"{targets!r}" if targets else f"the default targets {default_targets(model)!r}"
    raise InputError(
        f"factorize.targets: no Linear layer of this {family(model)!r} model ({type(model).__name__}) matches {which}; "
        f"set factorize.targets to a regex or a list of names (peft's rules) among its Linear layers ({some})"
    )


def matrix_type(name: str) -> str:
    """The kind of matrix a target is (`query`, `ffn_in`, ...), the same across blocks."""
    found = _BLOCK.fullmatch(name)
    inner = found.group(1) if found else name
    for suffix, kind in _TYPES.items():
        if inner == suffix:
            return kind
    return inner
