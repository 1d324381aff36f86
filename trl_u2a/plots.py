"""PNG plots of a U2A run from the refresh history (matplotlib, headless).

matplotlib is optional (the `[demo]` extra): without it `plot_refreshes` warns once and draws nothing.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

try:
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
except ImportError:
    matplotlib = None

MISSING_MATPLOTLIB = (
    "save_refresh_plots=True, but matplotlib is not installed: the refresh plots are skipped. Install it with "
    '`pip install matplotlib` (or the demo extra, `pip install "trl-u2a[demo]"`), or set save_refresh_plots=False.'
)


def plot_refreshes(history: list[dict[str, Any]], out_dir: str, top: int = 20) -> list[str]:
    """Write `objective.png` (J over steps), `weights.png` (weights of the `top` heaviest negatives across refreshes)
    and `scores.png` (histogram of the last refresh's scores) to `out_dir`; returns the paths written (none, with a
    warning, when matplotlib is not installed)."""
    if matplotlib is None:
        warnings.warn(MISSING_MATPLOTLIB, stacklevel=2)
        return []
    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_objective(ax, history)
    ax.set_title("J at each refresh")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir, "objective.png"))

    with_weights = [r for r in history if "weights" in r]
    if with_weights:
        final = with_weights[-1]["weights"]
        heaviest = sorted(range(len(final)), key=lambda i: -final[i])[:top]
        fig, ax = plt.subplots(figsize=(6, 4))
        for i in heaviest:
            ax.plot([r["refresh"] for r in with_weights], [r["weights"][i] for r in with_weights], alpha=0.7)
        ax.set(
            xlabel="refresh",
            ylabel="weight ω (mean 1 over the selected)",
            title=f"Weights of the {len(heaviest)} heaviest negatives",
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir, "weights.png"))

        scores = [s for s in with_weights[-1].get("last_scores", {}).values() if math.isfinite(s)]
        if scores:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.hist(scores, bins=40)
            ax.axvline(0.0, color="k", linewidth=1)
            ax.set(
                xlabel="influence score s_i (> 0: unlearning lowers J)",
                ylabel="negatives",
                title=f"Scores at refresh {with_weights[-1]['refresh']}",
            )
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            paths.append(_save(fig, out_dir, "scores.png"))
    return paths


def plot_objective(ax, history: list[dict[str, Any]]) -> None:
    """J at each refresh record of `history` (a missing value: a gap) against the optimizer step, on integer ticks
    (steps are counts: no 0.25 ticks). Drawn by `plot_refreshes` and by the demo's refresh figure."""
    values = [r.get("objective") for r in history]
    ax.plot([r.get("step") for r in history], [math.nan if v is None else v for v in values], "o-", label="J")
    ax.set(xlabel="optimizer step", ylabel="J (DPO loss on the alignment set)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
