"""What each targeted Linear layer's input looks like on the task's data: what ASVD and SVD-LLM weigh by.

Two statistics per layer, over the real (non-padding) tokens of the batches seen:
- `abs_mean` (in,): the mean absolute activation of each input feature (ASVD scales W's columns by it);
- `gram` (in, in): the mean of x x^T, the input's second moment (SVD-LLM whitens by its Cholesky factor).

They are recorded by forward pre-hooks during the fisher stage's pass, so the data is read once for every
importance a method may want. Each layer counts the rows it saw: a layer shared by several blocks (ALBERT's)
sees every token once per use, and its statistics are the mean over all of its inputs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from lowrank.modules.layers import linear_weight

ACTIVATION_KINDS = ("abs_mean", "gram")


class ActivationRecorder:
    """Accumulates `abs_mean` and `gram` of the named layers' inputs while `mask` is set (the batch's attention mask)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.names = list(names)
        width = {n: linear_weight(modules[n]).shape[1] for n in self.names}  # in_features, of a Conv1D too
        self.abs_sum = {n: torch.zeros(width[n], dtype=torch.float64) for n in self.names}
        self.gram_sum = {n: torch.zeros(width[n], width[n], dtype=torch.float64) for n in self.names}
        self.rows = dict.fromkeys(self.names, 0)  # inputs seen, per layer
        self.mask: Tensor | None = None  # set around the forward passes that count (not, e.g., a check for wrong answers)
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if self.mask is None:
                return
            x = args[0].detach()
            keep = self.mask.reshape(-1).bool().to(x.device) if x.dim() == 3 and self.mask.shape == x.shape[:2] else None
            rows = x.reshape(-1, x.shape[-1])
            if keep is not None:
                rows = rows[keep]
            rows = rows.to(torch.float64).cpu()
            self.abs_sum[name].add_(rows.abs().sum(0))
            self.gram_sum[name].addmm_(rows.T, rows)
            self.rows[name] += rows.shape[0]

        return record

    @contextlib.contextmanager
    def counting(self, attention_mask: Tensor) -> Iterator[None]:
        """Record the inputs of the forward passes inside the block, over the tokens `attention_mask` marks."""
        self.mask = attention_mask
        try:
            yield
        finally:
            self.mask = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def results(self) -> dict[str, dict[str, Tensor]]:
        """{"abs_mean": {layer: (in,)}, "gram": {layer: (in, in)}} as float32 means over the tokens seen."""
        if not all(self.rows.values()):
            raise ValueError("no activation was recorded: the data is empty")
        return {
            "abs_mean": {n: (s / self.rows[n]).float() for n, s in self.abs_sum.items()},
            "gram": {n: (g / self.rows[n]).float() for n, g in self.gram_sum.items()},
        }
