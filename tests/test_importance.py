"""Fisher and Taylor importance against gradients taken by hand, and their file round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowrank.train.importance import collect_importance, load_importance, save_importance
from test_pruning import target_names, tiny_bert


def _batches(n_batches: int = 3, size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(5, 100, (size, 7), generator=generator),
            "attention_mask": torch.ones(size, 7, dtype=torch.long),
            "labels": torch.randint(0, 2, (size,), generator=generator),
        }
        for _ in range(n_batches)
    ]


def _grads(model, batch, name):
    model.zero_grad()
    model(**batch).loss.backward()
    return dict(model.named_modules())[name].weight.grad.clone()


def test_fisher_is_the_mean_of_squared_batch_gradients() -> None:
    model = tiny_bert().eval()
    names = target_names(model)
    batches = _batches()
    got = collect_importance(model, batches, names, progress=False)
    name = names[0]
    weight = dict(model.named_modules())[name].weight.detach()
    grads = [_grads(model, b, name) for b in batches]
    expected_fisher = sum(g.square() for g in grads) / len(grads)
    expected_taylor = sum((g * weight).abs() for g in grads) / len(grads)
    torch.testing.assert_close(got["fisher"].scores[name], expected_fisher)
    torch.testing.assert_close(got["taylor"].scores[name], expected_taylor)
    assert got["fisher"].num_samples == 12
    # Not the square of the mean gradient: that would be much smaller on average.
    assert got["fisher"].scores[name].sum() > (sum(grads) / len(grads)).square().sum()


def test_per_example_fisher_and_sample_limit() -> None:
    model = tiny_bert().eval()
    names = target_names(model)[:1]
    batch = _batches(1, 3)[0]
    got = collect_importance(model, [batch], names, per_example=True, max_samples=2, progress=False)
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    expected = sum(_grads(model, s, names[0]).square() for s in singles) / 2
    torch.testing.assert_close(got["fisher"].scores[names[0]], expected)
    assert got["fisher"].num_samples == 2


def test_only_misclassified_uses_wrong_examples_only() -> None:
    model = tiny_bert().eval()
    names = target_names(model)[:1]
    batch = _batches(1, 8)[0]
    with torch.no_grad():
        predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    wrong = (predicted != batch["labels"]).nonzero().flatten()
    assert 0 < wrong.numel() < 8
    got = collect_importance(model, [batch], names, only_misclassified=True, progress=False)
    expected = _grads(model, {k: v[wrong] for k, v in batch.items()}, names[0]).square()
    torch.testing.assert_close(got["fisher"].scores[names[0]], expected)
    assert got["fisher"].num_samples == wrong.numel()


def test_model_state_is_restored() -> None:
    model = tiny_bert().train()
    flags = [p.requires_grad for p in model.parameters()]
    collect_importance(model, _batches(1), target_names(model), progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_bad_targets_and_empty_data() -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match="'bert.pooler' is not an nn.Linear"):
        collect_importance(model, _batches(1), ["bert.pooler"], progress=False)
    with pytest.raises(ValueError, match="no gradient was taken"):
        collect_importance(model, [], target_names(model), progress=False)


def test_save_and_load(tmp_path: Path) -> None:
    model = tiny_bert().eval()
    got = collect_importance(model, _batches(1), target_names(model), progress=False)["fisher"]
    path = save_importance(got, tmp_path / "fisher.safetensors")
    loaded = load_importance(path)
    assert loaded.num_samples == got.num_samples and loaded.kind == "fisher"
    for name, tensor in got.scores.items():
        assert torch.equal(loaded.scores[name], tensor)
    with pytest.raises(FileNotFoundError, match="run the fisher stage"):
        load_importance(tmp_path / "missing.safetensors")
