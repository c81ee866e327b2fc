"""Task kinds through the pipeline: every path per kind on tiny files, a fine-tuned checkpoint taken as is,
`lowrank run` and `lowrank sweep` (slow), bad input through the CLI, and a slice of CoNLL-2003."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lowrank.config import InputError
from test_kinds import CONLL_DIR, QA, TAGS, save_tiny, squad, write_conll, write_squad


def kind_params(root: Path, kind: str, model_dir: Path, **sections) -> Path:
    """A seconds-long factorize path over the kind's tiny files (written here), ending with + ft and its evaluation."""
    from conftest import tiny_params

    root.mkdir(parents=True, exist_ok=True)
    if kind == "token":
        custom = {"kind": "token", "label_names": sections.pop("tags", TAGS),
                  "train_file": str(write_conll(root / "train.txt", repeat=6)), "eval_file": str(write_conll(root / "dev.txt"))}
    else:
        custom = {"kind": "span", "train_file": str(write_squad(root / "train.json", repeat=6)), "eval_file": str(write_squad(root / "dev.json"))}
    data = {"task": "custom", "custom": custom, "max_train_samples": None, "max_eval_samples": None, "max_length": 16}
    sections = {"data": data, "evaluate": {"latency_runtimes": ["torch", "onnxruntime"]}, **sections}
    return tiny_params(root, model_dir, root, **sections)


LPAF = {"orchestration": {"path": "lpaf"}, "factorize": {"method": "sparse_svd", "keep_ratio": 0.5},
        "prune": {"train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}, "mrft": {"train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}}
DISTILLED = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "distill": {"enabled": True, "weight": 0.5}}
PATHS = {
    "token-fwsvd": ("token", {"factorize": {"method": "fwsvd", "keep_ratio": 0.5}}),
    "span-fwsvd": ("span", {"factorize": {"method": "fwsvd", "keep_ratio": 0.5}}),
    "token-svd_llm-distilled": ("token", {"factorize": {"method": "svd_llm", "keep_ratio": 0.5}, "finetune_compressed": DISTILLED}),
    "span-asvd-distilled": ("span", {"factorize": {"method": "asvd", "keep_ratio": 0.5}, "finetune_compressed": DISTILLED}),
    "token-lpaf": ("token", LPAF),
    "token-misclassified-fisher": ("token", {"factorize": {"method": "fwsvd", "keep_ratio": 0.5},
                                             "fisher": {"max_samples": 32, "batch_size": 16, "only_misclassified": True}}),
    "span-lpaf": ("span", LPAF),
    "span-misclassified-fisher": ("span", {"factorize": {"method": "tfwsvd", "keep_ratio": 0.5, "solver_steps": 2},
                                           "fisher": {"max_samples": 32, "batch_size": 16, "only_misclassified": True}}),
}


@pytest.mark.parametrize(("kind", "sections"), list(PATHS.values()), ids=list(PATHS))
def test_every_stage_of_the_path_runs_for_the_kind(tmp_path: Path, kind: str, sections: dict) -> None:
    from lowrank.config import load_params
    from lowrank.pipeline import EVALUATIONS, get_stage, pipeline, preflight

    model_dir = save_tiny(tmp_path / "base", "BertModel")
    params = load_params(kind_params(tmp_path, kind, model_dir, **sections))
    preflight(params)
    for name in pipeline(params):
        get_stage(name).run(params)
    metrics = lambda name: json.loads((tmp_path / "metrics" / f"{name}.json").read_text())  # noqa: E731
    evaluations = [name for name in pipeline(params) if name in EVALUATIONS]
    assert len(evaluations) >= 3
    for name in evaluations:
        task = metrics(name)["task"]
        assert task["score"] == task["f1"] and 0 <= task["score"] <= 1  # entity F1, SQuAD F1
        assert metrics(name)["latency_onnxruntime"]["onnx_max_abs_diff"] < 1e-3  # the export of every kind is checked
    if "finetune_compressed" in pipeline(params):
        ft = metrics("finetune_compressed")
        assert ft["history"][0]["epoch"] == 0 and ft["majority_score"] == 0.0  # the kind's baseline: no entity, no answer


def test_a_fine_tuned_tagger_is_taken_as_is_and_its_bytes_key_what_follows(tmp_path: Path) -> None:
    from lowrank.config import load_params
    from lowrank.pipeline import get_stage, preflight
    from lowrank.pipeline.store import fingerprints

    first = load_params(kind_params(tmp_path / "a", "token", save_tiny(tmp_path / "base", "BertModel")))
    for name in ("prepare", "finetune"):
        get_stage(name).run(first)
    tagger = tmp_path / "a" / "artifacts" / "finetune" / "model"
    # what finetune's last epoch scored on the selection split (the same rows in both projects: same files, same seed)
    dense = json.loads((tmp_path / "a" / "metrics" / "finetune.json").read_text())["history"][-1]["score"]

    second = load_params(kind_params(tmp_path / "b", "token", tagger, model={"name": str(tagger), "finetuned": True}))
    preflight(second)
    for name in ("prepare", "finetune"):
        get_stage(name).run(second)
    taken = json.loads((tmp_path / "b" / "metrics" / "finetune.json").read_text())
    assert taken["steps"] == 0 and taken["finetuned_before"] == 1 and taken["best_score"] == pytest.approx(dense)
    before = fingerprints(second, ["finetune"])["finetune"]
    config = json.loads((tagger / "config.json").read_text())
    (tagger / "config.json").write_text(json.dumps({**config, "classifier_dropout": 0.2}))
    assert fingerprints(second, ["finetune"])["finetune"] != before  # the checkpoint changed: finetune reruns

    tags = TAGS + ["B-ORG", "I-ORG"]
    wrong = load_params(kind_params(tmp_path / "c", "token", tagger, model={"name": str(tagger), "finetuned": True}, tags=tags))
    with pytest.raises(InputError, match=r"model.finetuned: the labels of .* \(O, B-PER, I-PER, B-LOC, I-LOC\) differ from the task's \(O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, I-ORG\)"):
        preflight(wrong)


