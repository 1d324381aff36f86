"""The demo's PNG plots: harm against retain perplexity (per method and along training) and one U2A run's refreshes
by kind of negative."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from ..plots import plot_objective
from .common import mean_std
from .config import DPO_METHODS, KINDS, LOSSES, SETTINGS

_COLORS = {
    "uniform": "tab:gray",
    "random": "tab:olive",
    "oracle": "tab:green",
    "u2a": "tab:red",
    "u2a-select": "tab:blue",
    "u2a-fisher": "tab:brown",
    "dpo": "tab:purple",
    "dpo-pairs": "tab:pink",
}
_MARKERS = {"ga": "o", "npo": "s", "simnpo": "^", "dpo": "D"}


def make_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the PNG plots; returns their paths relative to `out_dir`."""
    matplotlib.use("Agg")
    paths = [
        plot_harm_vs_ppl(results["summary"], out_dir / "harm_vs_ppl.png"),
        plot_trajectories(results["runs"], out_dir / "trajectories.png"),
    ]
    run = _trace_run(results)
    if run is not None:
        kinds = results["kinds"][str(run["seed"])]
        trace = read_trace(out_dir / run["trace"]) if run.get("trace") else []
        paths.append(plot_refreshes_by_kind(run, trace, kinds, out_dir / "refreshes.png"))
    return [os.path.relpath(p, out_dir) for p in paths]


def _trace_run(results: dict[str, Any]) -> dict[str, Any] | None:
    """The U2A run whose refreshes are plotted: the first seed, LoRA if run (where in-training scores act), lowest
    learning rate, NPO if run."""
    candidates = [r for r in results["runs"] if r["method"] == "u2a" and (r.get("history") or r.get("trace"))]
    if not candidates:
        return None
    return min(
        candidates, key=lambda r: (r["seed"], r.get("setting") != "lora", r["lr"], r["loss"] != "npo", r["loss"])
    )


def plot_harm_vs_ppl(summary: list[dict[str, Any]], path: Path) -> Path:
    """Harmful rate against retain perplexity, one panel per setting and learning rate, one point per (loss, method);
    error bars are std over seeds; hollow markers had a collapsed run."""
    order = {s: i for i, s in enumerate(SETTINGS)}
    panels = sorted(
        {(r.get("setting", "full"), r["lr"]) for r in summary if r["lr"] is not None},
        key=lambda p: (order.get(p[0], 9), p[1]),
    )
    start = next((r for r in summary if r["method"] == "start"), None)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False, sharey=True)
    for ax, (setting, lr) in zip(axes[0], panels):
        for r in (r for r in summary if r["lr"] == lr and r.get("setting", "full") == setting):
            color = _COLORS.get(r["method"], "tab:orange" if r["method"].startswith("u2a") else "black")
            marker = _MARKERS.get(r["loss"], "o")
            ax.errorbar(
                r["retain_ppl"],
                r["harmful_rate"],
                xerr=r.get("retain_ppl_std") or 0,
                yerr=r.get("harmful_rate_std") or 0,
                fmt=marker,
                color=color,
                mfc="none" if r["collapsed"] else color,
                ms=7,
                alpha=0.85,
                label=f"{r['method']} ({r['loss']})",
            )
        if start is not None:
            ax.plot(start["retain_ppl"], start["harmful_rate"], "k*", ms=14, label="start model")
        _ppl_axis(ax)
        ax.set_title(f"{setting}, learning rate {lr:g}")
        ax.set_xlabel("retain perplexity (lower = more utility)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("harmful rate of generations (judge)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle("Harm vs utility (hollow: a collapsed run; bars: std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_trajectories(runs: list[dict[str, Any]], path: Path) -> Path:
    """Harm against retain perplexity along training (every evaluation step), one row of panels per setting, one
    panel per loss, one line per method and learning rate (mean over seeds), from the start model (★) to a large dot
    at the last step. Each row has its own legend: the settings train at different learning rates, which a line style
    tells apart within a row."""
    core = ("uniform", "random", "oracle", "u2a", "u2a-select", "u2a-fisher", *DPO_METHODS)
    runs = [r for r in runs if "error" not in r]
    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in runs)]
    settings = [s for s in SETTINGS if any(r.get("setting", "full") == s for r in runs)] or ["full"]
    has_dpo = any(r["method"] in DPO_METHODS for r in runs)
    ncols = max(1, len(losses))
    fig, axes = plt.subplots(len(settings), ncols, figsize=(5.5 * ncols, 4.5 * len(settings)), squeeze=False)
    for row_axes, setting in zip(axes, settings):
        in_setting = [r for r in runs if r.get("setting", "full") == setting]
        lrs = sorted({r["lr"] for r in in_setting})
        for ax, loss in zip(row_axes, losses):
            _plot_trajectory_panel(ax, in_setting, lrs, loss, core)
            ax.set(title=f"{setting}: loss {loss}" + (" (dpo in every panel)" if has_dpo else ""))
        legend: dict[str, Any] = {}
        for ax in row_axes:
            legend.update(zip(*reversed(ax.get_legend_handles_labels())))
        row_axes[-1].legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    title = (
        "Harm vs utility along training: every line starts at the start model (★, its step-0 evaluation)\nand ends "
        "at its large dot"
    )
    if has_dpo:
        title += "; dpo also lowers the retain perplexity, so its lines may run left of ★"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


_LINE_STYLES = ("-", "--", ":", "-.")


