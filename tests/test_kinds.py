"""Task kinds: token classification and extractive QA beside sequence classification, on tiny models built in code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import VOCAB, tiny_bert_config
from lowrank.config import InputError, ModelConfig
from lowrank.data.loading import read_split
from lowrank.data.catalog import CONLL_TAGS, DataError
from lowrank.kinds import KINDS, get_kind
from lowrank.kinds.span import answer_scores, best_span, normalize_answer, read_squad
from lowrank.kinds.token import entities, first_subtoken_labels, tag_scores

CONLL_DIR = Path(os.environ.get("CONLL_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "conll2003"))
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
SENTENCES = [
    ("john smith lives in paris", ["B-PER", "I-PER", "O", "O", "B-LOC"]),
    ("mary went to new york", ["B-PER", "O", "O", "B-LOC", "I-LOC"]),
    ("the cat sat", ["O", "O", "O"]),
    ("anna met bob in rome", ["B-PER", "O", "B-PER", "O", "B-LOC"]),
]


def save_tiny(folder: Path, model_class: str, **config) -> Path:
    """A random tiny BERT with the given head and the char-level tokenizer, saved like a hub model."""
    import transformers
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    getattr(transformers, model_class)(tiny_bert_config(**config)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return folder


def write_conll(path: Path, sentences=SENTENCES, repeat: int = 1) -> Path:
    blocks = ["\n".join(f"{w} {t}" for w, t in zip(text.split(), tags)) for text, tags in sentences * repeat]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def squad(questions: list[tuple[str, str, str]]) -> dict:
    """SQuAD format from (context, question, answer) triples, the answer found in its context."""
    qas = [{"context": c, "qas": [{"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": c.find(a)}]}]}
           for i, (c, q, a) in enumerate(questions)]
    return {"version": "1.1", "data": [{"title": "tiny", "paragraphs": qas}]}


QA = [
    ("john smith lives in paris and works in rome.", "where does john live?", "paris"),
    ("the cat sat on the mat while the dog slept.", "where did the cat sit?", "on the mat"),
    ("mary went to new york in june.", "when did mary go?", "june"),
    ("bob plays the piano every evening at home.", "what does bob play?", "the piano"),
]


def write_squad(path: Path, questions=QA, repeat: int = 1) -> Path:
    path.write_text(json.dumps(squad(questions * repeat), indent=2))
    return path


# ---------------------------------------------------------------------------------------------------- the table


def test_four_kinds_are_registered_each_with_its_model_class_and_outputs() -> None:
    assert {name: (k.auto_class, tuple(k.outputs)) for name, k in KINDS.items()} == {
        "sequence": ("AutoModelForSequenceClassification", ("logits",)),
        "token": ("AutoModelForTokenClassification", ("logits",)),
        "span": ("AutoModelForQuestionAnswering", ("start_logits", "end_logits")),
        "lm": ("AutoModelForCausalLM", ("logits",)),
    }
    with pytest.raises(InputError, match="known kinds: sequence"):
        get_kind("parse")


def test_lowrank_tasks_lists_each_kind_with_its_datasets() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["tasks"])
    assert result.exit_code == 0, result.output
    listed = {row["kind"]: row["datasets"] for row in json.loads(result.stdout)}
    assert listed["token"] == ["conll2003", "custom"] and listed["span"] == ["custom"]
    assert listed["sequence"][:3] == ["cola", "sst2", "mrpc"] and "conll2003" not in listed["sequence"]


# ---------------------------------------------------------------------------------------------------- token


def test_a_word_s_tag_goes_on_its_first_subtoken_only() -> None:
    # [CLS] jo ##hn smith [SEP]: words 0, 0, 1
    assert first_subtoken_labels([None, 0, 0, 1, None], [3, 4]) == [-100, 3, -100, 4, -100]


def test_entity_scores_match_seqeval_on_a_known_answer() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O"]]  # one of three entities right, two predicted
    scores = tag_scores(predicted, gold)
    assert scores["precision"] == pytest.approx(1 / 2) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)) == scores["score"]
    assert scores["accuracy"] == pytest.approx(4 / 6)


def test_the_token_reader_names_file_and_line_of_a_bad_row(tmp_path: Path) -> None:
    spec = get_kind("token").custom_task(_custom(tmp_path, "token", label_names=TAGS))
    good = write_conll(tmp_path / "train.txt")
    rows = get_kind("token").read_rows(spec, good, spec.files["train"])
    assert len(rows) == 4 and rows[0] == {"tokens": ["john", "smith", "lives", "in", "paris"], "tags": [1, 2, 0, 0, 3]}
    bad = tmp_path / "bad.txt"
    bad.write_text("john B-PER\nsmith NNP I-PER\n")
    with pytest.raises(DataError, match=r"bad.txt:2: expected 2 columns \(token and tag\), found 3"):
        get_kind("token").read_rows(spec, bad, spec.files["train"])
    bad.write_text("john B-PER\n\nparis B-CITY\n")
    with pytest.raises(DataError, match=r"bad.txt:3: tag 'B-CITY' is not one of O, B-PER"):
        get_kind("token").read_rows(spec, bad, spec.files["train"])
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "O"]}) + "\n" + json.dumps({"tokens": ["a"], "tags": ["O", "O"]}) + "\n")
    spec = get_kind("token").custom_task(_custom(tmp_path, "token", label_names=TAGS, train="bad.jsonl"))
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'tags' should be a list of 1 tags"):
        read_split(spec, "train")


def test_only_the_examples_with_a_wrong_tag_or_span_count_as_misclassified() -> None:
    from types import SimpleNamespace

    tags = torch.tensor([[0, 1, 2], [0, 1, 1], [0, 0, 0]])  # predicted tags of three sentences
    logits = torch.nn.functional.one_hot(tags, 3).float()
    model = lambda **_: SimpleNamespace(logits=logits)  # noqa: E731
    labels = torch.tensor([[-100, 1, 2], [0, 1, 2], [0, 0, -100]])  # the first and third differ only where nothing is scored
    assert get_kind("token").misclassified(model, {"input_ids": tags, "labels": labels}).tolist() == [1]
    start, end = torch.eye(4)[[1, 2]], torch.eye(4)[[3, 3]]  # windows: (1, 3) and (2, 3)
    model = lambda **_: SimpleNamespace(start_logits=start, end_logits=end)  # noqa: E731
    batch = {"input_ids": start, "start_positions": torch.tensor([1, 1]), "end_positions": torch.tensor([3, 3])}
    assert get_kind("span").misclassified(model, batch).tolist() == [1]


def test_entities_come_back_with_their_character_spans() -> None:
    text = "John  Smith flew to New York"
    spans = [(0, 4), (6, 11), (12, 16), (17, 19), (20, 23), (24, 28)]
    found = entities(text, spans, ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"], [0.9, 0.7, 1, 1, 0.8, 0.6])
    assert found == [
        {"type": "PER", "start": 0, "end": 11, "text": "John  Smith", "score": pytest.approx(0.8)},
        {"type": "LOC", "start": 20, "end": 28, "text": "New York", "score": pytest.approx(0.7)},
    ]


def test_a_token_model_scores_exports_and_serves(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from lowrank.evaluation import predict
    from lowrank.io.export import export_onnx, onnx_session, predict_onnx
    from lowrank.io.models import load_for_task

    kind = get_kind("token")
    spec = kind.custom_task(_custom(tmp_path, "token", label_names=TAGS))
    folder = save_tiny(tmp_path / "base", "BertModel")
    model = load_for_task(ModelConfig(name=str(folder)), spec)
    assert type(model).__name__ == "BertForTokenClassification" and model.config.id2label[3] == "B-LOC"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    raw = Dataset.from_list(kind.read_rows(spec, write_conll(tmp_path / "t.txt"), spec.files["train"]), features=kind.raw_features(spec))
    data = kind.encode(raw, spec, tokenizer, 32, "train")
    words = sum(len(t.split()) for t, _ in SENTENCES)
    assert sum(label != -100 for row in data["labels"] for label in row) == words  # one label per word
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=kind.collator(tokenizer))
    outputs = predict(model, loader, tuple(kind.outputs), kind.targets)
    metrics = kind.metrics(spec, outputs, data)
    assert set(metrics) == {"f1", "precision", "recall", "accuracy", "score"} and metrics["score"] == metrics["f1"]
    assert kind.baseline(spec, data) == 0.0  # all O finds no entity
    # a perfect prediction scores 1
    perfect = torch.nn.functional.one_hot(outputs["labels"].clamp(min=0), len(TAGS)).float()
    assert kind.metrics(spec, {**outputs, "logits": perfect}, data)["f1"] == 1.0

    checked = export_onnx(model, tmp_path / "model.onnx")
    assert checked["max_abs_diff"] < 1e-4
    onnx = predict_onnx(onnx_session(tmp_path / "model.onnx"), loader, tuple(kind.outputs), kind.targets)
    assert torch.allclose(onnx["logits"], outputs["logits"], atol=1e-4) and torch.equal(onnx["labels"], outputs["labels"])

    rows = kind.serve(model, tokenizer, pd.DataFrame({"text": ["John Smith lives in Paris"]}), 32, 8, False)
    assert len(rows) == 1
    for entity in rows[0]["entities"]:  # whatever a random model finds, its span is the text's
        assert "John Smith lives in Paris"[entity["start"]:entity["end"]] == entity["text"] and 0 < entity["score"] <= 1


def test_conll2003_is_registered_with_dev_selecting_and_test_reported() -> None:
    from lowrank.data.catalog import get_task, split_path

    spec = get_task("CoNLL-2003")
    assert (spec.kind, spec.label_names, spec.eval_splits, spec.test_splits) == ("token", CONLL_TAGS, ("validation",), ("test",))
    assert split_path(spec, "validation").name == "dev.txt"


@pytest.mark.skipif(not (CONLL_DIR / "dev.txt").is_file(), reason="CoNLL-2003 not found")
def test_conll2003_reads_every_sentence_of_its_dev_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowrank.data.catalog import get_task

    monkeypatch.setenv("CONLL_DIR", str(CONLL_DIR))
    rows = read_split(get_task("conll2003"), "validation")
    assert len(rows) == 3250 and sum(len(r["tokens"]) for r in rows) == 51362  # the README's counts


# ---------------------------------------------------------------------------------------------------- span


def test_squad_normalisation_exact_match_and_f1_on_known_answers() -> None:
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert answer_scores("the Eiffel tower", ["Eiffel Tower", "Paris"]) == (1.0, 1.0)
    exact, f1 = answer_scores("in the city of paris", ["paris city"])  # 2 of 4 predicted words, both gold words
    assert exact == 0.0 and f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert answer_scores("", []) == (1.0, 1.0) and answer_scores("", ["x"]) == (0.0, 0.0)


def test_the_best_span_is_taken_over_all_windows() -> None:
    offsets = [[-1, -1], [0, 4], [5, 9], [10, 14]]
    weak = (torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0]), offsets)
    strong = (torch.tensor([0.0, 0.0, 9.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 9.0]), offsets)
    assert best_span([weak, strong])[1:] == (5, 14)
    backwards = (torch.tensor([0.0, 0.0, 0.0, 9.0]), torch.tensor([0.0, 9.0, 0.0, 0.0]), [[-1, -1], [-1, -1], [-1, -1], [10, 14]])
    assert best_span([backwards])[1:] == (10, 14)  # an end before its start, or outside the context, never wins


def test_the_squad_reader_names_file_and_line_of_a_bad_answer_or_context(tmp_path: Path) -> None:
    path = write_squad(tmp_path / "qa.json")
    assert read_squad(path)[1] == {"question": "where did the cat sit?", "context": QA[1][0], "answer_texts": ["on the mat"], "answer_starts": [12]}
    data = squad(QA)
    data["data"][0]["paragraphs"][2]["qas"][0]["answers"][0]["answer_start"] = 3
    path.write_text(json.dumps(data, indent=2))
    line = _line(path, '"id": "q2",')
    with pytest.raises(DataError, match=rf"qa.json:{line}: answer_start 3 does not point at the answer 'june'"):
        read_squad(path)
    data = squad(QA)
    data["data"][0]["paragraphs"][1]["context"] = " "
    path.write_text(json.dumps(data, indent=2))
    line = _line(path, '"id": "q1",')
    with pytest.raises(DataError, match=rf"qa.json:{line}: empty context"):
        read_squad(path)


def test_a_qa_model_windows_long_contexts_scores_exports_and_serves(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from lowrank.evaluation import predict
    from lowrank.io.export import export_onnx
    from lowrank.io.models import load_for_task

    kind = get_kind("span")
    spec = kind.custom_task(_custom(tmp_path, "span"))
    folder = save_tiny(tmp_path / "base", "BertModel")
    model = load_for_task(ModelConfig(name=str(folder)), spec)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    raw = Dataset.from_list(read_squad(write_squad(tmp_path / "qa.json")), features=kind.raw_features(spec))
    data = kind.encode(raw, spec, tokenizer, 12, "validation")  # every context needs several windows of 12
    assert len(data) > len(raw) and sorted(set(data["example"])) == [0, 1, 2, 3]
    for row in data:  # where a window holds the answer, its positions point at the answer's characters
        if row["start_positions"]:
            first, last = row["offsets"][row["start_positions"]][0], row["offsets"][row["end_positions"]][1]
            assert row["context"][first:last] == row["answers"][0]
    assert sum(bool(s) for s in data["start_positions"]) >= 4
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=kind.collator(tokenizer))
    outputs = predict(model, loader, tuple(kind.outputs), kind.targets)
    metrics = kind.metrics(spec, outputs, data)
    assert set(metrics) == {"exact_match", "f1", "score"} and 0 <= metrics["exact_match"] <= metrics["f1"] <= 1
    assert kind.baseline(spec, data) == 0.0
    # logits that point at the gold positions in the windows holding the answer give exact matches everywhere
    gold = {name: torch.full_like(outputs[f"{name}_logits"], -9.0) for name in ("start", "end")}
    for i, (s, e) in enumerate(zip(data["start_positions"], data["end_positions"])):
        if s:
            gold["start"][i, s], gold["end"][i, e] = 9.0, 9.0
    perfect = kind.metrics(spec, {"start_logits": gold["start"], "end_logits": gold["end"]}, data)
    assert perfect["exact_match"] == perfect["f1"] == 1.0

    assert export_onnx(model, tmp_path / "qa.onnx", token_types=True)["max_abs_diff"] < 1e-4
    rows = kind.serve(model, tokenizer, pd.DataFrame({"question": [QA[0][1]], "context": [QA[0][0]]}), 12, 8, True)
    assert QA[0][0][rows[0]["start"]:rows[0]["end"]] == rows[0]["answer"] and 0 < rows[0]["score"] <= 1


# ---------------------------------------------------------------------------------------------------- a fine-tuned checkpoint


def test_a_checkpoint_whose_head_does_not_fit_the_task_fails_naming_both(tmp_path: Path) -> None:
    from lowrank.io.models import check_head

    token = get_kind("token").custom_task(_custom(tmp_path, "token", label_names=TAGS))
    tagger = save_tiny(tmp_path / "tagger", "BertForTokenClassification", num_labels=3)
    with pytest.raises(InputError, match=r"labels of .*tagger \(LABEL_0, LABEL_1, LABEL_2\) differ from the task's \(O, B-PER"):
        check_head(ModelConfig(name=str(tagger), finetuned=True), token)
    reader = save_tiny(tmp_path / "reader", "BertForQuestionAnswering")
    with pytest.raises(InputError, match=r"head BertForQuestionAnswering \(span task kind\).* a token task"):
        check_head(ModelConfig(name=str(reader), finetuned=True), token)
    check_head(ModelConfig(name=str(reader), finetuned=True), get_kind("span").custom_task(_custom(tmp_path, "span")))
    named = save_tiny(tmp_path / "named", "BertForTokenClassification", num_labels=5)
    config = json.loads((named / "config.json").read_text())
    config["id2label"] = dict(enumerate(TAGS[::-1]))
    (named / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"\(I-LOC, B-LOC, I-PER, B-PER, O\) differ from the task's \(O, B-PER, I-PER, B-LOC, I-LOC\)"):
        check_head(ModelConfig(name=str(named), finetuned=True), token)


def test_a_classifier_checkpoint_must_fit_a_sequence_task_too(tmp_path: Path) -> None:
    from conftest import save_tiny_model
    from lowrank.data.catalog import get_task
    from lowrank.io.models import check_head

    classifier = ModelConfig(name=str(save_tiny_model(tmp_path / "classifier")), finetuned=True)  # LABEL_0, LABEL_1
    check_head(classifier, get_task("sst2"))  # generic names: two labels for two classes is all that can be checked
    with pytest.raises(InputError, match=r"\(LABEL_0, LABEL_1\) differ from the task's \(one regression score\)"):
        check_head(classifier, get_task("stsb"))
    with pytest.raises(InputError, match=r"\(LABEL_0, LABEL_1\) differ from the task's \(entailment, neutral, contradiction\)"):
        check_head(classifier, get_task("mnli"))


def _custom(root: Path, kind: str, label_names=None, train: str | None = None):
    from lowrank.config.sections import CustomDataConfig

    suffix = {"token": "txt", "span": "json"}[kind]
    return CustomDataConfig(str(root / (train or f"train.{suffix}")), str(root / f"dev.{suffix}"), label_names=label_names, kind=kind)




def _line(path: Path, text: str) -> int:
    return [line.strip() for line in path.read_text().splitlines()].index(text) + 1
