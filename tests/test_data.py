"""GLUE readers on the real files, user files, subsampling, batching, and task metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lowrank.data.loading import DataError, check_files, custom_task, get_task, load_raw, read_split, subsample_indices
from lowrank.data.metrics import compute_metrics

ROWS = {"sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277), "stsb": (5749, 1500)}


@pytest.mark.parametrize("task", sorted(ROWS))
def test_glue_files_read_with_official_row_counts(task: str, glue_dir: Path) -> None:
    spec = get_task(task)
    train, dev = (read_split(spec, split, glue_dir) for split in ("train", "validation"))
    assert (len(train), len(dev)) == ROWS[task]


def test_mrpc_bom_and_labels(glue_dir: Path) -> None:
    rows = read_split(get_task("MRPC"), "train", glue_dir)
    assert sum(r["label"] for r in rows) == 2474  # paraphrases, per the GLUE README
    assert rows[0]["text_a"].startswith("Amrozi accused his brother")


def test_quotes_are_literal_text(glue_dir: Path) -> None:
    rows = read_split(get_task("sts-b"), "train", glue_dir)
    assert any('"' in r["text_a"] or '"' in r["text_b"] for r in rows)
    assert all(0.0 <= r["label"] <= 5.0 for r in rows)


def test_rte_labels_map_to_ids(glue_dir: Path) -> None:
    rows = read_split(get_task("rte"), "validation", glue_dir)
    assert sum(1 for r in rows if r["label"] == 0) == 146  # entailment


def test_subsampling_is_seeded_and_sorted() -> None:
    first = subsample_indices(100, 10, seed=1)
    assert first == subsample_indices(100, 10, seed=1) and first == sorted(first)
    assert first != subsample_indices(100, 10, seed=2)
    assert subsample_indices(5, None, 0) == [0, 1, 2, 3, 4]


def test_load_raw_subsamples(glue_dir: Path) -> None:
    raw = load_raw(get_task("sst2"), glue_dir, max_train_samples=50, max_eval_samples=20, seed=3)
    assert (len(raw["train"]), len(raw["validation"])) == (50, 20)
    assert set(raw["train"].column_names) == {"text_a", "label"}


def test_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train\.tsv.*dev\.tsv"):
        check_files(get_task("sst2"), tmp_path)
    with pytest.raises(ValueError, match="unknown task 'glu'"):
        get_task("glu")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "SST-2"
    folder.mkdir()
    _write(folder / "dev.tsv", "sentence\tlabel\nfine\t1\n")
    _write(folder / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: expected 2 columns, found 3"):
        read_split(get_task("sst2"), "train", tmp_path)
    _write(folder / "train.tsv", "sentence\tlabel\ngood\t7\n")
    with pytest.raises(DataError, match=r"train\.tsv:2: label '7' is not one of '0', '1'"):
        read_split(get_task("sst2"), "train", tmp_path)
    _write(folder / "train.tsv", "sentence\tlabel\n \t1\n")
    with pytest.raises(DataError, match="empty text"):
        read_split(get_task("sst2"), "train", tmp_path)
    _write(folder / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match="no data rows"):
        read_split(get_task("sst2"), "train", tmp_path)


def test_custom_csv_and_jsonl(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.csv", 'text,tag\n"hello, world",pos\nbye,neg\n')
    dev = _write(tmp_path / "dev.jsonl", '{"text": "hi", "tag": "pos"}\n\n{"text": "no", "tag": "neg"}\n')
    spec = custom_task(train, dev, "text", "tag", label_names=["neg", "pos"])
    rows = read_split(spec, "train")
    assert rows == [{"text_a": "hello, world", "label": 1}, {"text_a": "bye", "label": 0}]
    assert [r["label"] for r in read_split(spec, "validation")] == [1, 0]
    with pytest.raises(ValueError, match="unknown data file type '.txt'"):
        custom_task(tmp_path / "a.txt", dev, "text", "tag")


def test_tokenized_batches_pad_to_their_longest_row(glue_dir: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from lowrank.data.loading import make_loader, tokenize

    spec = get_task("sst2")
    raw = load_raw(spec, glue_dir, max_train_samples=32, max_eval_samples=8)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    data = tokenize(raw, spec, tokenizer, max_length=64)
    lengths = [len(ids) for ids in data["train"]["input_ids"]]
    batches = list(make_loader(data["train"], tokenizer, batch_size=8))
    assert [b["input_ids"].shape[1] for b in batches] == [max(lengths[i : i + 8]) for i in range(0, 32, 8)]
    assert batches[0]["labels"].dtype == torch.int64


def test_length_grouped_batches_see_every_row_once_and_predict_in_order(glue_dir: Path, tiny_model_dir: Path) -> None:
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from lowrank.data.loading import make_loader, tokenize
    from lowrank.evaluation import predict

    spec = get_task("sst2")
    raw = load_raw(spec, glue_dir, max_train_samples=400, max_eval_samples=100)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    data = tokenize(raw, spec, tokenizer, max_length=64)
    train = data["train"].map(lambda row, i: {"labels": i}, with_indices=True)  # each row's label is its index
    padded = {}
    for group in (False, True):
        for epoch_seed in (1, 2):
            batches = list(make_loader(train, tokenizer, batch_size=8, shuffle=True, seed=epoch_seed, group_by_length=group))
            seen = torch.cat([b["labels"] for b in batches])
            assert sorted(seen.tolist()) == list(range(400))  # every row once per epoch
            padded[group, epoch_seed] = sum(b["input_ids"].numel() for b in batches)
    assert padded[True, 1] < 0.8 * padded[False, 1]  # far less padding
    assert make_loader(train, tokenizer, 8, shuffle=True, seed=1, group_by_length=True).sampler is not None

    # A "model" whose logits are a function of each row's tokens: sorted for speed, returned in the dataset's order.
    model = torch.nn.Module()
    model.forward = lambda input_ids, attention_mask, **_: SimpleNamespace(logits=(input_ids * attention_mask).sum(-1, keepdim=True).float())
    plain = predict(model, make_loader(data["validation"], tokenizer, 16))
    grouped = predict(model, make_loader(data["validation"], tokenizer, 16, group_by_length=True))
    assert torch.equal(plain["logits"], grouped["logits"]) and torch.equal(plain["labels"], grouped["labels"])


def _logits(predictions: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), 2).float()


def test_metrics_against_known_values() -> None:
    labels = torch.tensor([1, 1, 0, 0, 1])
    predictions = [1, 0, 0, 1, 1]
    mrpc = compute_metrics(get_task("mrpc"), _logits(predictions), labels)
    assert mrpc["accuracy"] == pytest.approx(0.6)
    assert mrpc["f1"] == pytest.approx(2 / 3)  # tp 2, fp 1, fn 1
    assert mrpc["score"] == pytest.approx((0.6 + 2 / 3) / 2)
    cola = compute_metrics(get_task("cola"), _logits(predictions), labels)
    # MCC = (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3 * 3 * 2 * 2)
    assert cola["matthews_correlation"] == pytest.approx(1 / 6)
    stsb = compute_metrics(get_task("stsb"), torch.tensor([[1.0], [2.0], [3.0], [5.0]]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert stsb["spearman"] == pytest.approx(1.0)
    assert stsb["pearson"] == pytest.approx(0.9827076298239908)
    flat = compute_metrics(get_task("stsb"), torch.ones(4, 1), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert flat["pearson"] == 0.0 and not math.isnan(flat["score"])
