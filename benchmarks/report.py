"""Writing benchmark figures into BENCHMARKS.md, one section per benchmark script.

Each script replaces only its own section (between HTML comment markers), so
scripts can be rerun one at a time; every section carries the command that
produced it, the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import platform
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
HEADER = "# Benchmarks\n\nEvery figure below was produced by the script named in its section, on the machine and date given there.\nRerun a script to replace its section.\n"


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from lowrank.devices import default_device

    device = default_device()
    gpu = f"stages on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, {gpu}"


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Runs side by side must split the cores, or each takes them all and they thrash."""
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op CPU threads of this process (default: torch's); divide the cores among runs side by side")


def apply_threads(threads: int | None) -> None:
    """Set the count before any work, so the section's machine line reports what the run used."""
    if threads is None:
        return
    if threads < 1:
        raise SystemExit(f"--threads: at least 1, got {threads}")
    torch.set_num_threads(threads)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats get 4 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, command: str, body: str) -> Path:
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    today = datetime.date.today().isoformat()
    section = (
        f"<!-- {name}:start -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {today}\n\n{body.strip()}\n<!-- {name}:end -->"
    )
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    # Benchmarks may run side by side (several seeds on one GPU): a lock keeps each one's section.
    with open(REPORT.with_name(".BENCHMARKS.md.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = REPORT.read_text() if REPORT.exists() else HEADER
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        partial = REPORT.with_name(".BENCHMARKS.md.partial")  # a crash mid-write leaves the old report whole
        partial.write_text(text)
        os.replace(partial, REPORT)
    return REPORT
