"""Choices read a split held out of the training rows; the reported split is scored once, by the evaluate stages."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import DatasetDict

from conftest import GLUE_DIR, save_tiny_model, tiny_params
from lowrank.config import load_params
from lowrank.data.loading import SELECT, custom_task, hold_out, load_raw
from lowrank.pipeline import PreparedData, get_stage, pipeline


def test_hold_out_takes_a_seeded_capped_share_and_leaves_the_rest_to_train() -> None:
    kept, held = hold_out(100, 0.1, 1000, seed=3)
    assert len(held) == 10 and len(kept) == 90 and sorted(kept + held) == list(range(100))
    assert held == sorted(held) and kept == sorted(kept)
    assert hold_out(100, 0.1, 1000, seed=3) == (kept, held)  # the same seed, the same rows
    assert hold_out(100, 0.1, 1000, seed=4)[1] != held
    assert len(hold_out(50_000, 0.1, 1000, seed=0)[1]) == 1000  # capped
    assert len(hold_out(2, 0.1, 1000, seed=0)[1]) == 1  # at least one on each side


def test_the_selection_split_never_shares_a_row_with_the_training_subsample(tmp_path: Path) -> None:
    rows = "\n".join(f"row {i},{'pos' if i % 3 else 'neg'}" for i in range(200))
    (tmp_path / "train.csv").write_text(f"text,tag\n{rows}\n")
    (tmp_path / "dev.csv").write_text("text,tag\ndev a,pos\ndev b,neg\n")
    spec = custom_task(tmp_path / "train.csv", tmp_path / "dev.csv", "text", "tag", label_names=["neg", "pos"])
    raw = load_raw(spec, max_train_samples=50, seed=7, validation=(0.2, 1000))
    train, select = set(raw["train"]["text_a"]), set(raw[SELECT]["text_a"])
    assert len(select) == 40 and len(train) == 50 and not train & select
    assert list(raw["validation"]["text_a"]) == ["dev a", "dev b"]  # the reported split, untouched
    again = load_raw(spec, max_train_samples=50, seed=7, validation=(0.2, 1000))
    assert list(again[SELECT]["text_a"]) == list(raw[SELECT]["text_a"])


class _Recorder(DatasetDict):
    """A prepared dataset that notes every split a stage reads."""

    reads: list[tuple[str, str]] = []
    stage = ""

    def __getitem__(self, split):
        _Recorder.reads.append((_Recorder.stage, split))
        return super().__getitem__(split)


RUNS = {
    "factorize": {"factorize": {"method": "svd_llm", "keep_ratio": 0.5, "allocation": "search"},
                  "finetune_compressed": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "distill": {"enabled": True}}},
    "lpaf": {"orchestration": {"path": "lpaf"}, "factorize": {"method": "sparse_svd", "keep_ratio": 0.5},
             "prune": {"train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}, "mrft": {"train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}},
}


@pytest.mark.parametrize("path", list(RUNS))
def test_no_stage_but_the_evaluations_reads_the_reported_split(tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    opened = PreparedData.open.__func__

    def recording_open(cls, data_dir: Path) -> PreparedData:
        prepared = opened(cls, data_dir)
        prepared.dataset = _Recorder(dict(prepared.dataset.items()))
        return prepared

    monkeypatch.setattr(PreparedData, "open", classmethod(recording_open))
    _Recorder.reads = []
    params = load_params(tiny_params(tmp_path, save_tiny_model(tmp_path / "model"), GLUE_DIR, evaluate={"latency": False}, **RUNS[path]))
    for name in pipeline(params):
        _Recorder.stage = name
        get_stage(name).run(params)
    reported = {"validation"}  # SST-2's dev file: what BENCHMARKS.md and every table report
    readers = {stage for stage, split in _Recorder.reads if split in reported}
    assert readers and all(stage.startswith("evaluate_") for stage in readers), readers
    # every stage that chooses (an epoch, the + ft start, ranks by the search's calibration loss) read the selection split
    choosers = {"factorize": ("finetune", "factorize", "finetune_compressed"), "lpaf": ("finetune", "prune", "mrft")}[path]
    assert all((name, SELECT) in _Recorder.reads for name in choosers), sorted(set(_Recorder.reads))
    evaluations = [name for name in pipeline(params) if name.startswith("evaluate_")]
    assert evaluations and all((name, "validation") in _Recorder.reads for name in evaluations)
