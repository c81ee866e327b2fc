"""Data: the task table and file readers (`tasks`), a user's own files (`custom`), loading and batching (`loading`), task metrics (`metrics`)."""

from lowrank.data.loading import *  # noqa: F401,F403  the names the stages and tests use
from lowrank.data.loading import __all__  # noqa: F401
