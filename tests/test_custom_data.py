"""A user's own CSV with the least said: nested `-S` keys, one file split for them, labels read from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowrank.config import ConfigError, load_params
from lowrank.config.loading import apply_overrides
from lowrank.data.loading import load_raw, resolve_task
from lowrank.data.catalog import DataError
from lowrank.pipeline.common import warn_if_trivial

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "fun", "flat"]


def _csv(path: Path, labels: list[str]) -> Path:
    path.write_text("text,label\n" + "".join(f"{WORDS[i % 10]} film {i},{label}\n" for i, label in enumerate(labels)))
    return path


def _params(tmp_path: Path, *overrides: str):
    (tmp_path / "params.yaml").write_text("data:\n  task: sst2\n  custom: null\n")
    return load_params(tmp_path / "params.yaml", ["data.task=custom", *overrides])


def test_nested_overrides_fill_a_null_section() -> None:
    raw = apply_overrides({"data": {"custom": None}}, ["data.custom.train_file=a.csv", "data.custom.text_a=text"])
    assert raw == {"data": {"custom": {"train_file": "a.csv", "text_a": "text"}}}
    with pytest.raises(ConfigError, match="data is not a section"):
        apply_overrides({"data": 3}, ["data.custom.train_file=a.csv"])


def test_one_file_splits_by_a_seeded_share(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = _csv(tmp_path / "train.csv", ["positive", "negative"] * 25)
    params = _params(tmp_path, f"data.custom.train_file={train}", "data.custom.text_a=text", "data.custom.label=label")
    spec = resolve_task(params.data)
    assert spec.label_names == ("negative", "positive") and spec.eval_from_train == 0.2
    said = capsys.readouterr().err
    assert "a seeded 20% of" in said and "labels from" in said and "negative, positive" in said

    raw = load_raw(spec, seed=7, validation=(0.1, 1000))
    texts = {split: set(raw[split]["text_a"]) for split in raw}
    assert len(texts["validation"]) == 10  # 20% of 50
    assert len(texts["select"]) == 4 and len(texts["train"]) == 36  # 10% of the 40 left, then the rest
    assert not texts["validation"] & texts["train"] and not texts["select"] & texts["train"]
    assert texts == {split: set(ds["text_a"]) for split, ds in load_raw(spec, seed=7, validation=(0.1, 1000)).items()}
    assert texts["validation"] != set(load_raw(spec, seed=8, validation=(0.1, 1000))["validation"]["text_a"])


@pytest.mark.parametrize(
    ("labels", "regression", "expected"),
    [
        (["0.5", "3", "4.25"], None, None),  # every label a number: a regression, said
        (["10", "2", "2"], False, ("2", "10")),  # asked for classes: sorted as numbers
        (["pos", "neg"], True, None),  # asked for a regression: the labels are not read
        (["b", "a", "c"], None, ("a", "b", "c")),
    ],
)
def test_labels_from_the_train_file(tmp_path: Path, labels, regression, expected) -> None:
    train = _csv(tmp_path / "train.csv", labels)
    overrides = [f"data.custom.train_file={train}", f"data.custom.eval_file={train}", "data.custom.text_a=text", "data.custom.label=label"]
    if regression is not None:
        overrides.append(f"data.custom.regression={str(regression).lower()}")
    spec = resolve_task(_params(tmp_path, *overrides).data)
    assert spec.label_names == expected and spec.eval_from_train is None
    assert spec.metrics == (("accuracy",) if expected else ("pearson", "spearman"))


def test_bad_custom_input_names_the_key(tmp_path: Path) -> None:
    base = ["data.custom.text_a=text", "data.custom.label=label"]
    with pytest.raises(DataError, match="data.custom.train_file: file not found"):
        resolve_task(_params(tmp_path, f"data.custom.train_file={tmp_path / 'none.csv'}", *base).data)
    with pytest.raises(ConfigError, match="data.custom.regression"):
        _params(tmp_path, "data.custom.train_file=a.csv", "data.custom.regression=true", "data.custom.label_names=[a, b]", *base)
    with pytest.raises(ConfigError, match="data.custom.eval_share"):
        _params(tmp_path, "data.custom.train_file=a.csv", "data.custom.eval_share=1.5", *base)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: no column 'label'"):
        resolve_task(_params(tmp_path, f"data.custom.train_file={jsonl}", *base).data)


def test_a_dense_model_at_the_trivial_score_is_warned(capsys: pytest.CaptureFixture) -> None:
    warn_if_trivial(0.5, 0.5)
    assert "no better than the trivial answer (0.5000" in capsys.readouterr().err
    warn_if_trivial(0.75, 0.5)
    assert capsys.readouterr().err == ""


def test_glue_labels_carry_names_and_keep_their_ids(glue_dir: Path) -> None:
    from lowrank.data.loading import read_split
    from lowrank.data.catalog import get_task, task_from_dict, task_to_dict

    sst2 = get_task("sst2")
    assert sst2.label_names == ("negative", "positive") and sst2.label_ids == {"0": 0, "1": 1}
    assert get_task("wnli").label_names == ("not_entailment", "entailment")  # the hub's class ids: 1 = entailment
    assert task_from_dict(task_to_dict(sst2)) == sst2
    first = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines()[1].split("\t")
    assert read_split(sst2, "train", glue_dir)[0] == {"text_a": first[0], "label": int(first[1])}


def test_the_data_folder_beside_the_checkout_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from lowrank.config import DataConfig

    monkeypatch.delenv("GLUE_DIR", raising=False)
    (tmp_path / "shared" / "data" / "glue").mkdir(parents=True)
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    assert DataConfig().resolved_glue_dir() == tmp_path / "shared" / "data" / "glue"
    assert "reading GLUE from" in capsys.readouterr().err
    assert DataConfig(glue_dir="elsewhere").resolved_glue_dir() == Path("elsewhere")
    monkeypatch.chdir(tmp_path)
    assert DataConfig().resolved_glue_dir() is None  # nothing beside: the hub


def test_the_hub_is_tried_only_when_it_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowrank.data.loading import check_files
    from lowrank.data.catalog import get_task
    from lowrank.io import hub

    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(hub, "_answers", lambda host: False)
    with pytest.raises(DataError, match="which is offline"):
        check_files(get_task("sst2"), None)
    monkeypatch.setattr(hub, "_answers", lambda host: True)
    assert check_files(get_task("sst2"), None) == {}  # online: the hub is read, nothing local to check
