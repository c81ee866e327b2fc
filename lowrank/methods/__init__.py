"""Factorization methods: the table (`registry`) and the methods, one module per family.

Importing this package fills the table. A new method: a function in a module
here (or anywhere) decorated with `@register_method(..., options=ItsOptions)`, and,
when it lives here, one import line below.
"""

from lowrank.methods.registry import (
    IMPORTANCE_KINDS, METHODS, PATHS, Method, NoOptions, Solve, get_method, method_names, register_method, unregister_method,
)
from lowrank.methods import weighted  # noqa: E402,F401  fill the table, in the order `lowrank methods` lists
from lowrank.methods import activation  # noqa: E402,F401
from lowrank.methods import sparse  # noqa: E402,F401

__all__ = [
    "IMPORTANCE_KINDS", "METHODS", "PATHS", "Method", "NoOptions", "Solve", "get_method", "method_names", "register_method",
    "unregister_method",
]
