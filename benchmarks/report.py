"""Writing benchmark figures: the detail under benchmarks/results/; BENCHMARKS.md is the report, written by hand.

Each script replaces only its own section (between HTML comment markers), so
scripts can be rerun one at a time; every section carries the command that
produced it, the machine and the date. `write_section` puts the full section
into a topic file under benchmarks/results/ (`results=`) and, given a short
`headline`, replaces the section of the same name in BENCHMARKS.md with it
only where BENCHMARKS.md has that section. The report has none today: it is
kept within its limits (tests/test_docs.py) by hand, so a rerun never appends
to it.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import re
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]

# What the Makefile sets for `make run`: benchmarks run offline on the shared GLUE copy too.
_GLUE = ROOT.parent / "shared" / "data" / "glue"
if _GLUE.is_dir():
    os.environ.setdefault("GLUE_DIR", str(_GLUE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPORT = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "benchmarks" / "results"
# One lock for BENCHMARKS.md and every results file: runs side by side (several seeds on one GPU) keep each one's section.
LOCK = REPORT.with_name(".BENCHMARKS.md.lock")


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    from lowrank.devices import default_device, runtime_versions

    where = runtime_versions()
    device = default_device()
    gpu = f"stages on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "no GPU"
    return (f"{where['cores']} cores ({where['cpu']}; {where['cpu_features']}), torch {where['torch']}, onnxruntime {where['onnxruntime']}, "
            f"{torch.get_num_threads()} threads, {gpu}")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats get 4 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_file(kind: str, task: str, train_suffix: str = "") -> str:
    """The topic file under benchmarks/results/ of a per-task script: `quality-sst2.md`, `lpaf-mrpc.md`; a training
    subset other than the default groups every script's runs by task and size instead: `sst2-train8000.md`."""
    return f"{task}{train_suffix}.md" if train_suffix else f"{kind}-{task}.md"


def _marked(name: str) -> re.Pattern:
    return re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)


def _replace_or_append(path: Path, name: str, section: str, header: str) -> None:
    """Section `name` of `path` replaced by `section`, or appended; written beside and renamed, so a crash
    mid-write leaves the old file whole. Call under LOCK (one writer at a time: one partial file name is enough)."""
    text = path.read_text() if path.exists() else header
    pattern = _marked(name)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    partial = path.with_name(".BENCHMARKS.md.partial")  # the name .gitignore already ignores, in every folder
    partial.write_text(text)
    os.replace(partial, path)


def write_section(
    name: str, title: str, command: str, body: str, *, results: str, headline: str | None = None
) -> Path:
    """Replace (or append) the section `name` of benchmarks/results/`results` with the full `body`; with `headline`,
    also replace the section `name` of BENCHMARKS.md with it (plus command, machine, date and a link to the detail).

    BENCHMARKS.md only changes where it already has a section `name`. Returns the results file.
    """
    if "/" in results or not results.endswith(".md"):
        raise ValueError(f"results: a file name like 'latency.md' under {RESULTS}, got {results!r}")
    stamp = f"Command: `{command}`  \nMachine: {machine()}  \nDate: {datetime.date.today().isoformat()}"
    detail = RESULTS / results
    section = f"<!-- {name}:start -->\n## {title}\n\n{stamp}\n\n{body.strip()}\n<!-- {name}:end -->"
    header = (
        f"# Benchmark detail: {detail.stem}\n\nDetail behind [BENCHMARKS.md](../../BENCHMARKS.md): every section was produced by "
        "the script named in it, on the machine and date given there. Rerun a script to replace its section.\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_or_append(detail, name, section, header)
        if headline is not None:
            report = REPORT.read_text() if REPORT.exists() else ""
            if _marked(name).search(report):
                link = f"benchmarks/results/{results}"
                short = (
                    f"<!-- {name}:start -->\n### {title}\n\n{stamp}\n\n{headline.strip()}\n\n"
                    f"Detail: [{link}]({link})\n<!-- {name}:end -->"
                )
                _replace_or_append(REPORT, name, short, "")
    return detail
