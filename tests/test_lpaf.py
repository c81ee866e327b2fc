"""LPAF end to end on a tiny BERT: prune -> factorize_pruned -> mrft, through the library's stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import GLUE_DIR, REPO, tiny_params
from lowrank.io.checkpoints import layer_ranks, load_compressed, save_compressed
from lowrank.config import ConfigError, load_params
from lowrank.linalg.solvers import get_solver
from lowrank.methods import get_method
from lowrank.methods.sparse import SparseOptions
from lowrank.modules.mixed_rank import MixedRankLinear
from lowrank.train.pruning import kept_count, load_pruning_state
from lowrank.linalg.ranks import allocate_ranks
from lowrank.pipeline import STAGES, Layout, PreparedData, StageResult, get_stage, pipeline, preflight
from lowrank.modules.surgery import dense_weights

KEEP_RATIO = 0.4
LPAF_SECTIONS = {
    "orchestration": {"path": "lpaf"},
    "factorize": {"method": "sparse_tfwsvd", "keep_ratio": KEEP_RATIO, "solver_steps": 10},
    "prune": {
        "warmup_ratio": 0.0,
        "cooldown_ratio": 0.2,
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3},
        "distill": {"enabled": True},
    },
    "mrft": {"p0": 0.3, "ramp_share": 0.5, "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3}},
    "evaluate": {"latency": False},  # latency is test_pipeline's
}


def run_prune_into(params, layout: Layout, cfg, out: Path) -> StageResult:
    """The prune stage with section `cfg`, reading the run's inputs and writing under `out`."""
    st = get_stage("prune")
    io = dataclasses.replace(
        st.io(layout), outputs={"model": out / "model", "masks": out / "masks.safetensors"},
        plots={"ranks": out / "ranks.png"}, reports={"ranks": out / "ranks.json"}, metrics=out.with_suffix(".json"),
    )
    return st.fn(dataclasses.replace(params, prune=cfg), io)


@pytest.fixture(scope="module")
def lpaf_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """The whole lpaf path, run once for the module: (params, layout, results by stage)."""
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    root = tmp_path_factory.mktemp("lpaf")
    params = load_params(tiny_params(root, tiny_model_dir, GLUE_DIR, **LPAF_SECTIONS))
    preflight(params)
    layout = Layout.from_params(params)
    results = {name: get_stage(name).run(params, layout) for name in pipeline(params)}
    return params, layout, results


def test_lpaf_path_is_registered_and_ordered(lpaf_run) -> None:
    params, layout, results = lpaf_run
    names = pipeline(params)
    assert names == [
        "prepare", "finetune", "evaluate_dense", "prune", "factorize_pruned", "evaluate_pruned_factorized",
        "mrft", "evaluate_lpaf", "summary_lpaf",
    ]
    for position, name in enumerate(names):
        assert all(names.index(before) < position for before in STAGES[name].after), name
        for path in STAGES[name].written_paths(layout).values():
            assert Path(path).exists(), f"{name} did not write {path}"
    assert not list(layout.artifacts.rglob("*.tmp-*")), "a temporary artifact was left behind"


def test_pruned_model_has_exact_density_on_every_target(lpaf_run) -> None:
    params, layout, results = lpaf_run
    model = load_compressed(layout.output("prune"))
    masks, scores = load_pruning_state(layout.output("prune", "masks"))
    assert len(masks) == 12  # 2 blocks x (Q, K, V, attention output, FFN in, FFN out)
    for name, weight in dense_weights(model, list(masks)).items():
        expected = kept_count(weight.numel(), KEEP_RATIO)  # final_density null: factorize.keep_ratio
        assert int(masks[name].sum()) == expected, name
        assert int((weight != 0).sum()) == expected, name
        assert torch.all(weight[~masks[name]] == 0), name
        assert scores[name].shape == weight.shape
    metrics = results["prune"].metrics
    assert metrics["density"] == pytest.approx(KEEP_RATIO, abs=1e-3)
    assert metrics["steps"] == 6 and metrics["cooldown_steps"] == 1
    for label in ("dense", "magnitude_one_shot", params.prune.method):
        assert 0 < metrics[f"rank_ratio.{label}.effective_rank_0.9_ratio"] <= 1
    report = json.loads((layout.metrics / "prune_ranks.json").read_text())
    assert set(report["models"]) == {"dense", "magnitude_one_shot", params.prune.method}
    assert (layout.metrics / "prune_ranks.png").stat().st_size > 0


