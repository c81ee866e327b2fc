"""lowrank: importance-weighted low-rank compression of fine-tuned Transformer encoders.

    import lowrank
    importance = lowrank.fisher_importance(model, loader)                     # what fwsvd/tfwsvd weigh by
    report = lowrank.compress_(model, method="tfwsvd", keep_ratio=0.3, importance=importance)  # overrides of
    # FactorizeConfig (the `factorize` section); or compress_(model, config, importance=..., filter_fn=...)
    lowrank.save_compressed(model, "out", method="tfwsvd")                     # safetensors + the recipe
    model = lowrank.load_compressed("out")                                      # any folder the pipeline wrote

`lowrank.METHODS` is the method table (`lowrank methods` on the command line).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Lazy, so `import lowrank` (e.g. for the version) does not import torch and transformers.
_EXPORTS = {
    "compress_": "lowrank.api",
    "fisher_importance": "lowrank.api",
    "CompressReport": "lowrank.api",
    "load_compressed": "lowrank.io.checkpoints",
    "save_compressed": "lowrank.io.checkpoints",
    "METHODS": "lowrank.methods",
    "register_method": "lowrank.methods",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
