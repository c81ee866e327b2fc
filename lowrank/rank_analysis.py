"""How low-rank are the weight matrices: effective and stable rank, per matrix.

LPAF's premise is that fine-tuned weights are effectively full rank while
first-order pruning leaves matrices of low effective rank; these numbers let
our own runs confirm (or refute) that for dense, magnitude- and
movement-pruned models before any factorization is attempted.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .io import atomic_write_bytes


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


def plot_rank_report(reports: Mapping[str, list[dict]], path: str | Path) -> Path:
    """Plot each model's effective-rank ratios per matrix, one panel per energy (atomic write).

    Args:
        reports: `rank_report` rows by model label, e.g. dense / magnitude / movement.
        path: image file; the format follows its suffix (png, pdf, svg).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on the pipeline machines
    import matplotlib.pyplot as plt

    if not reports:
        raise ValueError("plot_rank_report needs at least one report")
    path = Path(path)
    first = next(iter(reports.values()))
    keys = [k for k in first[0] if k.startswith("effective_rank_") and k.endswith("_ratio")] + ["stable_rank_ratio"]
    names = [row["name"] for row in first]
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(6.0, 0.25 * len(names)), 2.8 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for label, rows in reports.items():
            by_name = {row["name"]: row[key] for row in rows}
            ax.plot(range(len(names)), [by_name.get(n, float("nan")) for n in names], marker="o", ms=3, label=label)
        ax.set_ylabel(key.replace("_ratio", "\n/ min(m, n)"), fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xticks(range(len(names)))
    axes[-1, 0].set_xticklabels(names, rotation=90, fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