# ---------------------------------------------------------------------------------------------------- the CLI, per kind

SERVED = {
    "token": ({"text": ["john smith lives in paris"]}, "entities"),
    "span": ({"question": [QA[0][1]], "context": [QA[0][0]]}, "answer"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["token", "span"])
def test_lowrank_run_and_sweep_ship_a_served_model_of_the_kind(tmp_path: Path, kind: str, prefect_api: str) -> None:
    import subprocess

    import mlflow

    from conftest import LOWRANK, lowrank_env, run_sweep

    kind_params(tmp_path, kind, save_tiny(tmp_path / "base", "BertModel"), evaluate={"latency": False},
                sweep={"grid": {"factorize.method": ["svd", "fwsvd"]}})
    env = lowrank_env(PREFECT_API_URL=prefect_api)
    done = subprocess.run([*LOWRANK, "--quiet", "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0 <= json.loads(done.stdout)["evaluate_compressed"]["metrics"]["task.f1"] <= 1
    code, summary, err = run_sweep(tmp_path, env, "--workers", "1", "--threads", "1")
    assert code == 0, err[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    frame, column = SERVED[kind]
    served = mlflow.pyfunc.load_model("models:/lowrank-custom@champion").predict(pd.DataFrame(frame))
    assert len(served) == 1 and column in served.columns


# ---------------------------------------------------------------------------------------------------- bad input, through the CLI


def _three_columns(root: Path) -> dict:
    (root / "train.txt").write_text("john B-PER\nsmith NNP I-PER\n")
    return {}


def _unknown_tag(root: Path) -> dict:
    (root / "dev.txt").write_text("john B-PER\n\nparis B-CITY\n")
    return {}


def _answer_elsewhere(root: Path) -> dict:
    data = squad(QA)
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 0
    (root / "dev.json").write_text(json.dumps(data, indent=2))
    return {}


def _empty_context(root: Path) -> dict:
    data = squad(QA)
    data["data"][0]["paragraphs"][3]["context"] = ""
    (root / "train.json").write_text(json.dumps(data, indent=2))
    return {}


def _qa_head(root: Path) -> dict:
    return {"model": {"name": str(save_tiny(root / "reader", "BertForQuestionAnswering")), "finetuned": True}}


def _other_tags(root: Path) -> dict:
    return {"model": {"name": str(save_tiny(root / "tagger", "BertForTokenClassification", num_labels=3)), "finetuned": True}}


BAD = [
    ("token-three-columns", "token", _three_columns, "train.txt:2: expected 2 columns (token and tag), found 3"),
    ("token-unknown-tag", "token", _unknown_tag, "dev.txt:3: tag 'B-CITY' is not one of O, B-PER"),
    ("span-answer-start", "span", _answer_elsewhere, "dev.json:11: answer_start 0 does not point at the answer 'paris'"),
    ("span-empty-context", "span", _empty_context, "train.json:56: empty context"),
    ("qa-head-for-token-task", "token", _qa_head, "head BertForQuestionAnswering (span task kind), the task custom is a token task"),
    ("labels-differ", "token", _other_tags, "(LABEL_0, LABEL_1, LABEL_2) differ from the task's (O, B-PER, I-PER, B-LOC, I-LOC)"),
]


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(("kind", "make", "expected"), [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_task_input_is_one_line_with_exit_2_before_any_work(tmp_path: Path, monkeypatch, command: str, kind: str, make, expected: str) -> None:
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    params = kind_params(tmp_path, kind, save_tiny(tmp_path / "base", "BertModel"))
    raw = yaml.safe_load(params.read_text())
    for section, values in make(tmp_path).items():
        raw[section].update(values)
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, [command, "--params", str(params)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.skipif(not (CONLL_DIR / "train.txt").is_file(), reason="CoNLL-2003 not found")
def test_a_slice_of_conll2003_trains_selects_on_dev_and_reports_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import tiny_params
    from lowrank.config import load_params
    from lowrank.pipeline import get_stage

    monkeypatch.setenv("CONLL_DIR", str(CONLL_DIR))
    data = {"task": "conll2003", "max_train_samples": 64, "max_eval_samples": 32, "max_length": 32}
    params = load_params(tiny_params(tmp_path, save_tiny(tmp_path / "base", "BertModel"), tmp_path, data=data,
                                     evaluate={"latency": False}, finetune={"epochs": 1, "batch_size": 16, "lr": 1e-3}))
    for name in ("prepare", "finetune", "evaluate_dense"):
        get_stage(name).run(params)
    prepared = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert {split: prepared[split]["rows"] for split in ("train", "validation", "test")} == {"train": 64, "validation": 32, "test": 32}
    evaluated = json.loads((tmp_path / "metrics" / "evaluate_dense.json").read_text())
    task = evaluated["task"]
    assert evaluated["reported_on"] == ["test"]
    assert set(task) == {"score", "f1", "precision", "recall", "accuracy", "test.f1", "test.precision", "test.recall", "test.accuracy"}
    assert task["score"] == task["f1"] and task["accuracy"] > 0.5  # most words are O
    history = json.loads((tmp_path / "metrics" / "finetune.json").read_text())["history"]
    assert not any(key.startswith("test.") for row in history for key in row)  # the test split never selects
