"""The pipeline's figures: phi per matrix (factorize) and effective ranks per matrix (prune), written atomically."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Mapping

from lowrank.io.files import atomic_write_bytes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on the pipeline machines
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=120)
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_phi(rows: list[dict], path: str | Path) -> Path:
    """Bar chart of phi per targeted matrix, coloured by matrix type (TFWSVD Eq. 13)."""
    plt = _pyplot()
    kinds = sorted({r["type"] for r in rows})
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.25), 3.5))
    ax.bar(range(len(rows)), [r["phi"] for r in rows], color=[colours[r["type"]] for r in rows])
    blocks = [re.search(r"\.(\d+)\.", r["layer"]) for r in rows]
    ax.set_xticks(range(len(rows)), [m.group(1) if m else "" for m in blocks], fontsize=6)
    ax.set_xlabel("block of each targeted matrix (model order)")
    ax.set_ylabel("phi (SVD risk)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds], labels=kinds, fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_rank_report(reports: Mapping[str, list[dict]], path: str | Path) -> Path:
    """Plot each model's effective-rank ratios per matrix, one panel per energy (atomic write).

    Args:
        reports: `rank_report` rows by model label, e.g. dense / magnitude / movement.
        path: image file; the format follows its suffix (png, pdf, svg).
    """
    plt = _pyplot()
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
    return _save(fig, path)


def plot_pareto(
    rows: list[dict], dense_score: float | None, path: str | Path, x: str = "params_kept",
    xlabel: str = "parameters kept (targeted Linear layers)", front: list[bool] | None = None, dense_x: float | None = None,
) -> Path:
    """Score against `x` (parameters kept, or a latency), one series per method, the dense model as a line (and a
    point where its `x` is known), the Pareto front (`front`, default the rows' `pareto`) circled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r[x])
        ax.plot([r[x] for r in mine], [r["score"] for r in mine], marker="o", label=method)
    marks = front if front is not None else [r["pareto"] for r in rows]
    on_front = [r for r, mark in zip(rows, marks) if mark]
    ax.scatter([r[x] for r in on_front], [r["score"] for r in on_front], s=160, facecolors="none",
               edgecolors="black", label="Pareto front")
    if dense_score is not None:
        ax.axhline(dense_score, color="grey", linestyle="--", label="dense")
        if dense_x is not None:
            ax.scatter([dense_x], [dense_score], marker="*", s=120, color="grey")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("task score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))
