"""params.yaml validation: bad keys and values fail at once, naming the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lowrank.config import ConfigError, Params, apply_overrides, build, flatten, load_params

REPO = Path(__file__).resolve().parents[1]


def test_project_params_file_is_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.data.task == "sst2"
    assert params.finetune.lr == pytest.approx(5e-5)


def test_overrides_use_dvc_form() -> None:
    params = load_params(REPO / "params.yaml", ["finetune.lr=3e-5", "data.task=mrpc", "data.max_train_samples=null"])
    assert params.finetune.lr == pytest.approx(3e-5)
    assert params.data.task == "mrpc"
    assert params.data.max_train_samples is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.lrr=1", "unknown key finetune.lrr"),
        ("bogus.x=1", "unknown key bogus"),
        ("finetune.epochs=0", "finetune.epochs"),
        ("finetune.batch_size=abc", "finetune.batch_size"),
        ("finetune.batch_size=2.5", "finetune.batch_size"),
        ("factorize.keep_ratio=0", "factorize.keep_ratio"),
        ("factorize.keep_ratio=1.5", "factorize.keep_ratio"),
        ("factorize.method=qr", "factorize.method"),
        ("data.max_train_samples=-3", "data.max_train_samples"),
        ("data.task=custom", "data.custom"),
        ("evaluate.latency_batch_sizes=[0]", "evaluate.latency_batch_sizes"),
        ("evaluate.latency_runtimes=[tensorrt]", "evaluate.latency_runtimes"),
        ("evaluate.latency_runtimes=[]", "evaluate.latency_runtimes"),
        ("tracking.enabled=yes please", "tracking.enabled"),
        ("finetune=3", "finetune"),
        ("prune.method=random", "prune.method"),
        ("prune.taylor_beta=1", "prune.taylor_beta"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_params(REPO / "params.yaml", [override])


def test_override_needs_equals_sign() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["finetune.lr"])


def test_missing_params_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_custom_data_section_is_typed() -> None:
    raw = {"data": {"task": "custom", "custom": {"train_file": "a.csv", "eval_file": "b.csv", "text_a": "t", "label": "y"}}}
    params = build(Params, raw)
    assert params.data.custom.label_names is None
    with pytest.raises(ConfigError, match="data.custom.colour"):
        build(Params, {"data": {"task": "custom", "custom": {**raw["data"]["custom"], "colour": 1}}})


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(build(Params, {}))
    assert flat["finetune.lr"] == pytest.approx(5e-5)  # the shipped value: params.yaml repeats it, no second default
    assert flat["factorize.keep_ratio"] == 0.5


def test_the_train_section_is_every_training_run_s_default() -> None:
    params = load_params(REPO / "params.yaml", ["train.lr=1e-4", "finetune.lr=3e-5", "prune.train.seed=7"])
    assert params.finetune.lr == 3e-5  # a section's own key wins
    assert params.finetune_compressed.lr == params.prune.train.lr == params.mrft.train.lr == 1e-4
    assert params.prune.train.seed == 7 and params.mrft.train.seed == 42
    assert params.mrft.train.epochs == 2 and params.finetune.epochs == 3  # mrft overrides epochs in params.yaml


def test_a_bad_train_key_is_named_as_written() -> None:
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr"):
        load_params(REPO / "params.yaml", ["train.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"train\.lr: must be positive"):
        load_params(REPO / "params.yaml", ["train.lr=0"])


def test_the_json_schema_covers_every_section() -> None:
    from lowrank.config import params_schema

    schema = params_schema()
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(Params)}
    assert "lr" in schema["$defs"]["TrainConfig"]["properties"]
    committed = json.loads((REPO / "params.schema.json").read_text())
    assert committed == schema, "run `lowrank schema > params.schema.json`"
