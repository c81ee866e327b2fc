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

Targets = str | Sequence[str]

# Every Linear inside a numbered Transformer block (BERT/RoBERTa `layer.N`,
# DistilBERT `transformer.layer.N`, GPT-style `h.N`, T5 `block.N`, Llama `layers.N`).
DEFAULT_TARGETS: str = r".*\.(layer|layers|h|block|blocks)\.\d+\..+"
# Never the embeddings, the pooler or the task head, even inside a block.
DEFAULT_EXCLUDE: str = r".*(embed|pooler|classifier|lm_head|score|qa_outputs).*"

# BERT-family suffixes -> short matrix types, for tables and per-type analysis.
_TYPES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "attention.q_lin": "query",
    "attention.k_lin": "key",
    "attention.v_lin": "value",
    "attention.out_lin": "attention_output",
    "ffn.lin1": "ffn_in",
    "ffn.lin2": "ffn_out",
}
_BLOCK = re.compile(r".*\.(?:layer|layers|h|block|blocks)\.\d+\.(.+)")


def _matches_any(name: str, patterns: Targets) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith(f".{p}") for p in patterns)


def matches(name: str, targets: Targets, exclude: Targets | None = None) -> bool:
    """Whether the module called `name` is a target: excluded names never are."""
    if exclude and _matches_any(name, exclude):
        return False
    return _matches_any(name, targets)


def find_targets(model: nn.Module, targets: Targets | None = None, exclude: Targets | None = None) -> list[str]:
    """Names of the model's `nn.Linear` layers that match, in module order.

    `None` means the defaults; a layer that is already factorized is found
    through the name it had before (see `lowrank.layers.FactorizedLinear`).
    """
    from lowrank.modules.layers import FactorizedLinear

    targets = DEFAULT_TARGETS if targets is None else targets
    exclude = DEFAULT_EXCLUDE if exclude is None else exclude
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, FactorizedLinear)) and matches(name, targets, exclude)
    ]


def matrix_type(name: str) -> str:
    """The kind of matrix a target is (`query`, `ffn_in`, ...), the same across blocks."""
    found = _BLOCK.fullmatch(name)
    inner = found.group(1) if found else name
    for suffix, kind in _TYPES.items():
        if inner == suffix:
            return kind
    return inner
