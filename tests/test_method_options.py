"""A method owns its options: declared beside it, checked at load against the chosen method, handed to its function."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import lowrank
from lowrank.train.importance import load_importance
from conftest import GLUE_DIR, REPO, tiny_bert_config, tiny_params
from lowrank.config import ConfigError, FactorizeConfig, load_params
from lowrank.methods import get_method, register_method, unregister_method
from lowrank.modules.layers import FactorizedLinear
from lowrank.pipeline import Layout, get_stage, preflight


def tiny_bert() -> nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


def _abs_mean(model: nn.Module) -> dict[str, torch.Tensor]:
    """A stand-in for the fisher stage's mean |x| per input feature of every targeted layer."""
    g = torch.Generator().manual_seed(1)
    return {name: torch.rand(m.in_features, generator=g) + 0.1 for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".encoder." in name}


def _product(model: nn.Module, name: str) -> torch.Tensor:
    layer = dict(model.named_modules())[name]
    return layer.up.weight @ layer.down.weight


@dataclass(frozen=True)
class ToyOptions:
    scale: float = 1.0
    flip: bool = False


@pytest.fixture()
def toy_scaled():
    """A method with options of its own: truncated SVD of `scale * W` (negated with `flip`); records what it got."""
    seen: list = []

    @register_method("toy_scaled", importance="none", solver="truncated_svd", paths=("factorize",), options=ToyOptions)
    def scaled(weight, rank, *, importance, mask, options: ToyOptions, solve):
        seen.append(options)
        u, s, vh = torch.linalg.svd(weight * options.scale * (-1 if options.flip else 1), full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]

    yield seen
    unregister_method("toy_scaled")


def test_a_registered_toy_method_gets_its_options_through_compress(toy_scaled) -> None:
    name = "bert.encoder.layer.0.attention.self.query"
    model = tiny_bert()
    weight = dict(model.named_modules())[name].weight.detach().clone()
    lowrank.compress_(model, method="toy_scaled", keep_ratio=0.5)
    assert toy_scaled and all(o == ToyOptions() for o in toy_scaled)  # the defaults, one object per call
    scaled = tiny_bert()
    toy_scaled.clear()
    lowrank.compress_(scaled, FactorizeConfig(method="toy_scaled", options={"scale": 2.0}), keep_ratio=0.5)
    assert toy_scaled[0] == ToyOptions(scale=2.0)
    torch.testing.assert_close(_product(scaled, name), 2 * _product(model, name), rtol=1e-4, atol=1e-5)
    toy_scaled.clear()
    lowrank.compress_(tiny_bert(), method="toy_scaled", options=ToyOptions(flip=True))  # the object itself works too
    assert toy_scaled[0] == ToyOptions(flip=True)
    assert _product(model, name).shape == weight.shape
    with pytest.raises(ConfigError, match=r"^factorize\.options\.scal: method toy_scaled has no such option \(its options: scale, flip\)$"):
        lowrank.compress_(tiny_bert(), method="toy_scaled", options={"scal": 2.0})
    with pytest.raises(ConfigError, match=r"^factorize\.options\.flip: expected true or false, got 'yes'$"):
        lowrank.compress_(tiny_bert(), method="toy_scaled", options={"flip": "yes"})


def test_an_override_of_factorize_options_reaches_asvd() -> None:
    params = load_params(REPO / "params.yaml", ["factorize.method=asvd", "factorize.options.alpha=0.25"])
    assert params.factorize.method_options() == get_method("asvd").options(alpha=0.25)
    assert load_params(REPO / "params.yaml", ["factorize.method=asvd"]).factorize.method_options().alpha == 0.5  # the default
    name = "bert.encoder.layer.1.output.dense"
    models = {}
    for label, config in (("override", params.factorize), ("alpha", FactorizeConfig(method="asvd", options={"alpha": 0.25})),
                          ("default", FactorizeConfig(method="asvd"))):
        models[label] = tiny_bert()
        lowrank.compress_(models[label], config, importance=_abs_mean(models[label]))
    torch.testing.assert_close(_product(models["override"], name), _product(models["alpha"], name))
    assert not torch.allclose(_product(models["override"], name), _product(models["default"], name))


@pytest.mark.parametrize(("old", "new", "method"), [
    ("asvd_alpha=0.3", "factorize.options.alpha", "asvd"),
    ("whitening_damp=0.1", "factorize.options.damp", "svd_llm"),
    ("whitening_update=true", "factorize.options.update", "svd_llm"),
    ("sparse_importance=scores", "factorize.options.importance", "sparse_svd, sparse_tfwsvd"),
    ("pruned_weight=0.0", "factorize.options.pruned_weight", "sparse_svd, sparse_tfwsvd"),
])
def test_the_old_flat_keys_fail_with_one_line_naming_the_new_place(tmp_path: Path, old: str, new: str, method: str) -> None:
    key, value = old.split("=")
    hint = rf"^factorize\.{key} moved: use {new} \(methods? {method}\)$"
    with pytest.raises(ConfigError, match=hint):
        load_params(REPO / "params.yaml", [f"factorize.{old}"])
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["factorize"][key] = yaml.safe_load(value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=hint):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match=hint):
        lowrank.compress_(tiny_bert(), **{key: yaml.safe_load(value)})


