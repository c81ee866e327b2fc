"""The README and the benchmark report stay short enough to read, and their links lead somewhere."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

LIMITS = {"README.md": (200, None), "BENCHMARKS.md": (250, 200)}  # file: (most lines, most characters a line)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_length_limits(name: str) -> None:
    most_lines, widest = LIMITS[name]
    lines = (REPO / name).read_text().splitlines()
    assert len(lines) <= most_lines, f"{name}: {len(lines)} lines, at most {most_lines}"
    if widest is not None:
        long = [f"{name}:{i}: {len(line)} characters" for i, line in enumerate(lines, 1) if len(line) > widest]
        assert not long, "\n".join(long)


@pytest.mark.parametrize("name", ["README.md", "BENCHMARKS.md"])
def test_relative_links_lead_to_files(name: str) -> None:
    text = (REPO / name).read_text()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text) if "://" not in t}
    assert targets, f"{name} links nowhere"
    missing = sorted(t for t in targets if t and not (REPO / t).exists())
    assert not missing, f"{name} links to missing files: {missing}"
