"""lowrank: importance-weighted low-rank compression of fine-tuned Transformer encoders.

`lowrank.load_compressed(path)` loads any model folder the pipeline wrote.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_compressed", "save_compressed"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import lowrank` (e.g. for the version) does not import transformers.
    if name in ("load_compressed", "save_compressed"):
        from . import compressed

        return getattr(compressed, name)
    raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
