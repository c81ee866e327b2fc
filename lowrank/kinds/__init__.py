"""Task kinds: sequence classification, token classification, extractive QA, causal LM (one module and one registration each)."""

from lowrank.kinds.registry import KINDS, TaskKind, architecture_kind, auto_class, better, get_kind, kind_of_model, register_kind, task_goal
from lowrank.kinds import sequence, span, token  # noqa: F401,E402  (each registers itself)
from lowrank.kinds import lm  # noqa: F401,E402  (after the encoder kinds, so `lowrank tasks` lists them first)

SEQUENCE_KIND = sequence.SEQUENCE  # what a folder without a known head is loaded as (the kind lowrank began with)

__all__ = ["KINDS", "SEQUENCE_KIND", "TaskKind", "architecture_kind", "auto_class", "better", "get_kind", "kind_of_model", "register_kind", "task_goal"]
