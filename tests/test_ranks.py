"""Keep ratio to ranks (uniform and Fisher-allocated), the break-even guard, and the SVD-risk metric."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank.linalg.ranks import allocate_ranks, break_even_rank, count_params, fisher_ranks, kept_ratio, uniform_ranks, weighted_spectrum
from lowrank.linalg.risk import rank_agreement, svd_risk

BERT_BASE_BLOCK = {"q": (768, 768), "k": (768, 768), "v": (768, 768), "o": (768, 768), "i": (3072, 768), "f": (768, 3072)}


def test_break_even_ranks_from_the_algorithms_doc() -> None:
    assert break_even_rank((768, 768)) == 384
    assert break_even_rank((3072, 768)) == math.ceil(768 * 3072 / 3840)  # 615: below it, factors save
    assert break_even_rank((384, 384)) == 192


def test_uniform_rank_reproduces_the_papers_bert_base_rank() -> None:
    shapes = {f"{layer}.{k}": s for layer in range(12) for k, s in BERT_BASE_BLOCK.items()}
    ranks = uniform_ranks(shapes, 0.495)
    assert set(ranks.values()) == {253}
    assert kept_ratio(shapes, ranks) == pytest.approx(253 * 13824 / 7077888)
    assert kept_ratio(shapes, ranks) <= 0.495 < kept_ratio(shapes, dict.fromkeys(shapes, 254))
    assert set(uniform_ranks(shapes, 0.495, rank_multiple=8).values()) == {248}


def test_layers_past_break_even_stay_dense() -> None:
    shapes = {"small": (8, 8), "big": (64, 64)}
    ranks = uniform_ranks(shapes, 0.9)
    assert ranks["small"] is None  # rank >= 4 would cost more than 8x8
    assert count_params(shapes, ranks) <= 0.9 * (64 + 4096)


def test_keep_ratio_too_small_or_out_of_range() -> None:
    with pytest.raises(ValueError, match="keep_ratio: 0.001 is too small"):
        uniform_ranks({"a": (16, 16)}, 0.001)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="keep_ratio: must be in"):
            allocate_ranks({"a": (16, 16)}, bad)


def low_and_full_rank_layers() -> tuple[dict, dict]:
    """Two 32 x 32 layers: one exactly rank 2, one random (full rank); their shapes and spectra."""
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(32, 2, generator=generator) @ torch.randn(2, 32, generator=generator)
    full = torch.randn(32, 32, generator=generator)
    return {"low": (32, 32), "full": (32, 32)}, {"low": weighted_spectrum(low), "full": weighted_spectrum(full)}


def test_fisher_allocation_spends_rank_where_the_error_is() -> None:
    shapes, spectra = low_and_full_rank_layers()
    ranks = fisher_ranks(spectra, shapes, 0.4)
    assert ranks["low"] <= 3 < ranks["full"]
    assert kept_ratio(shapes, ranks) <= 0.4
    # total weighted error below uniform's at the same budget
    uniform = uniform_ranks(shapes, 0.4)

    def error(r):
        return sum(spectra[n][r[n]:].sum().item() for n in shapes if r[n] is not None)

    assert error(ranks) < error(uniform)


def test_fisher_allocation_floor_keeps_a_share_of_the_uniform_rank() -> None:
    shapes, spectra = low_and_full_rank_layers()
    uniform = uniform_ranks(shapes, 0.4)["low"]
    ranks = fisher_ranks(spectra, shapes, 0.4, min_rank_share=0.5)
    assert ranks["low"] == uniform // 2  # the floor binds: the greedy spend would give it 2 or 3
    assert ranks["full"] > uniform and kept_ratio(shapes, ranks) <= 0.4
    assert allocate_ranks(shapes, 0.4, "fisher", spectra=spectra, min_rank_share=1.0) == uniform_ranks(shapes, 0.4)
    with pytest.raises(ValueError, match="min_rank_share"):
        fisher_ranks(spectra, shapes, 0.4, min_rank_share=1.5)


def test_weighted_spectrum_sums_to_the_truncation_error() -> None:
    weight = torch.randn(10, 6, dtype=torch.float64)
    values = weighted_spectrum(weight)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    truncated = (u[:, :2] * s[:2]) @ vh[:2]
    assert values[2:].sum().item() == pytest.approx((weight - truncated).square().sum().item())


def test_svd_risk_known_values() -> None:
    assert svd_risk(torch.ones(4, 4)) == pytest.approx(0.0)
    spike = torch.zeros(4, 4)
    spike[0, 0] = 1.0
    # normalised entries: one 1 and fifteen 0 -> variance 1/16 - 1/256
    assert svd_risk(spike) == pytest.approx(1 / 16 - 1 / 256)
    assert svd_risk(spike, size_invariant=True) == pytest.approx(16 * (1 / 16 - 1 / 256))
    assert rank_agreement({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.1, "b": 0.2, "c": 0.3}) == pytest.approx(1.0)
    assert rank_agreement({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.3, "b": 0.2, "c": 0.1}) == pytest.approx(-1.0)
