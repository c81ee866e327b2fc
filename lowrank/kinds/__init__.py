"""Task kinds: sequence classification, token classification, extractive QA (one module and one registration each)."""

from lowrank.kinds.registry import KINDS, TaskKind, architecture_kind, auto_class, get_kind, kind_of_model, register_kind
from lowrank.kinds import sequence, span, token  # noqa: F401,E402  (each registers itself)

SEQUENCE_KIND = sequence.SEQUENCE  # what a folder without a known head is loaded as (the kind lowrank began with)

__all__ = ["KINDS", "SEQUENCE_KIND", "TaskKind", "architecture_kind", "auto_class", "get_kind", "kind_of_model", "register_kind"]
