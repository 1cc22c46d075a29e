"""Plots of a run, written as PNG files with matplotlib (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: Path,
    records: list[dict],
    panels: Sequence[tuple[str | tuple[str, ...], str, str]],
    *,
    title: str = "",
) -> None:
    """One panel per ``(keys, label, scale)``, each key against ``step`` (a legend where a panel
    has several); scale: ``"linear"``, ``"log"`` or ``"percent"``."""
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (keys, label, scale) in zip(axes[0], panels, strict=True):
        keys = (keys,) if isinstance(keys, str) else keys
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o", markersize=3, label=key.replace("_", " "))
        if len(keys) > 1:
            ax.legend(fontsize=8)
        if scale == "log":
            ax.set_yscale("log")
        elif scale == "percent":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
