"""`torch`, imported on its first use.

The method and solver tables are read by params validation, `lowrank methods` and `lowrank schema`, which need the
tables' names and signatures, not tensors; importing torch for them costs seconds of a command that answers at once
(tests/test_console.py checks that it is not imported). Modules that declare those tables take `torch` from here;
their annotations name `Tensor` as a string (`from __future__ import annotations`).
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for the module `name`, imported when an attribute is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch: Any = LazyModule("torch")