def test_factorize_pruned_ranks_match_allocation(lpaf_run) -> None:
    params, layout, results = lpaf_run
    pruned = load_compressed(layout.output("prune"))
    masks, _ = load_pruning_state(layout.output("prune", "masks"))
    shapes = {name: tuple(w.shape) for name, w in dense_weights(pruned, list(masks)).items()}
    expected = {n: r for n, r in allocate_ranks(shapes, KEEP_RATIO, "uniform").items() if r is not None}
    model = load_compressed(layout.output("factorize_pruned"))
    assert expected and layer_ranks(model) == expected
    assert model.config.lowrank["method"] == "sparse_tfwsvd"
    copied, _ = load_pruning_state(layout.output("factorize_pruned", "masks"))
    assert all(torch.equal(copied[n], masks[n]) for n in masks)
    assert results["factorize_pruned"].metrics["keep_ratio_reached"] <= KEEP_RATIO


def test_mrft_output_holds_only_factors_and_reloads_exactly(lpaf_run, tmp_path: Path) -> None:
    params, layout, results = lpaf_run
    folder = layout.output("mrft")
    model = load_compressed(folder)
    assert not any(isinstance(m, MixedRankLinear) for m in model.modules())
    keys = set(load_file(str(folder / "model.safetensors")))
    assert not any("mask" in k for k in keys)
    ranks = layer_ranks(model)
    assert ranks == layer_ranks(load_compressed(layout.output("factorize_pruned")))
    assert all(f"{name}.weight" not in keys for name in ranks)  # no sparse matrix left beside the factors
    assert model.config.lowrank["method"] == "lpaf"

    batch = next(iter(PreparedData.open(layout.output("prepare", "data")).loader("validation", 8)))
    with torch.no_grad():
        logits = model(**batch).logits
        save_compressed(model, tmp_path / "again", method="lpaf", targets=list(model.config.lowrank["ranks"]))
        assert torch.equal(load_compressed(tmp_path / "again")(**batch).logits, logits)
        assert torch.equal(load_compressed(folder)(**batch).logits, logits)
    # The saved model is the one mrft evaluated last (its best epoch), on the selection split.
    selected = PreparedData.open(layout.output("prepare", "data")).select_fn(64)(model)["score"]
    assert selected == pytest.approx(results["mrft"].metrics["score"])


def test_prune_variants_magnitude_global_from_pretrained(lpaf_run, tmp_path: Path) -> None:
    params, layout, _ = lpaf_run
    cfg = dataclasses.replace(
        params.prune, method="magnitude", scope="global", start_from="pretrained", final_density=0.25,
        rank_energies=[], distill=dataclasses.replace(params.prune.distill, enabled=False),
        train=dataclasses.replace(params.prune.train, epochs=1.0, eval_every_epoch=False),
    )
    result = run_prune_into(params, layout, cfg, tmp_path / "prune")
    masks, _ = load_pruning_state(tmp_path / "prune" / "masks.safetensors")
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == kept_count(total, 0.25)
    assert "rank_ratio.dense.stable_rank_ratio" not in result.metrics


def test_rank_pull_leaves_less_beyond_the_factor_rank(lpaf_run, tmp_path: Path) -> None:
    """The same pruning run with the pull ends closer to the ranks the factorization will use, masks intact."""
    params, layout, _ = lpaf_run
    base = dataclasses.replace(
        params.prune, final_density=0.5, rank_energies=[], distill=dataclasses.replace(params.prune.distill, enabled=False),
        train=dataclasses.replace(params.prune.train, epochs=1.0, eval_every_epoch=False),
    )
    tails = {}
    for pull in (0.0, 3.0):
        out = tmp_path / f"prune-{pull}"
        result = run_prune_into(params, layout, dataclasses.replace(base, rank_pull=pull, rank_pull_every=2), out)
        tails[pull] = result.metrics["tail_share"]
        masks, _ = load_pruning_state(out / "masks.safetensors")
        assert sum(int(m.sum()) for m in masks.values()) == kept_count(sum(m.numel() for m in masks.values()), 0.5)
    assert result.metrics["tail_share_dense"] > 0
    assert tails[3.0] < 0.6 * tails[0.0]


