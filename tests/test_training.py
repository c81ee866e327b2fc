"""The training loop ends on the best or the last epoch, as `keep_best` says."""

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification

from lowrank.config import TrainConfig
from lowrank.train.loop import train
from conftest import tiny_bert_config


def _batches(vocab: int, n: int = 4, size: int = 4, length: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1, vocab, (size, length), generator=gen),
            "attention_mask": torch.ones(size, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (size,), generator=gen),
        }
        for _ in range(n)
    ]


def _run(cfg: TrainConfig, scores: list[float], **kwargs) -> tuple[dict, list[dict], object]:
    """Train with scripted evaluation scores; return the final weights, the weights at each evaluation, the result."""
    torch.manual_seed(0)
    config = tiny_bert_config()
    model = BertForSequenceClassification(config)
    snapshots: list[dict] = []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        snapshots.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"score": scores[len(snapshots) - 1]}

    loader = DataLoader(_batches(config.vocab_size), batch_size=None)
    result = train(model, loader, cfg, evaluate=evaluate, progress=False, **kwargs)
    return model.state_dict(), snapshots, result


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


CFG = TrainConfig(epochs=3, lr=1e-3, warmup_ratio=0.0)


def test_keep_best_ends_on_the_best_epoch() -> None:
    final, snapshots, result = _run(CFG, [0.7, 0.9, 0.5])
    assert (result.best_epoch, result.best_score) == (2, 0.9)
    assert _same(final, snapshots[1]) and not _same(final, snapshots[2])


def test_keep_best_false_ends_on_the_last_epoch() -> None:
    final, snapshots, result = _run(dataclasses.replace(CFG, keep_best=False), [0.7, 0.9, 0.5])
    assert (result.best_epoch, result.best_score) == (3, 0.5)
    assert _same(final, snapshots[2]) and not _same(final, snapshots[1])


@pytest.mark.parametrize("cfg_keep_best", [True, False])
def test_the_argument_overrides_the_config(cfg_keep_best: bool) -> None:
    """Pruning passes keep_best=False whatever its train section says: an earlier epoch has another density."""
    final, snapshots, result = _run(dataclasses.replace(CFG, keep_best=cfg_keep_best), [0.9, 0.7, 0.5], keep_best=False)
    assert result.best_epoch == 3 and _same(final, snapshots[2])
