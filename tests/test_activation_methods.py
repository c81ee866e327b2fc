"""ASVD, SVD-LLM, the input statistics they weigh by, and the rank search, against answers known in closed form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from conftest import GLUE_DIR, tiny_bert_config, tiny_params
from lowrank.config import load_params
from lowrank.linalg.solvers import get_solver
from lowrank.methods import get_method
from lowrank.modules.surgery import dense_weights
from lowrank.pipeline import Layout, get_stage, preflight
from lowrank.train.activations import ActivationRecorder
from lowrank.train.rank_search import BlockReplay, candidate_ranks, grid, measure, search_ranks, solve


def _factorize(method: str, weight: torch.Tensor, rank: int, importance: torch.Tensor | None = None, **options):
    """The method's function, called as compress_ calls it: its options object (defaults plus `options`)."""
    spec = get_method(method)
    return spec.fn(weight, rank, importance=importance, mask=None, options=spec.options(**options), solve=None)


def _inputs(tokens: int, features: int, correlated: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g, dtype=torch.float64)
    if correlated:  # a few strong directions, mixed into every feature
        x = x @ torch.diag(torch.logspace(1, -2, features, dtype=torch.float64)) @ torch.randn(features, features, generator=g, dtype=torch.float64)
    return x


def _output_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm((w - a @ b) @ x.T))


def test_svd_llm_minimises_the_output_error_on_correlated_inputs() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(24, 16, dtype=torch.float64), _inputs(4000, 16, correlated=True)
    gram = x.T @ x / x.shape[0]
    a_svd, b_svd = _factorize("svd", w, 4, None)
    a_llm, b_llm = _factorize("svd_llm", w, 4, gram, damp=0.0)
    assert _output_error(w, a_llm, b_llm, x) < 0.5 * _output_error(w, a_svd, b_svd, x)
    # the known optimum: the tail singular values of W S, S S^T = X^T X (Eckart-Young on the whitened matrix)
    tail = torch.linalg.svdvals(w @ torch.linalg.cholesky(x.T @ x))[4:]
    assert _output_error(w, a_llm, b_llm, x) == pytest.approx(float(tail.norm()), rel=1e-6)


