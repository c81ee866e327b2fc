"""Pruning: the cubic schedule, exact top-k masks, movement scores, and a pruned tiny BERT."""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lowrank.train.hooks import TrainHook
from lowrank.train.pruning import (
    Pruner,
    cubic_sparsity,
    kept_count,
    load_pruning_state,
    prune_once,
    topk_mask,
    topk_mask_global,
)

TARGET_SUFFIXES = ("attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense", "intermediate.dense", "output.dense")


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config)


def target_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".encoder.layer." in n and n.endswith(TARGET_SUFFIXES)]


def run_loop(model: nn.Module, hooks: Sequence[TrainHook], steps: int,
             on_step: Callable[[int], None] = lambda step: None) -> list[float]:
    """The lead's loop in miniature: the hook calls in the same order, on random data."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for hook in hooks:
        hook.on_train_begin(model, steps)
    losses = []
    model.train()
    for step in range(steps):
        input_ids = torch.randint(0, 100, (8, 12), generator=generator)
        labels = torch.randint(0, 2, (8,), generator=generator)
        for hook in hooks:
            hook.before_forward(model, step)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        for hook in hooks:
            hook.after_backward(model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.after_step(model, step)
        losses.append(loss.item())
        on_step(step)
    for hook in hooks:
        hook.on_train_end(model)
    return losses


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 1.0), (9, 1.0), (10, 1.0), (30, 0.1 + 0.9 * 0.75**3), (50, 0.2125), (89, 0.1 + 0.9 * (1 / 80) ** 3),
     (90, 0.1), (99, 0.1), (150, 0.1)],
)
def test_cubic_schedule_known_values(step: int, expected: float) -> None:
    assert cubic_sparsity(step, 100, 0.1, 10, 10) == pytest.approx(expected, abs=1e-12)


def test_cubic_schedule_from_initial_density_and_without_ramp() -> None:
    assert cubic_sparsity(50, 100, 0.1, 10, 10, initial_density=0.5) == pytest.approx(0.15)
    assert cubic_sparsity(0, 10, 0.3, 0, 0) == 1.0
    assert cubic_sparsity(10, 10, 0.3, 0, 0) == pytest.approx(0.3)
    assert cubic_sparsity(4, 10, 0.3, 5, 5) == 1.0  # warm-up and cool-down fill the run
    assert cubic_sparsity(5, 10, 0.3, 5, 5) == 0.3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"final_density": 0.0}, "final_density"), ({"final_density": 1.5}, "final_density"),
     ({"method": "random"}, "method"), ({"scope": "layer"}, "scope"), ({"update_every": 0}, "update_every"),
     ({"warmup_steps": -1}, "warmup_steps"), ({"cooldown_steps": -2}, "cooldown_steps")],
)
def test_pruner_rejects_bad_settings(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Pruner(["lin"], **kwargs)


def test_warmup_plus_cooldown_longer_than_training_fails() -> None:
    with pytest.raises(ValueError, match="warmup_steps \\+ cooldown_steps"):
        cubic_sparsity(0, 10, 0.5, 6, 5)
    options = {"warmup_steps": 6, "cooldown_steps": 5}
    with pytest.raises(ValueError, match="warmup_steps \\+ cooldown_steps"):
        Pruner(["lin"], **options).on_train_begin(nn.Sequential(), 10)


# --------------------------------------------------------------------------- masks


def test_topk_mask_exact_count_and_ties_to_lower_index() -> None:
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    assert topk_mask(scores, 0.6).tolist() == [True, False, True, True, False]
    assert topk_mask(torch.tensor([3.0, 2.0, 2.0, 2.0, 0.0]), 0.4).tolist() == [True, True, False, False, False]
    assert topk_mask(torch.zeros(2, 5), 0.3).flatten().tolist() == [True] * 3 + [False] * 7
    scores = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    for density in (0.05, 0.1, 0.37, 0.5, 1.0):
        mask = topk_mask(scores, density)
        assert int(mask.sum()) == kept_count(scores.numel(), density) == round(density * scores.numel())
        assert scores[mask].min() > scores[~mask].max() if density < 1 else mask.all()


def test_global_topk_ranks_across_matrices() -> None:
    scores = {"a": torch.tensor([[5.0, 1.0], [4.0, 0.0]]), "b": torch.tensor([[3.0, 2.0, 6.0]])}
    masks = topk_mask_global(scores, 3 / 7)
    assert masks["a"].tolist() == [[True, False], [True, False]]
    assert masks["b"].tolist() == [[False, False, True]]


def test_prune_once_keeps_largest_magnitudes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    before = model[0].weight.detach().clone()
    masks = prune_once(model, ["0", "2"], density=0.25)
    assert int(masks["0"].sum()) == 12 and int(masks["2"].sum()) == 6
    assert torch.equal(model[0].weight, before * masks["0"])
    assert before.abs()[masks["0"]].min() > before.abs()[~masks["0"]].max()
    with pytest.raises(ValueError, match="magnitude"):
        prune_once(model, ["0"], 0.5, method="movement")
    with pytest.raises(ValueError, match="not an nn.Linear"):
        prune_once(model, ["1"], 0.5)


# --------------------------------------------------------------------------- the hook


def test_movement_score_is_minus_grad_times_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    pruner = Pruner(["0"], method="movement", final_density=0.5, warmup_steps=2)
    pruner.on_train_begin(model, 4)
    total = torch.zeros(3, 4)
    for step in range(2):
        model.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        total -= model[0].weight.grad * model[0].weight.detach()
        pruner.after_backward(model, step)
    assert torch.allclose(pruner.scores()["0"], total)


def test_taylor_score_is_smoothed_abs_grad_times_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    pruner = Pruner(["0"], method="taylor", final_density=0.5, warmup_steps=3, taylor_beta=0.6)
    pruner.on_train_begin(model, 4)
    expected = torch.zeros(3, 4)
    for step in range(3):
        model.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        expected = 0.6 * expected + 0.4 * (model[0].weight.grad * model[0].weight.detach()).abs()
        pruner.after_backward(model, step)
    assert torch.allclose(pruner.scores()["0"], expected)
    assert (pruner.scores()["0"] >= 0).all()


def test_taylor_beta_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="taylor_beta"):
        Pruner(["0"], method="taylor", taylor_beta=1.0)


@pytest.mark.parametrize(
    ("method", "scope"),
    [("movement", "per_matrix"), ("taylor", "per_matrix"), ("magnitude", "per_matrix"), ("movement", "global")],
)
def test_pruning_tiny_bert_follows_schedule(method: str, scope: str) -> None:
    model = tiny_bert()
    names = target_names(model)
    assert len(names) == 12
    steps, options = 20, dict(method=method, final_density=0.2, warmup_steps=4, cooldown_steps=4, scope=scope)
    pruner = Pruner(names, **options)
    modules = dict(model.named_modules())
    previous = {n: torch.ones_like(modules[n].weight, dtype=torch.bool) for n in names}
    checked = []

    def check(step: int) -> None:
        density = cubic_sparsity(step + 1, steps, 0.2, 4, 4)  # the density of the next forward
        masks = pruner.masks()
        if scope == "per_matrix":
            for name in names:
                assert int(masks[name].sum()) == kept_count(masks[name].numel(), density), (step, name)
        else:
            numel = sum(m.numel() for m in masks.values())
            assert round(pruner.density() * numel) == kept_count(numel, density)
        for name in names:
            assert not modules[name].weight[~masks[name]].any()  # pruned weights are zero after AdamW
            assert not (masks[name] & ~previous[name]).any()  # masks only shrink
            previous[name] = masks[name].clone()
        checked.append(step)

    losses = run_loop(model, [pruner], steps, check)
    assert checked == list(range(steps))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert pruner.density() == pytest.approx(0.2, abs=1e-3)
    assert pruner.metrics()["target_density"] == pytest.approx(0.2)


def test_update_every_holds_masks_between_updates() -> None:
    model = tiny_bert()
    names = target_names(model)[:2]
    pruner = Pruner(names, method="magnitude", final_density=0.3, warmup_steps=0, cooldown_steps=3, update_every=4)
    seen = []
    run_loop(model, [pruner], 12, lambda step: seen.append(pruner.metrics()["target_density"]))
    # Updates after steps 3 and 7 (every 4) and 8 (the ramp's end, forced so the final density is exact).
    assert seen[:3] == [1.0, 1.0, 1.0]
    assert seen[3] == seen[4] == seen[5] == seen[6] == pytest.approx(cubic_sparsity(4, 12, 0.3, 0, 3))
    assert seen[8:] == [pytest.approx(0.3)] * 4


def test_selection_runs_only_when_the_density_changes_and_changes_nothing_when_skipped() -> None:
    model = tiny_bert()
    names = target_names(model)[:3]
    steps, options = 16, dict(method="taylor", final_density=0.25, warmup_steps=4, cooldown_steps=5)
    pruner = Pruner(names, **options)
    selected: list[float] = []
    update = pruner._update_masks
    pruner._update_masks = lambda density: (selected.append(density), update(density))  # type: ignore[method-assign]
    run_loop(model, [pruner], steps)
    densities = [cubic_sparsity(step, steps, 0.25, 4, 5) for step in range(1, steps + 1)]
    assert selected == [d for i, d in enumerate(densities) if i == 0 or d != densities[i - 1]]
    # A selection at the held density, from the final scores, keeps exactly the held masks.
    held = pruner.masks()
    fresh = {n: topk_mask(s.masked_fill(~held[n], float("-inf")), 0.25) for n, s in pruner.scores().items()}
    assert all(torch.equal(fresh[n], held[n]) for n in names)


def test_save_load_round_trip(tmp_path) -> None:
    model = tiny_bert()
    names = target_names(model)
    pruner = Pruner(names, final_density=0.5, warmup_steps=1, cooldown_steps=1)
    run_loop(model, [pruner], 6)
    path = pruner.save(tmp_path / "pruning.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["pruning.safetensors"]
    masks, scores = load_pruning_state(path)
    assert all(torch.equal(masks[n], pruner.masks()[n]) for n in names)
    assert all(torch.equal(scores[n], pruner.scores()[n]) for n in names)

    resumed = Pruner(names, final_density=0.5, warmup_steps=1, cooldown_steps=1)
    resumed.load(path)
    fresh = tiny_bert()  # dense weights: loading must prune them at on_train_begin
    resumed.on_train_begin(fresh, 6)
    weight = dict(fresh.named_modules())[names[0]].weight
    assert not weight[~masks[names[0]]].any()
    assert resumed.density() == pytest.approx(pruner.density())
