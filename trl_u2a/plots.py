"""PNG plots of a U2A run from the refresh history (matplotlib, headless)."""

from __future__ import annotations

import math
import os
from typing import Any


def plot_refreshes(history: list[dict[str, Any]], out_dir: str, top: int = 20) -> list[str]:
    """Write `objective.png` (J over steps), `weights.png` (weights of the `top` heaviest negatives across refreshes)
    and `scores.png` (histogram of the last refresh's scores) to `out_dir`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    os.makedirs(out_dir, exist_ok=True)
    paths = []

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["objective"] for r in history], marker="o")
    ax.set(xlabel="optimizer step", ylabel="alignment objective J (DPO loss)", title="J at each refresh")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and refreshes are counts: no 0.25 ticks
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


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
