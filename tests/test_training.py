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


def test_scoring_the_start_lets_keep_best_end_on_the_untrained_weights() -> None:
    """+ ft that only makes the model worse ends where it started, and says epoch 0 won."""
    final, snapshots, result = _run(CFG, [0.8, 0.6, 0.7, 0.5], score_start=True)
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    assert (result.best_epoch, result.best_score) == (0, 0.8)
    assert _same(final, snapshots[0]) and not _same(final, snapshots[1])


def test_a_trained_epoch_wins_a_tie_with_the_start() -> None:
    final, snapshots, result = _run(CFG, [0.8, 0.8, 0.7, 0.8], score_start=True)
    assert result.best_epoch == 1 and _same(final, snapshots[1])


def test_hidden_state_distillation_adds_the_mean_block_mse() -> None:
    from lowrank.config import DistillationConfig
    from lowrank.train.loop import LossWeights, distillation_loss, weighted_loss

    def distilled_loss(model, batch, teacher, distill):  # stage 2 (or the only stage), as the loop computes it
        return weighted_loss(model, batch, teacher, LossWeights.predictions(distill) if teacher is not None else LossWeights())

    torch.manual_seed(0)
    config = tiny_bert_config()
    student, teacher = BertForSequenceClassification(config).eval(), BertForSequenceClassification(config).eval()
    batch = _batches(config.vocab_size, n=1)[0]
    logits_only = DistillationConfig(enabled=True, temperature=2.0, weight=0.5)
    with_hidden = dataclasses.replace(logits_only, hidden_weight=3.0)
    with torch.no_grad():
        s, t = student(**batch, output_hidden_states=True), teacher(**batch, output_hidden_states=True)
        kd = distillation_loss(s.logits, t.logits, 2.0)
        mse = sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(s.hidden_states[1:], t.hidden_states[1:])) / config.num_hidden_layers
        assert distilled_loss(student, batch, teacher, logits_only) == pytest.approx(float(0.5 * s.loss + 0.5 * kd), rel=1e-5)
        assert distilled_loss(student, batch, teacher, with_hidden) == pytest.approx(float(0.5 * s.loss + 0.5 * kd + 3.0 * mse), rel=1e-5)
        assert distilled_loss(student, batch, student, with_hidden) == pytest.approx(float(0.5 * s.loss), rel=1e-5)  # itself: no gap
        assert distilled_loss(student, batch, None, None) == pytest.approx(float(s.loss), rel=1e-6)


def test_collapse_is_reported_only_from_above_the_majority_score() -> None:
    from lowrank.data.metrics import majority_score
    from lowrank.data.catalog import get_task
    from lowrank.pipeline.factorize import collapse_report

    mrpc = get_task("mrpc")
    labels = torch.tensor([1, 1, 1, 0])  # answering 1 everywhere: accuracy 0.75, F1 6/7
    majority = majority_score(mrpc, labels)
    assert majority == pytest.approx((0.75 + 6 / 7) / 2)
    start = [{"epoch": 0.0, "score": majority + 0.02}]
    fell = collapse_report([*start, {"epoch": 1.0, "score": majority}], majority)
    assert fell["collapsed"] is True and fell["collapsed_epochs"] == [1]
    assert collapse_report([*start, {"epoch": 1.0, "score": majority + 0.01}], majority)["collapsed"] is False
    # keep_best may end on epoch 2 (or 0): the epochs that fell are reported all the same
    recovered = collapse_report([*start, {"epoch": 1.0, "score": majority}, {"epoch": 2.0, "score": majority + 0.05},
                                 {"epoch": 3.0, "score": majority}], majority)
    assert recovered["collapsed"] is True and recovered["collapsed_epochs"] == [1, 3]
    at_start = collapse_report([{"epoch": 0.0, "score": majority}, {"epoch": 1.0, "score": majority}], majority)
    assert at_start["collapsed"] is False  # it started there
    assert majority_score(get_task("stsb"), torch.tensor([0.5, 4.0, 2.5])) == 0.0


def test_scoring_the_start_does_not_change_the_training() -> None:
    """The epoch-0 score draws nothing from the RNG that dropout and shuffling use."""
    def loader_eval(m: torch.nn.Module) -> dict[str, float]:
        for _ in DataLoader(list(range(4)), batch_size=2):  # a DataLoader draws its base seed from the global RNG
            pass
        return {"score": 0.5}

    finals = []
    for score_start in (False, True):
        torch.manual_seed(0)
        config = tiny_bert_config(); config.hidden_dropout_prob = 0.5
        model = BertForSequenceClassification(config)
        loader = DataLoader(_batches(config.vocab_size), batch_size=None)
        train(model, loader, dataclasses.replace(CFG, keep_best=False), evaluate=loader_eval, progress=False, score_start=score_start)
        finals.append(model.state_dict())
    assert _same(*finals)
