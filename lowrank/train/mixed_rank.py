"""The schedule of mixed-rank fine-tuning (LPAF step 4): which layers take their low-rank path at each step.

The layers themselves are `lowrank.modules.mixed_rank.MixedRankLinear`.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank.modules.mixed_rank import MixedRankLinear, mixed_rank_layers
from lowrank.train.hooks import TrainHook


def low_rank_probability(step: int, total_steps: int, p0: float, ramp_share: float) -> float:
    """Probability that a layer takes its low-rank path at `step`.

    Linear from `p0` at step 0 to 1 at `ramp_share * total_steps`, then 1.
    """
    if not 0 <= p0 <= 1:
        raise ValueError(f"p0 must be in [0, 1], got {p0}")
    if not 0 <= ramp_share <= 1:
        raise ValueError(f"ramp_share must be in [0, 1], got {ramp_share}")
    ramp_steps = ramp_share * total_steps
    if ramp_steps <= 0 or step >= ramp_steps:
        return 1.0
    return p0 + (1.0 - p0) * max(step, 0) / ramp_steps


class MixedRankScheduler(TrainHook):
    """Before each forward, draws for every MixedRankLinear whether it takes the low-rank path.

    Draws come from a private CPU generator, so they neither consume nor
    depend on the global RNG that dropout and data shuffling use.
    """

    def __init__(self, p0: float = 0.5, ramp_share: float = 0.5, seed: int = 0) -> None:
        """p0: low-rank probability at the first step; ramp_share: share of the steps over which it
        rises to 1 (both in [0, 1]); seed: of the path draws, so that a rerun takes the same paths."""
        low_rank_probability(0, 0, p0, ramp_share)  # checks both
        self.p0, self.ramp_share = p0, ramp_share
        self.total_steps = 0
        self.probability = p0
        self.low_rank_share = 1.0
        self._generator = torch.Generator().manual_seed(seed)
        self._layers: list[MixedRankLinear] = []

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.total_steps = total_steps
        self._layers = list(mixed_rank_layers(model).values())
        if not self._layers:
            raise ValueError("MixedRankScheduler found no MixedRankLinear in the model: call to_mixed_rank first")

    def before_forward(self, model: nn.Module, step: int) -> None:
        self.probability = low_rank_probability(step, self.total_steps, self.p0, self.ramp_share)
        draws = torch.rand(len(self._layers), generator=self._generator)
        for layer, draw in zip(self._layers, draws.tolist()):
            layer.use_low_rank = self.probability >= 1.0 or draw < self.probability
        self.low_rank_share = sum(layer.use_low_rank for layer in self._layers) / len(self._layers)

    def on_train_end(self, model: nn.Module) -> None:
        for layer in self._layers:
            layer.use_low_rank = True

    def metrics(self) -> dict[str, float]:
        return {"p_low_rank": self.probability, "low_rank_share": self.low_rank_share}