def test_prune_schedule_longer_than_training_names_the_key(lpaf_run, tmp_path: Path) -> None:
    params, layout, _ = lpaf_run
    cfg = dataclasses.replace(params.prune, warmup_steps=5, cooldown_steps=2)  # 6 steps in 2 epochs
    with pytest.raises(ConfigError, match=r"prune\.warmup_steps \+ prune\.cooldown_steps"):
        run_prune_into(params, layout, cfg, tmp_path / "prune")
    assert not (tmp_path / "prune").exists()


def test_factorize_pruned_refuses_dense_methods(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml", [f"paths.artifacts={tmp_path}", f"paths.metrics={tmp_path}"])  # fwsvd
    with pytest.raises(ConfigError, match=r"factorize\.method"):
        get_stage("factorize_pruned").run(params)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["prune.final_density=0"], "prune.final_density"),
        (["prune.final_density=1.5"], "prune.final_density"),
        (["prune.density_factor=0.5"], "prune.density_factor"),
        (["prune.warmup_ratio=0.7", "prune.cooldown_ratio=0.4"], "prune.warmup_ratio + prune.cooldown_ratio"),
        (
            ["prune.warmup_steps=8", "prune.cooldown_steps=3", "prune.train.max_steps=10"],
            "prune.warmup_steps + prune.cooldown_steps",
        ),
        (["prune.train.lr=0"], "prune.train.lr"),
        (["prune.method=random"], "prune.method"),
        (["prune.rank_pull=-1"], "prune.rank_pull"),
        (["prune.rank_pull_every=0"], "prune.rank_pull_every"),
        (["mrft.p0=1.5"], "mrft.p0"),
        (["mrft.distill.temperature=0"], "mrft.distill.temperature"),
        (["factorize.method=sparse_svd"], "factorize.method"),  # the factorize path (default)
        (["factorize.method=sparse_tfwsvd", "orchestration.path=dense"], "factorize.method"),
        (["orchestration.path=lpaf"], "factorize.method"),  # fwsvd cannot factorize pruned matrices
        (["orchestration.path=lpaf", "factorize.method=svd", "factorize.allocation=fisher"], "factorize.allocation"),
    ],
)
def test_lpaf_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("+", r"\+")):
        load_params(REPO / "params.yaml", overrides)


@pytest.mark.parametrize("method", ["svd", "sparse_svd", "sparse_tfwsvd"])
def test_lpaf_path_accepts_its_methods(method: str) -> None:
    params = load_params(REPO / "params.yaml", ["orchestration.path=lpaf", f"factorize.method={method}"])
    assert params.factorize.method == method
    assert params.prune.density(params.factorize.keep_ratio) == params.factorize.keep_ratio


def test_sparse_tfwsvd_recovers_low_rank_kept_entries_better_than_svd() -> None:
    generator = torch.Generator().manual_seed(0)
    rows, cols, rank = 40, 30, 4
    low_rank = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    mask = torch.rand(rows, cols, generator=generator) < 0.5
    weight = low_rank * mask  # exactly rank 4 on its kept entries, not as a whole

    def kept_error(method: str) -> float:
        spec = get_method(method)
        options = spec.options(pruned_weight=0.0) if spec.options is SparseOptions else spec.options()
        solve = lambda w, r, *, importance: get_solver("als")(w, r, importance=importance, steps=200)  # noqa: E731  factorize.solver
        a, b = spec.fn(weight * mask, rank, importance=None, mask=mask, options=options, solve=solve)
        return float(((a @ b - low_rank)[mask]).square().mean() / low_rank[mask].square().mean())

    element_wise, plain = kept_error("sparse_tfwsvd"), kept_error("svd")
    assert element_wise < 1e-4
    assert plain > 0.1
    assert kept_error("sparse_svd") < 1.0  # the closed form is a start, not exact


@pytest.mark.parametrize(
    ("overrides", "keep_ratio", "density"),
    [
        (["prune.density_factor=1"], 0.15, 0.15),
        (["prune.density_factor=2"], 0.15, 0.3),
        (["prune.density_factor=3"], 0.5, 1.0),  # capped: a density above 1 is no pruning
        (["prune.density_factor=2", "prune.final_density=0.4"], 0.15, 0.4),  # an explicit density wins
    ],
)
def test_pruning_density_follows_the_keep_ratio(overrides: list[str], keep_ratio: float, density: float) -> None:
    prune = load_params(REPO / "params.yaml", ["orchestration.path=lpaf", "factorize.method=sparse_tfwsvd", *overrides]).prune
    assert prune.density(keep_ratio) == pytest.approx(density)