def test_options_are_checked_against_the_chosen_method_at_load() -> None:
    with pytest.raises(ConfigError, match=r"^factorize\.options\.beta: method asvd has no such option \(its options: alpha\)$"):
        load_params(REPO / "params.yaml", ["factorize.method=asvd", "factorize.options.beta=1"])
    with pytest.raises(ConfigError, match=r"^factorize\.options\.alpha: method fwsvd has no such option \(its options: none\)$"):
        load_params(REPO / "params.yaml", ["factorize.method=fwsvd", "factorize.options.alpha=1"])
    with pytest.raises(ConfigError, match=r"^factorize\.options\.alpha: expected a number, got 'high'$"):
        load_params(REPO / "params.yaml", ["factorize.method=asvd", "factorize.options.alpha=high"])
    with pytest.raises(ConfigError, match=r"^factorize\.options\.damp: must be >= 0, got -1\.0$"):
        load_params(REPO / "params.yaml", ["factorize.method=svd_llm", "factorize.options.damp=-1"])
    with pytest.raises(ConfigError, match=r"^factorize\.options\.importance: must be one of 'fisher', 'scores', got 'taylor'$"):
        load_params(REPO / "params.yaml", ["orchestration.path=lpaf", "factorize.method=sparse_tfwsvd", "factorize.options.importance=taylor"])
    lpaf = load_params(REPO / "params.yaml", ["orchestration.path=lpaf", "factorize.method=sparse_svd", "factorize.options.pruned_weight=0"])
    assert lpaf.factorize.method_options() == get_method("sparse_svd").options(importance="fisher", pruned_weight=0.0)


def test_compress_takes_a_config_and_checks_its_overrides() -> None:
    with pytest.raises(TypeError, match="config: expected a FactorizeConfig"):
        lowrank.compress_(tiny_bert(), "svd")
    with pytest.raises(ConfigError, match=r"^factorize\.keep_ratio: expected a number, got 'half'$"):
        lowrank.compress_(tiny_bert(), method="svd", keep_ratio="half")
    with pytest.raises(ConfigError, match="unknown key factorize.ratio"):
        lowrank.compress_(tiny_bert(), method="svd", ratio=0.5)
    with pytest.raises(ValueError, match="filter_fn: it accepts none"):
        lowrank.compress_(tiny_bert(), method="svd", filter_fn=lambda name, module: False)
    model = tiny_bert()
    report = lowrank.compress_(model, FactorizeConfig(method="svd", keep_ratio=0.9), keep_ratio=0.5,
                               filter_fn=lambda name, module: name.endswith("query") and isinstance(module, nn.Linear))
    assert report.keep_ratio_target == 0.5 and len(report.layers) == 2  # one query per block
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == 2
    assert dataclasses.fields(FactorizeConfig)  # the defaults: one place, the dataclass
    assert lowrank.compress_(tiny_bert(), method="svd").keep_ratio_target == FactorizeConfig().keep_ratio


def test_compress_with_config_overrides_and_filter_fn_equals_the_factorize_stage(tmp_path: Path, tiny_model_dir: Path) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    params = load_params(tiny_params(
        tmp_path, tiny_model_dir, GLUE_DIR,
        factorize={"method": "tfwsvd", "keep_ratio": 0.4, "solver_steps": 2, "exclude": r".*\.attention\..*"},
    ))
    preflight(params)
    for name in ("prepare", "finetune", "fisher", "factorize"):
        get_stage(name).run(params)
    layout = Layout.from_params(params)
    staged = lowrank.load_compressed(layout.output("factorize"))
    model = lowrank.load_compressed(layout.output("finetune"))
    fisher = load_importance(layout.output("fisher", "importance") / "fisher.safetensors")
    report = lowrank.compress_(
        model, FactorizeConfig(method="tfwsvd", solver_steps=2), keep_ratio=0.4, importance=fisher,
        filter_fn=lambda name, module: ".attention." not in name,
    )
    assert len(report.layers) == 4 and all(".intermediate." in r["layer"] or ".output." in r["layer"] for r in report.layers)
    factorized = {n: m for n, m in staged.named_modules() if isinstance(m, FactorizedLinear)}
    assert set(factorized) == {r["layer"] for r in report.layers}
    for name in factorized:
        torch.testing.assert_close(_product(model, name), _product(staged, name))
