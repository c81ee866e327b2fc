"""Speed-ups from one measurement: the models timed in turn, round after round, on the same inputs."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowrank.evaluation import latency_side_by_side
from lowrank.pipeline.summary import compare


class _Sleeper(nn.Module):
    """A model whose forward takes `ms` milliseconds, and which notes the order of the calls."""

    calls: list[str] = []

    def __init__(self, name: str, ms: float) -> None:
        super().__init__()
        self.name, self.ms, self.config = name, ms, SimpleNamespace(vocab_size=30)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _Sleeper.calls.append(self.name)
        time.sleep(self.ms / 1e3)
        return input_ids


def test_the_speedup_is_the_ratio_of_paired_rounds_and_no_model_always_runs_first() -> None:
    _Sleeper.calls = []
    models = {"dense": _Sleeper("dense", 12.0), "small": _Sleeper("small", 4.0)}
    result = latency_side_by_side(models, batch_sizes=[1, 2], seq_len=4, warmup=1, rounds=6)
    assert set(result) == {"batch_1", "batch_2"}
    for batch in result.values():
        assert 1.5 < batch["speedup"]["small"]["median"] < 3.5  # 12 ms against 4 ms, plus whatever sleep overshoots
        assert batch["speedup"]["small"]["p10"] <= batch["speedup"]["small"]["median"] <= batch["speedup"]["small"]["p90"]
        assert batch["ms"]["dense"]["median"] >= 12.0 and batch["ms"]["small"]["median"] >= 4.0
    timed = _Sleeper.calls[2:14]  # batch 1: one warm-up each, then 6 rounds of two
    assert [timed[i] for i in range(0, 12, 2)] == ["dense", "small"] * 3  # each round starts at the next model


def test_the_summary_takes_its_speedups_from_the_side_by_side_measurement() -> None:
    metrics = {
        "dense": {"task": {"score": 0.9}, "params": {"target_linear": 100, "total": 150}, "size_bytes": 1000,
                  "latency": {"batch_1": {"median_ms": 10.0}}},
        "small": {"task": {"score": 0.8}, "params": {"target_linear": 30, "total": 80}, "size_bytes": 500,
                  "latency": {"batch_1": {"median_ms": 1.0}}},  # timed minutes apart: a 10x that the shapes do not give
    }
    timed = {"torch": {"batch_1": {"ms": {"dense": {"median": 8.0}, "small": {"median": 4.0}},
                                   "speedup": {"small": {"median": 2.1, "p10": 1.9, "p90": 2.3}}}}}
    models = compare(metrics, timed)
    assert models["small"]["speedup"] == {"torch.batch_1": 2.1} and models["small"]["speedup_spread"] == {"torch.batch_1": [1.9, 2.3]}
    assert models["small"]["standalone_latency_ms"] == {"torch.batch_1": 1.0}
    assert models["dense"]["latency_ms"] == {"torch.batch_1": 8.0}
    assert models["small"]["score_kept"] == pytest.approx(0.8 / 0.9) and models["small"]["params_kept"] == 0.3
    assert "speedup" not in compare(metrics)["small"]  # no side-by-side measurement, no speed-up
