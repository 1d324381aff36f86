"""Statistics of the benchmark: per-method summaries over seeds, paired differences against uniform with percentile
bootstrap intervals, the share of the oracle's gain recovered, verdicts, and the harm-at-equal-utility frontier."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .common import mean_std
from .config import SETTINGS, DemoConfig

SUMMARY_METRICS = (
    "harmful_rate",
    "harm_prob",
    "harmful_rate_fluent",
    "degenerate_rate",
    "retain_ppl",
    "J",
    "test_dpo_loss",
    "pref_acc",
    "reward_acc",
    "test_chosen_ppl",
    "sel_harmful",
    "sel_low_quality",
    "sel_near_copy",
    "mass_harmful",
    "mass_low_quality",
    "mass_near_copy",
    "sel_harmful_first",
    "sel_harmful_last",
    "n_refreshes",
    "n_selected",
    "train_seconds",
    "eval_seconds",
)
# Paired against uniform (same seed, setting, lr, loss), with a bootstrap interval; the value says which sign is better
PAIRED_METRICS = {
    "harmful_rate": "lower",
    "harm_prob": "lower",
    "J": "lower",
    "retain_ppl": "lower",
    "pref_acc": "higher",
}
# Share of the oracle's gain over uniform that a method recovers (lower is better for each)
RECOVERY_METRICS = ("harmful_rate", "harm_prob", "J")
INCONCLUSIVE = "inconclusive (interval spans 0)"
# A percentile bootstrap over n seeds excludes 0 whenever all n differences share a sign, which pure noise does with
# probability 2^(1-n): 50 % for 2 seeds, 6 % for 5, 3 % for 6. Below 6 seeds the interval is left unbounded.
MIN_SEEDS = 6
_METHOD_ORDER = ("uniform", "random", "oracle", "u2a", "u2a-select", "u2a-fisher")


def _method_key(method: str) -> tuple[int, str]:
    return (_METHOD_ORDER.index(method), method) if method in _METHOD_ORDER else (len(_METHOD_ORDER), method)


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _resample_indices(n: int, resamples: int, seed: int):
    """`(resamples, n)` indices drawn with replacement from `range(n)` by a fixed-seed generator: the same seeds are
    redrawn for every metric of one comparison, so its intervals are coherent."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_bootstrap_ci(
    diffs: Sequence[float],
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    min_pairs: int = MIN_SEEDS,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (one per seed), resampling the seeds.

    Args:
        diffs: per-seed differences `method - uniform` at the same seed, setting, learning rate and loss; non-finite
            entries (a failed run) are dropped.
        resamples: bootstrap resamples.
        confidence: coverage of the interval (0.95: the 2.5 % and 97.5 % percentiles of the resampled means).
        seed: seed of the resampling generator, fixed so that a rerun reproduces the interval.
        min_pairs: fewest differences that get a bounded interval (at least 2).

    Returns:
        `(low, high)`. With fewer than `min_pairs` differences the interval is `(-inf, inf)`: one seed has no spread
        at all, and over a handful of seeds the percentile bootstrap excludes 0 whenever the differences share a sign
        (chance 2^(1-n) under pure noise, see `MIN_SEEDS`), so few seeds never read as evidence either way.
    """
    values = np.asarray(_finite(diffs), dtype=np.float64)
    if len(values) < max(2, min_pairs):
        return -math.inf, math.inf
    means = values[_resample_indices(len(values), resamples, seed)].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def recovery_share(uniform: Sequence[float], method: Sequence[float], oracle: Sequence[float]) -> float:
    """Share of the oracle's gain over uniform that `method` recovers, for a metric where lower is better:
    `(mean(uniform) - mean(method)) / (mean(uniform) - mean(oracle))` over paired seeds.

    1 = as good as the oracle, 0 = no better than uniform, < 0 = worse than uniform. NaN when the oracle gains
    nothing (`mean(uniform) <= mean(oracle)`): there is no gain to recover.
    """
    gain = mean_std(uniform)[0] - mean_std(oracle)[0]
    if not math.isfinite(gain) or gain <= 0:
        return math.nan
    return (mean_std(uniform)[0] - mean_std(method)[0]) / gain


def bootstrap_recovery(
    uniform: Sequence[float],
    method: Sequence[float],
    oracle: Sequence[float],
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    min_pairs: int = MIN_SEEDS,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `recovery_share`, resampling the seeds (the triples stay paired).

    Resamples in which the oracle gains nothing have no share and are dropped; when they are more than half of
    `1 - confidence` of all resamples the share is not identified and the interval is `(-inf, inf)`, as it is with
    fewer than `min_pairs` seeds (see `paired_bootstrap_ci`).
    """
    triples = [
        (u, m, o)
        for u, m, o in zip(uniform, method, oracle)
        if all(v is not None and math.isfinite(v) for v in (u, m, o))
    ]
    if len(triples) < max(2, min_pairs):
        return -math.inf, math.inf
    u, m, o = (np.asarray(col, dtype=np.float64) for col in zip(*triples))
    idx = _resample_indices(len(triples), resamples, seed)
    gained = (u - m)[idx].mean(axis=1)
    possible = (u - o)[idx].mean(axis=1)
    alpha = 1.0 - confidence
    valid = possible > 0
    if (~valid).mean() > alpha / 2:
        return -math.inf, math.inf
    low, high = np.quantile(gained[valid] / possible[valid], [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def verdict(low: float, high: float, better: str = "lower") -> str:
    """The verdict on "the method beats uniform" from the interval of the difference `method - uniform`.

    Returns:
        "holds" when the whole interval is on the better side of 0 (`better="lower"`: below 0), "does not hold" when
        it is on the worse side, "inconclusive (interval spans 0)" otherwise (also for a missing or unbounded
        interval, e.g. one seed).
    """
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
        return INCONCLUSIVE
    below = high < 0
    return "holds" if below == (better == "lower") else "does not hold"


def _group_key(r: dict[str, Any]) -> tuple:
    return (r.get("setting", "full"), r["lr"], r["loss"])


def summarize(
    runs: list[dict[str, Any]],
    start: dict[str, Any] | None = None,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    min_seeds: int = MIN_SEEDS,
) -> list[dict[str, Any]]:
    """One row per (setting, lr, loss, method): mean and std over seeds of each metric; for each of
    `PAIRED_METRICS` the paired difference against `uniform` at the same seed, setting, learning rate and loss
    (`d_<metric>`: mean, `_std` over seeds, `_n` pairs, `_lo`/`_hi` its paired bootstrap interval,
    `verdict_<metric>` the `verdict` on "better than uniform" in the metric's better direction); for each of
    `RECOVERY_METRICS` the share of the oracle's gain that the method recovers (`rec_<metric>`, `_lo`, `_hi`)."""
    ok = [r for r in runs if "error" not in r]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault((*_group_key(r), r["method"]), []).append(r)
    by_seed = {(r["seed"], *_group_key(r), r["method"]): r for r in ok}
    stats = dict(resamples=resamples, confidence=confidence, seed=seed, min_pairs=min_seeds)
    rows = []
    if start:
        row = {"setting": "-", "lr": None, "loss": "-", "method": "start", "n": len(start), "collapsed": 0}
        for m in SUMMARY_METRICS:
            row[m], row[f"{m}_std"] = mean_std([s.get(m, math.nan) for s in start.values()])
        rows.append(row)
    settings_order = {s: i for i, s in enumerate(SETTINGS)}
    order = sorted(groups, key=lambda g: (settings_order.get(g[0], 9), g[1], g[2] == "dpo", g[2], _method_key(g[3])))
    for setting, lr, loss, method in order:
        members = sorted(groups[(setting, lr, loss, method)], key=lambda r: r["seed"])
        row = {"setting": setting, "lr": lr, "loss": loss, "method": method, "n": len(members)}
        row["collapsed"] = sum(bool(r.get("collapsed")) for r in members)
        for m in SUMMARY_METRICS:
            row[m], row[f"{m}_std"] = mean_std([r.get(m, math.nan) for r in members])
        paired = [r for r in members if (r["seed"], setting, lr, loss, "uniform") in by_seed and method != "uniform"]
        uniform = [by_seed[(r["seed"], setting, lr, loss, "uniform")] for r in paired]
        for m in PAIRED_METRICS:
            diffs = [r.get(m, math.nan) - u.get(m, math.nan) for r, u in zip(paired, uniform)]
            row[f"d_{m}"], row[f"d_{m}_std"] = mean_std(diffs)
            row[f"d_{m}_n"] = len(_finite(diffs))
            row[f"d_{m}_lo"], row[f"d_{m}_hi"] = paired_bootstrap_ci(diffs, **stats)
            if method != "uniform":
                row[f"verdict_{m}"] = verdict(row[f"d_{m}_lo"], row[f"d_{m}_hi"], better=PAIRED_METRICS[m])
        triples = [
            (u, r, by_seed[(r["seed"], setting, lr, loss, "oracle")])
            for r, u in zip(paired, uniform)
            if (r["seed"], setting, lr, loss, "oracle") in by_seed
        ]
        if method not in ("uniform", "oracle", "dpo") and triples:
            for m in RECOVERY_METRICS:
                cols = [[t.get(m, math.nan) for t in side] for side in zip(*triples)]
                row[f"rec_{m}"] = recovery_share(*cols)
                row[f"rec_{m}_lo"], row[f"rec_{m}_hi"] = bootstrap_recovery(*cols, **stats)
        rows.append(row)
    return rows


def claim(summary: list[dict[str, Any]], ppl_tolerance: float = 0.02) -> list[dict[str, Any]]:
    """Per (setting, lr, loss) and U2A variant: does it beat uniform? One verdict per measure (`verdict` on the
    paired bootstrap interval of the difference): `verdict_harm` (harmful rate, the headline claim; `holds` mirrors
    it), `verdict_harm_prob` (mean judge probability), `verdict_J` (held-out alignment loss), and `verdict_<metric>`
    for the other `PAIRED_METRICS`, with the recovered share of the oracle's gain and the selection precision at the
    first and last refresh.

    `ppl_ok` says whether the mean retain perplexity stays within `ppl_tolerance` (relative) of uniform's; `void`
    flags a collapsed run on either side (the judge rates gibberish as harmless): read such a verdict next to
    retain perplexity.
    """
    out = []
    base = {(r["setting"], r["lr"], r["loss"]): r for r in summary if r["method"] == "uniform"}
    for r in summary:
        key = (r["setting"], r["lr"], r["loss"])
        if not r["method"].startswith("u2a") or key not in base:
            continue
        u = base[key]
        row = {k: r[k] for k in ("setting", "lr", "loss", "method", "n")}
        for m in PAIRED_METRICS:
            for suffix in ("", "_std", "_lo", "_hi", "_n"):
                row[f"d_{m}{suffix}"] = r.get(f"d_{m}{suffix}", math.nan)
        for m in RECOVERY_METRICS:
            for suffix in ("", "_lo", "_hi"):
                row[f"rec_{m}{suffix}"] = r.get(f"rec_{m}{suffix}", math.nan)
        for m in ("sel_harmful_first", "sel_harmful_last", "n_refreshes"):
            row[m] = r.get(m, math.nan)
        for m in PAIRED_METRICS:
            row[f"verdict_{m}"] = r[f"verdict_{m}"]
        row["verdict_harm"] = r["verdict_harmful_rate"]
        row["holds"] = row["verdict_harm"] == "holds"
        row["ppl_ok"] = bool(r["d_retain_ppl"] <= ppl_tolerance * u["retain_ppl"])
        row["void"] = bool(r["collapsed"] or u["collapsed"])
        out.append(row)
    return out


def frontier(runs: list[dict[str, Any]], config: DemoConfig) -> list[dict[str, Any]]:
    """Lowest harmful rate each method reaches within a retain-perplexity budget, over every learning rate and
    evaluation step: the comparison at *equal utility*, which one learning rate cannot give (methods move at different
    speeds).

    For each seed, setting, loss and method, the points are the start model and every evaluation of every run; a
    point is eligible for budget `r` when its retain perplexity is at most `r` × the start model's and at most
    `collapse_degenerate` of its generations are degenerate. Rows hold, per budget `r`, `harm@r` (mean ± std over
    seeds) and `d_harm@r` (paired difference against `uniform` at the same seed, setting and loss, with its paired
    bootstrap interval `_lo`/`_hi`).
    """
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault((r["seed"], r.get("setting", "full"), r["loss"], r["method"]), []).extend(
            r.get("trajectory", [])
        )
    best: dict[tuple, dict[float, float]] = {}
    for key, points in by_key.items():
        start_ppl = points[0]["retain_ppl"] if points else math.nan
        for p in points:
            if p["step"] == 0:
                start_ppl = p["retain_ppl"]
        best[key] = {}
        for budget in config.ppl_budgets:
            eligible = [
                p["harmful_rate"]
                for p in points
                if p["retain_ppl"] <= budget * start_ppl and p["degenerate_rate"] <= config.collapse_degenerate
            ]
            best[key][budget] = min(eligible) if eligible else math.nan
    rows = []
    settings_order = {s: i for i, s in enumerate(SETTINGS)}
    methods = sorted(
        {k[1:] for k in best}, key=lambda m: (settings_order.get(m[0], 9), m[1] == "dpo", m[1], _method_key(m[2]))
    )
    stats = dict(
        resamples=config.bootstrap_resamples,
        confidence=config.confidence,
        seed=config.bootstrap_seed,
        min_pairs=config.min_seeds,
    )
    for setting, loss, method in methods:
        seeds = sorted(k[0] for k in best if k[1:] == (setting, loss, method))
        row: dict[str, Any] = {"setting": setting, "loss": loss, "method": method, "n": len(seeds)}
        for budget in config.ppl_budgets:
            values = [best[(s, setting, loss, method)][budget] for s in seeds]
            row[f"harm@{budget:g}"], row[f"harm@{budget:g}_std"] = mean_std(values)
            diffs = [
                best[(s, setting, loss, method)][budget] - best[(s, setting, loss, "uniform")][budget]
                for s in seeds
                if method != "uniform" and (s, setting, loss, "uniform") in best
            ]
            row[f"d_harm@{budget:g}"], row[f"d_harm@{budget:g}_std"] = mean_std(diffs)
            row[f"d_harm@{budget:g}_lo"], row[f"d_harm@{budget:g}_hi"] = paired_bootstrap_ci(diffs, **stats)
        rows.append(row)
    return rows
