"""Extension points of the training loop.

Pruning and mixed-rank fine-tuning change what happens around an optimizer
step, not the loop itself; they plug in here so that one loop serves dense
fine-tuning, movement pruning and mixed-rank fine-tuning alike.
"""

from __future__ import annotations

from torch import nn


class TrainHook:
    """Callbacks of `lowrank.training.train`; every method defaults to doing nothing.

    Call order for each optimizer step `step` (0-based, `total_steps` in all):
    `before_forward` -> forward/backward -> `after_backward` -> gradient
    clipping and optimizer step -> `after_step`.
    """

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        """Called once, after the optimizer is built and before the first step."""

    def before_forward(self, model: nn.Module, step: int) -> None:
        """E.g. sample which path each mixed-rank layer takes this step."""

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Gradients are populated here, e.g. to accumulate movement scores."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Weights are updated here, e.g. to recompute and apply masks."""

    def on_train_end(self, model: nn.Module) -> None:
        """Called once after the last step, before the best model is restored."""

    def metrics(self) -> dict[str, float]:
        """Numbers to show in the progress bar and to return with the stage metrics."""
        return {}