def _plot_trajectory_panel(ax, runs, lrs, loss, core) -> None:
    """One panel of `plot_trajectories`: every method and learning rate of `loss` (and dpo), mean over seeds."""
    starts = []  # every line's step 0: the start model
    for method in core:
        for j, lr in enumerate(lrs):
            members = [r for r in runs if r["lr"] == lr and r["method"] == method]
            members = [r for r in members if r["loss"] == loss or method in DPO_METHODS]
            members = [r for r in members if r.get("trajectory")]
            if not members:
                continue
            length = min(len(r["trajectory"]) for r in members)
            xs = [mean_std([r["trajectory"][i]["retain_ppl"] for r in members])[0] for i in range(length)]
            ys = [mean_std([r["trajectory"][i]["harmful_rate"] for r in members])[0] for i in range(length)]
            starts.append((xs[0], ys[0]))
            label = method if len(lrs) == 1 else f"{method}, lr {lr:g}"
            style = _LINE_STYLES[j % len(_LINE_STYLES)]
            ax.plot(xs, ys, style, marker="o", color=_COLORS[method], lw=1.2, ms=3, alpha=0.8, label=label)
            ax.plot(xs[-1], ys[-1], "o", color=_COLORS[method], ms=7, alpha=0.9)
    if starts:
        ax.plot(*map(mean, zip(*starts)), "k*", ms=14, zorder=5, label="start model")
    _ppl_axis(ax)
    ax.set(xlabel="retain perplexity", ylabel="harmful rate")
    ax.grid(alpha=0.3)


def _ppl_axis(ax) -> None:
    """Retain perplexity on a log axis when it spans a factor of 3 or more (a collapsed run), else on a linear axis,
    whose plain tick labels stay readable (a log axis over 2.7-3.1 labels only minor ticks, in scientific form)."""
    low, high = ax.get_xlim()
    if low > 0 and high / low >= 3:
        ax.set_xscale("log")


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a `u2a_trace.jsonl` (one JSON object per line), normalised to keys `refresh`, `step`, `id`,
    `score`, `weight`."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            for alias in ("example_id", "negative_id", "index"):
                if "id" not in rec and alias in rec:
                    rec["id"] = rec[alias]
            records.append(rec)
    return records


def plot_refreshes_by_kind(run: dict[str, Any], trace: list[dict[str, Any]], kinds: Sequence[str], path: Path) -> Path:
    """Scores and weights of the negatives at each refresh of one U2A run, by kind (the demo knows each negative's
    kind), and `J` (`trl_u2a.plots.plot_objective`, as in the library's own refresh plots). Every panel counts
    optimizer steps; a refresh's tick also names it and how many negatives it scored (the initial pass scores every
    negative, a later refresh the exploration pool and the negatives trained since)."""
    colors = {"harmful": "tab:red", "low_quality": "tab:orange", "near_copy": "tab:blue"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    refreshes = sorted({rec["refresh"] for rec in trace if "refresh" in rec})
    step_of = {rec["refresh"]: rec["step"] for rec in trace if "refresh" in rec and "step" in rec}
    steps = [step_of.get(k, k) for k in refreshes]
    scored = {k: 0 for k in refreshes}
    for kind in KINDS:
        xs, ys, mass = [], [], []
        for k, step in zip(refreshes, steps):
            recs = [r for r in trace if r.get("refresh") == k and kinds[int(r["id"])] == kind]
            scores = [r["score"] for r in recs if r.get("score") is not None and math.isfinite(r["score"])]
            scored[k] += len(scores)
            xs += [step] * len(scores)  # on the refresh's own tick: the kinds differ by colour
            ys += scores
            total = sum(r.get("weight") or 0.0 for r in trace if r.get("refresh") == k)
            mass.append(sum(r.get("weight") or 0.0 for r in recs) / total if total > 0 else math.nan)
        axes[0].scatter(xs, ys, s=8, alpha=0.4, color=colors[kind], label=kind)
        axes[1].plot(steps, mass, "o-", color=colors[kind], label=kind)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set(
        title="influence scores at each refresh\n(n scored: all at the initial pass, then a pool + the trained)",
        ylabel="score s_i (> 0: predicted to help)",
    )
    axes[0].set_yscale("symlog", linthresh=_linthresh(trace))
    axes[1].set(title="share of the weight mass per kind", ylabel="share", ylim=(-0.02, 1.02))
    history = run.get("history") or []
    plot_objective(axes[2], history)
    if run.get("weights") is not None:
        w = [x for x in run["weights"] if x > 0]
        selected = f"final: {len(w)} selected, max weight {max(w, default=0):.2f}"
        axes[2].set_title(f"J at each refresh and at the end\n{selected}")
    last = max([*steps, *(r.get("step") or 0 for r in history)], default=0)
    labels = [f"{step}\nrefresh {k}\nn={scored[k]}" for k, step in zip(refreshes, steps)]
    j_steps = sorted({*steps, *(r["step"] for r in history if r.get("step") is not None)})
    for ax in axes:
        if len(refreshes) <= 12:
            ax.set_xticks(*((j_steps, [str(x) for x in j_steps]) if ax is axes[2] else (steps, labels)))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, last + 0.5)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    setting = "LoRA" if run.get("setting") == "lora" else "full fine-tuning"
    fig.suptitle(f"U2A refreshes: {run['loss']} loss, {setting}, learning rate {run['lr']:g}, seed {run['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _linthresh(trace: list[dict[str, Any]]) -> float:
    scores = sorted(abs(r["score"]) for r in trace if r.get("score") is not None and math.isfinite(r["score"]))
    positive = [s for s in scores if s > 0]
    return positive[len(positive) // 10] if positive else 1.0
