"""Plots of evaluation sweeps. matplotlib is optional: ``pip install "perk_fast[plot]"`` (or matplotlib).

Without it :func:`plot_sweep` raises an ImportError that names the extra, and
:func:`perk_fast.sweep` writes its table and JSON and says in one warning that the plot was skipped.
"""
from __future__ import annotations

import importlib.util

__all__ = ["plot_sweep", "plotting_available", "MISSING_MATPLOTLIB"]

MISSING_MATPLOTLIB = ('plotting needs matplotlib, which is not installed: pip install "perk_fast[plot]" '
                      "(or pip install matplotlib)")


def plotting_available() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_sweep(results, lengths, positions, path: str, metric: str = "exact_match") -> None:
    """Write ``path`` (PNG): one panel per position, ``metric`` (%) against context length per system.

    Raises ImportError naming the extra to install when matplotlib is missing.
    """
    if not plotting_available():
        raise ImportError(MISSING_MATPLOTLIB)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(positions), figsize=(4 * len(positions), 3.4), sharey=True, squeeze=False)
    styles = [("o", "-", 7), ("s", "--", 6), ("^", ":", 5), ("D", "-.", 4)]  # overlapping lines stay visible
    for ax, pos in zip(axes[0], positions):
        for i, (name, cells) in enumerate(results.items()):
            marker, line, size = styles[i % len(styles)]
            xs = [length for length in lengths if pos in cells[length]]
            ax.plot(xs, [100 * cells[length][pos][metric] for length in xs], marker=marker, linestyle=line,
                    markersize=size, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(length) for length in lengths])
        ax.set_title(f"position: {pos}")
        ax.set_xlabel("context tokens")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (%)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