def test_svd_llm_equals_svd_on_white_inputs_and_survives_a_singular_gram() -> None:
    torch.manual_seed(1)
    w = torch.randn(24, 16, dtype=torch.float64)
    a_svd, b_svd = _factorize("svd", w, 5, None)
    a_llm, b_llm = _factorize("svd_llm", w, 5, torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(a_llm @ b_llm, a_svd @ b_svd, rtol=1e-9, atol=1e-9)

    few = _inputs(3, 16, correlated=False)  # 3 tokens for 16 features, and one feature always zero: rank 3
    few[:, 7] = 0
    gram = few.T @ few / 3
    assert torch.linalg.cholesky_ex(gram)[1] != 0  # Cholesky alone fails here
    for damp in (0.0, 0.01):
        a, b = _factorize("svd_llm", w.float(), 5, gram.float(), damp=damp)
        assert torch.isfinite(a).all() and torch.isfinite(b).all() and a.dtype == torch.float32


def test_the_least_squares_update_recovers_what_heavy_damping_loses() -> None:
    torch.manual_seed(2)
    w, x = torch.randn(24, 16, dtype=torch.float64), _inputs(4000, 16, correlated=True, seed=2)
    gram = x.T @ x / x.shape[0]
    plain = _factorize("svd_llm", w, 4, gram, damp=1.0)
    updated = _factorize("svd_llm", w, 4, gram, damp=1.0, update=True)
    assert _output_error(w, *updated, x) < 0.9 * _output_error(w, *plain, x)


def test_asvd_at_alpha_zero_is_svd_and_otherwise_scales_columns() -> None:
    torch.manual_seed(3)
    w, scale = torch.randn(20, 12), torch.rand(12) + 0.1
    a, b = _factorize("asvd", w, 4, scale, alpha=0.0)
    a0, b0 = get_solver("truncated_svd")(w, 4)
    torch.testing.assert_close(a @ b, a0 @ b0, rtol=1e-5, atol=1e-5)
    a, b = _factorize("asvd", w, 4, scale, alpha=1.0)
    a1, b1 = get_solver("truncated_svd")(w.double() * scale.double(), 4)  # the SVD of W diag(s), s undone on B
    torch.testing.assert_close((a @ b).double(), a1 @ (b1 / scale.double()), rtol=1e-5, atol=1e-5)


def test_the_recorder_averages_over_real_tokens_only() -> None:
    layer = nn.Linear(4, 3)
    model = nn.ModuleDict({"layer": layer})
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    recorder = ActivationRecorder(model, ["layer"])
    layer(x)  # outside `counting`: not recorded
    with recorder.counting(mask):
        layer(x)
    recorder.remove()
    stats = recorder.results()
    real = x.reshape(-1, 4)[mask.reshape(-1).bool()].double().numpy()
    np.testing.assert_allclose(stats["abs_mean"]["layer"].numpy(), np.abs(real).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["gram"]["layer"].numpy(), real.T @ real / 8, rtol=1e-5)
    assert recorder.rows == {"layer": 8}


def test_a_layer_used_twice_averages_over_both_uses() -> None:
    """ALBERT runs one shared layer in every block: its statistics are the mean over all of its inputs."""
    layer = nn.Linear(3, 3)
    model = nn.ModuleDict({"layer": layer})
    x = torch.randn(1, 4, 3)
    recorder = ActivationRecorder(model, ["layer"])
    with recorder.counting(torch.ones(1, 4)):
        layer(layer(x))
    recorder.remove()
    both = torch.cat([x, layer(x)], dim=1).reshape(-1, 3).double().detach()
    torch.testing.assert_close(recorder.results()["gram"]["layer"].double(), both.T @ both / 8, rtol=1e-5, atol=1e-6)
    assert recorder.rows == {"layer": 8}


def test_solve_spends_exactly_the_budget_on_what_hurts_most() -> None:
    ranks = {"a": list(range(1, 11)), "b": list(range(1, 11))}
    costs = {n: [r * 10 for r in ranks[n]] for n in ranks}
    losses = {"a": np.array([100.0 / r for r in ranks["a"]]), "b": np.array([1.0 / r for r in ranks["b"]])}
    chosen = solve(costs, losses, ranks, budget=100)
    assert sum(chosen[n] * 10 for n in chosen) == 100 and chosen["a"] > chosen["b"]


class _TwoLayers(nn.Module):
    """y = L2(L1 x): L1 full rank (every direction matters), L2 nearly rank 2 (truncating it costs little)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.first, self.second = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
        self.first.weight.data = 3 * q
        low = torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)
        self.second.weight.data = low + 0.01 * torch.randn(16, 16, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_the_search_gives_the_sensitive_layer_the_larger_rank_at_exactly_the_uniform_size() -> None:
    model = _TwoLayers()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    target = model(x).detach()
    loss_fn = lambda m: float(((m(x) - target) ** 2).mean())  # noqa: E731
    shapes = {"first": (16, 16), "second": (16, 16)}
    uniform = {"first": 4, "second": 4}
    weights = {n: dict(model.named_modules())[n].weight.detach().clone() for n in shapes}
    ranks, report = search_ranks(
        model, uniform, shapes, lambda n, r: get_solver("truncated_svd")(weights[n], r), loss_fn,
        min_share=0.5, max_share=2.0, points=4, multiple=1,
    )
    assert sum(r * 32 for r in ranks.values()) == sum(r * 32 for r in uniform.values())
    assert ranks["first"] > ranks["second"] >= 2  # the floor: half the uniform rank
    assert report["search_increase_chosen"] < report["search_increase_uniform"]
    assert candidate_ranks((16, 16), 4, 0.5, 2.0, 1) == [2, 3, 4, 5, 6, 7]  # 8 would hold as much as the dense 16 x 16
    torch.testing.assert_close(model.first.weight, weights["first"])  # measuring left the model as it was


def test_the_search_warns_when_factorizing_lowers_the_calibration_loss() -> None:
    # The loss is the output's energy, which truncating the SVD can only lower: every measured rise is negative.
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    loss_fn = lambda m: float((m(x) ** 2).mean())  # noqa: E731
    weight = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="predicted loss rise at the chosen ranks is below zero"):
        _, report = search_ranks(
            model, {"0": 4}, {"0": (16, 16)}, lambda n, r: get_solver("truncated_svd")(weight, r), loss_fn,
            min_share=0.5, max_share=2.0, points=3, multiple=1,
        )
    assert report["search_increase_chosen"] < 0


def test_replaying_the_blocks_before_a_matrix_measures_what_the_full_forward_does() -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_bert_config()).eval()
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(5, model.config.vocab_size, (4, 9), generator=g), "attention_mask": torch.ones(4, 9, dtype=torch.long),
                "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(3)]
    batches[1]["attention_mask"][:, 6:] = 0  # padding: the blocks get the mask they would get
    loss_fn = lambda m: sum(float(m(**b).loss) for b in batches) / len(batches)  # noqa: E731
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in n]
    weights = {n: dict(model.named_modules())[n].weight.detach().clone() for n in names}
    grids = {n: [2, 4] for n in names}
    factorize = lambda n, r: get_solver("truncated_svd")(weights[n], r)  # noqa: E731
    calls = []
    for block in model.bert.encoder.layer:
        block.attention.register_forward_pre_hook(lambda m, a: calls.append(1))  # runs only when the block computes
    full_base, full = measure(model, names, grids, factorize, loss_fn, replay=False)
    full_calls, calls[:] = len(calls), []
    base, replayed = measure(model, names, grids, factorize, loss_fn)
    assert base == full_base and replayed == full  # the same floats: the replayed outputs are the ones computed
    blocks = len(model.bert.encoder.layer)
    per_block = len(names) // blocks * len(grids[names[0]]) * len(batches)  # calls per block index of a full forward
    assert full_calls == (1 + len(names) * 2) * len(batches) * blocks
    assert len(calls) == len(batches) * blocks + sum(per_block * (blocks - i) for i in range(blocks))  # blocks before: skipped
    assert BlockReplay(model, ["classifier"]).index("classifier") == 0  # outside the blocks: nothing skipped
    torch.testing.assert_close(model.bert.encoder.layer[1].attention.self.query.weight, weights["bert.encoder.layer.1.attention.self.query"])


def test_the_grid_keeps_both_ends_and_puts_the_uniform_rank_in_place_of_the_nearest_inner_point() -> None:
    candidates = list(range(2, 17))
    assert grid(candidates, 8, 3) == [2, 8, 16]  # not the middle candidate 9
    assert grid(candidates, 8, 4) == [2, 8, 11, 16]  # 7 was the inner point nearest 8
    assert len(grid(candidates, 8, 5)) == 5 and 8 in grid(candidates, 8, 5)
    assert grid(candidates, 16, 3) == [2, 9, 16]  # the uniform rank at an end: the inner point stays
    assert grid([3, 4], 4, 3) == [3, 4]


@pytest.mark.parametrize("method", ["svd", "fwsvd", "asvd", "svd_llm"])
def test_a_nested_method_factorized_once_measures_what_factorizing_at_every_rank_does(method: str) -> None:
    model = _TwoLayers()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated inputs: whitening matters
    target = model(x).detach()
    loss_fn = lambda m: float(((m(x) - target) ** 2).mean())  # noqa: E731
    weights = dense_weights(model, ["first", "second"])  # views of the model's weights, as compress_ passes them
    before = {n: w.clone() for n, w in weights.items()}
    importance = {"svd": None, "fwsvd": torch.rand(16, 16, generator=g) + 0.1, "asvd": x.abs().mean(0), "svd_llm": x.T @ x}[method]
    spec = get_method(method)
    calls = []
    factorize = lambda n, r: calls.append(r) or _factorize(method, weights[n], r, importance)  # noqa: E731
    grids = {"first": [2, 4, 7], "second": [2, 5, 7]}
    _, each = measure(model, list(grids), grids, factorize, loss_fn, nested=False)
    calls[:] = []
    _, once = measure(model, list(grids), grids, factorize, loss_fn, nested=True)
    assert calls == [7, 7]  # one factorization per matrix, at its largest grid rank
    for name in grids:
        assert once[name] == pytest.approx(each[name], rel=1e-4, abs=1e-7)
    assert once["first"][2] > once["first"][7] > 0  # a real measurement: truncating more costs more
    assert each["first"][2] > each["first"][7]  # the first search wrote the trial weights into the tensor it factorized
    assert all(torch.equal(weights[n], before[n]) for n in weights)
    assert spec.is_nested(spec.options())
    svd_llm = get_method("svd_llm")
    assert not svd_llm.is_nested(svd_llm.options(update=True)) and not get_method("tfwsvd").is_nested(get_method("tfwsvd").options())


@pytest.mark.parametrize("method", ["asvd", "svd_llm"])
def test_the_new_methods_and_the_search_run_through_the_stages(tmp_path: Path, tiny_model_dir: Path, method: str) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    params = load_params(tiny_params(
        tmp_path, tiny_model_dir, GLUE_DIR, factorize={"method": method, "keep_ratio": 0.5, "allocation": "search", "search_samples": 16},
        evaluate={"latency": False},
    ))
    preflight(params)
    for name in ("prepare", "finetune", "fisher", "factorize", "evaluate_factorized"):
        result = get_stage(name).run(params)
    layout = Layout.from_params(params)
    assert {p.name for p in layout.output("fisher", "importance").iterdir()} >= {"abs_mean.safetensors", "gram.safetensors"}
    factorize = json.loads((tmp_path / "metrics" / "factorize.json").read_text())
    uniform = lowrank.api.allocate_ranks({r["layer"]: tuple(r["shape"]) for r in factorize["layers"]}, 0.5, "uniform", 1)
    spent = sum(r["rank"] * sum(r["shape"]) for r in factorize["layers"])
    assert spent == sum(uniform[r["layer"]] * sum(r["shape"]) for r in factorize["layers"])  # exactly the uniform size
    assert factorize["search_evaluations"] >= 12 * 2 and factorize["search_solve_seconds"] >= 0
    assert 0 <= result.metrics["task.score"] <= 1
