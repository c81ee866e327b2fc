"""The notebook example of docs/methods.md runs as written, on a tiny model instead of `make run`'s."""

from __future__ import annotations

import re
from pathlib import Path

import lowrank
from conftest import REPO


def test_the_notebook_example_compresses_and_saves(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    page = (REPO / "docs" / "methods.md").read_text()
    section = page[page.index("## In a notebook"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.count("\n") <= 12, "the example should stay about ten lines"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("artifacts/finetune/model", str(tiny_model_dir)), "docs/methods.md", "exec"), scope)
    report = scope["report"]
    assert 0 < report.keep_ratio_reached <= 0.3
    assert len(report.ranks) == 12
    reloaded = lowrank.load_compressed(tmp_path / "tfwsvd-0.3")
    assert reloaded.config.lowrank["method"] == "tfwsvd"
    assert reloaded.config.lowrank["ranks"] == {k: v for k, v in report.ranks.items()}


def test_the_prediction_example_loads_a_compressed_model_and_names_labels(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Predict with the compressed model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    model.config.id2label = {0: "negative", 1: "positive"}
    lowrank.compress_(model, method="svd", keep_ratio=0.5)
    lowrank.save_compressed(model, tmp_path / "model", method="svd", tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("artifacts/finetune_compressed/model", "model"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("[") and printed.count("'") == 4  # two labels, by name
    assert set(re.findall(r"'(\w+)'", printed)) <= {"negative", "positive"}
