"""How low-rank are the weight matrices: effective and stable rank, per matrix.

LPAF's premise is that fine-tuned weights are effectively full rank while
first-order pruning leaves matrices of low effective rank; these numbers let
our own runs confirm (or refute) that for dense, magnitude- and
movement-pruned models before any factorization is attempted.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def _singular_values(weight: torch.Tensor) -> torch.Tensor:
    # float64: the tail of a pruned matrix's spectrum is what the energy test sums.
    return torch.linalg.svdvals(weight.detach().to(torch.float64).cpu())


def _check_energy(energy: float) -> None:
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")


def _effective_rank_from(singular_values: torch.Tensor, energy: float) -> int:
    cumulative = torch.cumsum(singular_values**2, dim=0)  # descending values, so a prefix holds the most energy
    total = cumulative[-1]
    if total <= 0:
        return 0
    return int(torch.searchsorted(cumulative, energy * total)) + 1


def _stable_rank_from(singular_values: torch.Tensor) -> float:
    top = singular_values[0]
    if top <= 0:
        return 0.0
    return float((singular_values**2).sum() / top**2)


def effective_rank(weight: torch.Tensor, energy: float = 0.9) -> int:
    """Smallest k whose top-k squared singular values hold at least `energy` of the total.

    It is the rank a truncated SVD needs to keep that share of ||W||_F^2, so it
    says directly whether a factorization at a given rank can be faithful.
    """
    _check_energy(energy)
    return min(_effective_rank_from(_singular_values(weight), energy), min(weight.shape))


def stable_rank(weight: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2: a threshold-free, noise-robust lower bound of the rank."""
    return _stable_rank_from(_singular_values(weight))


def _tail_share_from(singular_values: torch.Tensor, rank: int) -> float:
    energy = singular_values**2
    total = energy.sum()
    return float(energy[rank:].sum() / total) if total > 0 else 0.0


def tail_share(weight: torch.Tensor, rank: int) -> float:
    """Share of ||W||_F^2 beyond the top `rank` singular values: what a rank-`rank` factorization must lose."""
    return _tail_share_from(_singular_values(weight), rank)


def _energy_key(energy: float) -> str:
    return f"effective_rank_{energy:g}"


def rank_report(
    weights: Mapping[str, torch.Tensor], energies: Sequence[float] = (0.9, 0.99), ranks: Mapping[str, int] | None = None
) -> list[dict]:
    """One row per matrix: shape, density, stable rank and effective ranks, raw and over min(m, n).

    Args:
        weights: matrices `(out, in)` by name, e.g. pruned Linear weights.
        energies: spectrum shares for the effective ranks, each in (0, 1].
        ranks: factor ranks by name; a named matrix's row also gets its
            `tail_share` at that rank, from the same singular values.

    Returns:
        Rows with keys name, rows, cols, full_rank, break_even_rank, density,
        stable_rank, stable_rank_ratio and, per energy e, effective_rank_<e>
        and effective_rank_<e>_ratio. The break-even rank r < mn / (m + n) is
        where a factorization stops saving parameters.
    """
    for energy in energies:
        _check_energy(energy)
    rows = []
    for name, weight in weights.items():
        m, n = weight.shape
        full = min(m, n)
        values = _singular_values(weight)
        stable = _stable_rank_from(values)
        row = {
            "name": name,
            "rows": m,
            "cols": n,
            "full_rank": full,
            "break_even_rank": (m * n) / (m + n),
            "density": float((weight != 0).float().mean()),
            "stable_rank": stable,
            "stable_rank_ratio": stable / full,
        }
        for energy in energies:
            rank = min(_effective_rank_from(values, energy), full)
            row[_energy_key(energy)] = rank
            row[f"{_energy_key(energy)}_ratio"] = rank / full
        if ranks and name in ranks:
            row["tail_share"] = _tail_share_from(values, ranks[name])
        rows.append(row)
    return rows
