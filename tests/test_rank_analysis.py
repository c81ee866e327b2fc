"""Effective and stable rank against matrices with known spectra, and the comparison plot."""

from __future__ import annotations

import pytest
import torch

from lowrank.linalg.spectra import effective_rank, rank_report, stable_rank, tail_share
from lowrank.pipeline.plots import plot_rank_report


def with_singular_values(values: list[float], rows: int = 9, cols: int = 7, seed: int = 0) -> torch.Tensor:
    """A `(rows, cols)` matrix whose singular values are exactly `values` (rest zero)."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    k = len(values)
    return left[:, :k] @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ right[:, :k].T


def test_rank_three_matrix_has_effective_rank_three() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 3, generator=generator) @ torch.randn(3, 15, generator=generator)
    assert effective_rank(weight, energy=0.999) == 3
    assert 1 <= effective_rank(weight, energy=0.5) <= 3


def test_effective_rank_of_known_spectrum() -> None:
    weight = with_singular_values([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of 15
    assert effective_rank(weight, 0.5) == 1
    assert effective_rank(weight, 0.8) == 2  # 13/15 >= 0.8 > 9/15
    assert effective_rank(weight, 0.9) == 3  # 14/15 >= 0.9 > 13/15
    assert effective_rank(weight, 0.99) == 4


def test_stable_rank_of_known_spectrum() -> None:
    assert stable_rank(with_singular_values([4.0, 2.0, 1.0])) == pytest.approx(21 / 16)
    assert stable_rank(torch.eye(5)) == pytest.approx(5.0)


def test_zero_matrix_and_bad_energy() -> None:
    assert effective_rank(torch.zeros(4, 3)) == 0
    assert stable_rank(torch.zeros(4, 3)) == 0.0
    with pytest.raises(ValueError, match="energy"):
        effective_rank(torch.eye(3), energy=0.0)
    with pytest.raises(ValueError, match="energy"):
        rank_report({"w": torch.eye(3)}, energies=(1.5,))


def test_rank_report_rows() -> None:
    pruned = torch.eye(6, 4)
    pruned[0, 0] = 0.0
    rows = rank_report({"a": with_singular_values([3.0, 2.0, 1.0, 1.0]), "b": pruned}, energies=(0.8, 0.99))
    a, b = rows
    assert a["name"] == "a" and (a["rows"], a["cols"], a["full_rank"]) == (9, 7, 7)
    assert a["effective_rank_0.8"] == 2 and a["effective_rank_0.8_ratio"] == pytest.approx(2 / 7)
    assert a["effective_rank_0.99"] == 4
    assert a["stable_rank"] == pytest.approx(15 / 9) and a["stable_rank_ratio"] == pytest.approx(15 / 9 / 7)
    assert a["break_even_rank"] == pytest.approx(63 / 16)
    assert b["density"] == pytest.approx(3 / 24) and b["effective_rank_0.99"] == 3


def test_tail_share_of_known_spectrum_and_in_the_report() -> None:
    matrix = with_singular_values([3.0, 2.0, 1.0, 1.0])
    assert tail_share(matrix, 2) == pytest.approx(2 / 15)  # (1 + 1) / (9 + 4 + 1 + 1)
    assert tail_share(matrix, 4) == pytest.approx(0.0, abs=1e-12)
    rows = rank_report({"a": matrix, "b": torch.eye(3)}, energies=(), ranks={"a": 1})
    assert rows[0]["tail_share"] == pytest.approx(6 / 15)
    assert "tail_share" not in rows[1]  # b has no factor rank


def test_plot_rank_report_writes_image_atomically(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = {f"layer.{i}": torch.randn(8, 6, generator=generator) for i in range(3)}
    low = {n: w[:, :2] @ w[:2] for n, w in weights.items()}
    path = plot_rank_report({"dense": rank_report(weights), "movement": rank_report(low)}, tmp_path / "plots" / "ranks.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["ranks.png"]
