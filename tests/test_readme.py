"""The README's notebook example runs as written, on a tiny model instead of `make run`'s."""

from __future__ import annotations

import re
from pathlib import Path

import lowrank
from conftest import REPO


def test_the_notebook_example_compresses_and_saves(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## In a notebook"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.count("\n") <= 12, "the example should stay about ten lines"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("artifacts/finetune/model", str(tiny_model_dir)), "README.md", "exec"), scope)
    report = scope["report"]
    assert 0 < report.keep_ratio_reached <= 0.3
    assert len(report.ranks) == 12
    reloaded = lowrank.load_compressed(tmp_path / "tfwsvd-0.3")
    assert reloaded.config.lowrank["method"] == "tfwsvd"
    assert reloaded.config.lowrank["ranks"] == {k: v for k, v in report.ranks.items()}
