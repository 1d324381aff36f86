"""Selection and per-example weights of the negatives: the outer step of U2A (docs/method.md, "Selection and the
tempered mirror-ascent update").

Pure tensor code: it knows nothing of models, data loaders or TRL. The negatives are indexed `0..n-1`; the state
lives on the CPU in float64, so that a refresh is cheap, exact enough to compare bitwise, and checkpointable.

One refresh, given the influence scores `s_i = ∇Jᵀ P⁻¹ ∇ℓ_i` of this refresh's candidates:

1. Ranking. A selection only compares scores taken with the same query vector `v` (same `∇J`, same
   preconditioner): the candidates are the examples scored with the query of this ranking. Previously selected
   examples that are not candidates are *carried*: their last score was taken with another `v` (35-47x apart in
   scale between an identity and an Adam `v`), so they are not ranked against the candidates; they stay selected
   with their weight (no update: `z_i = 0`) and take their budget slots first. Selected examples that were never
   scored are dropped, and unselected examples that were not rescored are never revived from old scores.
2. Selection. Keep the carried examples and the top-`(k − carried)` candidates among those with `s_i > 0` (ties:
   lower index first); everything else gets `ω = 0`. New entrants start at the mean weight of the previously
   selected examples that stay selected (1.0 if there are none).
3. Tempered mirror ascent over the selected set `S` on the predicted gain `Σ ω_i s_i − ρ Σ √ω_i`:
   `z_i = clip((g_i − mean_S(g)) / std_S(g), −c, c)` with `g_i = s_i − ρ / (2 √ω_i)`, `ω_i ← ω_i exp(η_w z_i)`,
   renormalise to mean 1 over `S`, then cap at `max_weight` (× the mean, which is 1) by water-filling. `η_w = 0` is
   selection only: every selected example gets weight 1.

   The scores are centred before clipping, as docs/method.md writes (the method's own specification writes
   `clip(s_i / std(s), −c, c)`; docs/method.md, "Centring before the clip", says why). Without the clip the
   centring changes nothing, since renormalising removes any common factor `exp(η_w m / std)`. With it, the
   uncentred form is degenerate exactly where it matters: after selection every `s_i > 0`, so when the selected
   scores sit far from 0 relative to their spread (e.g. the top third of a bell curve, or scores in `[1, 2]`), every
   `s_i / std` exceeds `c`, all are clipped to `c`, and the weights never move. Centred, the clip bounds deviations
   from the typical selected score, which is what tempering heavy tails means.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

_DTYPE = torch.float64
_MAX_IDS_IN_ERRORS = 10


_BUDGET_FORMS = "a fraction in (0, 1] or a whole count above 1"


def check_budget(budget: float) -> float:
    """The budget as a float, if it has one of its two forms (`budget_size`): the one check that `U2AConfig` and
    `budget_size` run.

    Raises:
        ValueError: for a bool or a non-number, or a budget that is 0, negative, NaN, infinite or a non-whole number
            above 1.
    """
    # bool is an int in Python; `budget=True` is almost surely a mistake, not "select all".
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget={budget!r} is not a number; pass {_BUDGET_FORMS}.")
    value = float(budget)
    if math.isnan(value) or value <= 0.0:
        raise ValueError(f"budget={budget!r} selects nothing; pass {_BUDGET_FORMS}.")
    if value > 1.0 and (math.isinf(value) or value != math.floor(value)):
        raise ValueError(
            f"budget={budget!r} is above 1 but not a whole count; pass {_BUDGET_FORMS}: e.g. "
            f"{max(round(value), 2) if math.isfinite(value) else 100} (negatives) or 0.5 (a fraction; 1 means all)."
        )
    return value


def budget_size(budget: float, n: int) -> int:
    """Number of negatives to select, `k`, from a budget: the one rule that the trainer, the demo and the CLI use.

    Args:
        budget: a number in `(0, 1]` is a fraction of `n` (so `1` and `1.0` select every negative), rounded half up
            and at least 1; a whole number above 1 is a count, at most `n`.
        n: number of negatives.

    Returns:
        `k`, with `1 ≤ k ≤ n`.

    Raises:
        ValueError: for `n < 1`, a budget that `check_budget` refuses, or a count above `n`.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int, the number of negatives.")
    value = check_budget(budget)
    if value <= 1.0:
        # Half up rather than Python's banker's rounding: the documented rule, independent of parity.
        return max(1, min(n, math.floor(value * n + 0.5)))
    if value > n:
        raise ValueError(f"budget={int(value)} is larger than the {n} negatives; pass a fraction in (0, 1] or a whole "
                         f"count in [2, {n}].")  # fmt: skip
    return int(value)


def _as_weights(weights: Any, name: str = "weights") -> torch.Tensor:
    """Validate a 1-D vector of non-negative finite weights; returns a float64 CPU copy."""
    w = torch.as_tensor(weights).detach().to(device="cpu", dtype=_DTYPE).clone()
    if w.dim() != 1:
        raise ValueError(f"{name} must be 1-D, shape (n,); got shape {tuple(w.shape)}.")
    bad = ~torch.isfinite(w) | (w < 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite and non-negative; {name}[{i}]={w[i].item()!r} "
            f"({int(bad.sum())} bad value(s) in all)."
        )
    return w


@dataclass
class WeightState:
    """Weights and last scores of the `n` negatives, carried across refreshes.

    Attributes:
        weights: `(n,)` float64, `ω_i ≥ 0`; 0 means not selected (no training compute).
        scores: `(n,)` float64, the last influence score of each example; NaN means never scored.
        refresh: number of weight updates applied so far (a skipped refresh applies none, so this is not a refresh id).
    """

    weights: torch.Tensor
    scores: torch.Tensor
    refresh: int = 0

    def __post_init__(self) -> None:
        self.weights = _as_weights(self.weights)
        self.scores = torch.as_tensor(self.scores).detach().to(device="cpu", dtype=_DTYPE).clone()
        if self.scores.shape != self.weights.shape:
            raise ValueError(
                f"scores has shape {tuple(self.scores.shape)} but weights has {tuple(self.weights.shape)}; "
                "both must be (n,)."
            )
        if torch.isinf(self.scores).any():
            raise ValueError("scores must be finite or NaN (never scored); got an infinite score.")
        self.refresh = int(self.refresh)

    @classmethod
    def uniform(cls, n: int) -> WeightState:
        """All `n` negatives selected with weight 1, none scored: plain uniform unlearning until the first refresh."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n={n!r} must be a positive int, the number of negatives.")
        return cls(torch.ones(n, dtype=_DTYPE), torch.full((n,), math.nan, dtype=_DTYPE), 0)

    @classmethod
    def from_initial(cls, weights: Any) -> WeightState:
        """Start from given weights `(n,)` (kept as given, not renormalised), none scored.

        Raises:
            ValueError: naming the first negative or non-finite weight, its index and value.
        """
        w = _as_weights(weights)
        if w.numel() < 1:
            raise ValueError("weights is empty; there must be at least one negative.")
        return cls(w, torch.full_like(w, math.nan), 0)

    @property
    def n(self) -> int:
        """Number of negatives."""
        return self.weights.numel()

    @property
    def selected(self) -> torch.Tensor:
        """`(n,)` bool mask of the selected examples, `ω_i > 0`."""
        return self.weights > 0

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints for a checkpoint (copies, so later refreshes do not alias them)."""
        return {"weights": self.weights.clone(), "scores": self.scores.clone(), "refresh": int(self.refresh)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from `state_dict()` in place.

        Raises:
            ValueError: when keys are missing or the checkpoint has a different number of negatives than this state
                (the negatives changed between saving and resuming, so the indices no longer match).
        """
        missing = [key for key in ("weights", "scores", "refresh") if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}; expected the keys 'weights', 'scores', 'refresh'.")
        loaded = WeightState(state_dict["weights"], state_dict["scores"], state_dict["refresh"])
        if loaded.n != self.n:
            raise ValueError(
                f"the checkpoint holds weights for {loaded.n} negatives but this run has {self.n}; "
                "the negatives must be the same examples in the same order to resume."
            )
        self.weights, self.scores, self.refresh = loaded.weights, loaded.scores, loaded.refresh


def weight_entropy(weights: torch.Tensor) -> float:
    """Shannon entropy (nats) of `weights / Σ weights`, `(n,)` → float.

    `log(|S|)` for uniform weights on a set `S`, lower when concentrated; 0.0 when nothing is selected.
    """
    w = _as_weights(weights)
    total = w.sum()
    if total <= 0:
        return 0.0
    p = w[w > 0] / total
    return float(-(p * p.log()).sum())


def _validate_candidates(n: int, candidate_ids: Any, candidate_scores: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(candidate_ids).detach().to("cpu")
    scores = torch.as_tensor(candidate_scores).detach().to(device="cpu", dtype=_DTYPE)
    if ids.dim() != 1 or scores.dim() != 1 or ids.numel() != scores.numel():
        raise ValueError(
            f"candidate_ids and candidate_scores must be 1-D of the same length (m,); got shapes "
            f"{tuple(ids.shape)} and {tuple(scores.shape)}."
        )
    if ids.numel() == 0:
        return ids.to(torch.long), scores
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"candidate_ids must be integer indices into the {n} negatives; got dtype {ids.dtype}.")
    ids = ids.to(torch.long)
    out = (ids < 0) | (ids >= n)
    if out.any():
        raise ValueError(
            f"candidate_ids must lie in [0, {n}); got {ids[out][:_MAX_IDS_IN_ERRORS].tolist()} "
            f"({int(out.sum())} out of range)."
        )
    if torch.unique(ids).numel() != ids.numel():
        uniq, counts = torch.unique(ids, return_counts=True)
        raise ValueError(f"candidate_ids has duplicates: {uniq[counts > 1][:_MAX_IDS_IN_ERRORS].tolist()}.")
    bad = ~torch.isfinite(scores)
    if bad.any():
        bad_ids = ids[bad].tolist()
        shown = bad_ids[:_MAX_IDS_IN_ERRORS]
        more = f" and {len(bad_ids) - len(shown)} more" if len(bad_ids) > len(shown) else ""
        raise ValueError(
            f"{len(bad_ids)} of {ids.numel()} candidate scores are NaN or infinite, for negatives {shown}{more}; "
            "the scores are unusable (skip this refresh, or check the alignment loss and the learning rate)."
        )
    return ids, scores


def _cap_to_mean_one(w: torch.Tensor, cap: float) -> torch.Tensor:
    """Water-filling: the weights `min(cap, λ w)` with mean 1, for `w > 0`, `(|S|,)` → `(|S|,)`.

    Capping and renormalising once lifts the capped weights above the cap again, and repeating only converges in the
    limit. Instead fix the set `C` of capped entries, scale the others by `λ = (|S| − |C| cap) / Σ_{i∉C} w_i`, add
    any that now exceed the cap to `C` and repeat: `C` only grows, so this ends after at most `|S|` rounds and holds
    the cap and the mean exactly (up to rounding). Needs `cap ≥ 1` for mean 1 to be reachable.
    """
    size = w.numel()
    if math.isinf(cap) or size == 0:
        return w
    capped = torch.zeros(size, dtype=torch.bool)
    out = w
    for _ in range(size):
        free = ~capped
        free_sum = w[free].sum()
        if free_sum <= 0:  # everything capped: only possible for cap == 1, where all weights are 1
            break
        lam = (size - capped.sum().item() * cap) / free_sum
        out = torch.where(capped, torch.full_like(w, cap), w * lam)
        over = free & (out > cap)
        if not over.any():
            break
        capped |= over
    return torch.where(capped, torch.full_like(w, cap), out)


def refresh_weights(
    state: WeightState,
    candidate_ids: torch.Tensor,
    candidate_scores: torch.Tensor,
    k: int,
    weight_lr: float = 0.2,
    score_clip: float = 2.0,
    max_weight: float = 4.0,
    sparsity: float = 0.0,
) -> tuple[WeightState, dict[str, float]]:
    """One refresh: rank, select the top-`k` positive scores, update the weights by tempered mirror ascent.

    Args:
        state: the current state; not modified.
        candidate_ids: `(m,)` int, distinct indices of the negatives scored with this ranking's query vector (all of
            them at refresh 0; later the selected ones scored with it plus an exploration pool).
        candidate_scores: `(m,)` their influence scores `s_i`; `s_i > 0` predicts that unlearning example `i`
            lowers the alignment loss `J`.
        k: selection budget (see `budget_size`), `1 ≤ k ≤ n`.
        weight_lr: `η_w ≥ 0`, the mirror-ascent step; 0 is selection only (weight 1 on every selected example).
        score_clip: `c > 0`; a centred, standardised score is clipped to `[−c, c]`, so one refresh changes the ratio
            of two weights by at most `exp(2 η_w c)` before the cap (scores are heavy-tailed; untempered updates put
            all the weight on one outlier).
        max_weight: cap on a weight as a multiple of the mean weight (1), `≥ 1`; `inf` disables it here (for a study
            of the update alone: `U2AConfig` asks for a finite cap, since untempered outliers take all the weight).
        sparsity: `ρ ≥ 0`, the `ℓ_1/2` penalty `ρ Σ √ω_i`, in score units. It enters the step as the effective score
            `s_i − ρ / (2 √ω_i)`, which pushes already-small weights further down.

    Returns:
        `(new_state, info)`. `new_state.scores` holds the candidates' new scores and everyone else's last score;
        `new_state.refresh` is one more (it counts the weight updates applied; a refresh that is skipped applies none,
        so the refresh's id is its caller's counter, not this one). Selected examples that were not rescored are
        carried (kept, weight unchanged before the renormalisation, not ranked: their last score was taken with
        another query); if they were never scored they are dropped. `info` (python floats/ints, for logging):
        `n_candidates`, `n_stale` (selected, not rescored), `n_carried` (of those, kept), `n_selected`, `n_new`,
        `n_dropped`, `n_positive`, `fraction_positive`, `score_min`, `score_q25`, `score_median`, `score_q75`,
        `score_max` (of the candidates), `score_scale` (mean `|s|` of the candidates: near 0 means the gradients
        vanished, e.g. memorised negatives), `score_std`, `entropy` and `effective_n` (`exp(entropy)`) of the new
        weights, `weight_max`, `weight_min` (over the selected), `fraction_clipped`, and
        `predicted_gain = Σ ω_i s_i / Σ ω_i` over the new selection's candidates (this query's scores), the
        first-order decrease of `J` per unit step of the weighted unlearning loss.

    Raises:
        ValueError: for bad arguments, ids out of range or repeated, or NaN/infinite scores (naming how many and
            which ids; the caller decides to skip the refresh).
    """
    n = state.n
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an int in [1, {n}]; convert a budget with budget_size(budget, n).")
    for name, value, low, closed in (
        ("weight_lr", weight_lr, 0.0, True),
        ("score_clip", score_clip, 0.0, False),
        ("sparsity", sparsity, 0.0, True),
    ):
        if not (math.isfinite(value) and (value >= low if closed else value > low)):
            raise ValueError(f"{name}={value!r} must be finite and {'≥' if closed else '>'} {low}.")
    if math.isnan(max_weight) or max_weight < 1.0:
        raise ValueError(f"max_weight={max_weight!r} must be ≥ 1 (a multiple of the mean weight 1) or inf.")
    ids, cand_scores = _validate_candidates(n, candidate_ids, candidate_scores)

    old_selected = state.weights > 0
    scores = state.scores.clone()
    scores[ids] = cand_scores
    is_candidate = torch.zeros(n, dtype=torch.bool)
    is_candidate[ids] = True
    stale = old_selected & ~is_candidate
    # Carried: selected, not rescored, with a last score from another query: kept as they are, never ranked against
    # the candidates. Ranked: the candidates alone, one query, one scale; eligible with a positive score.
    carried = stale & ~torch.isnan(scores)
    new_selected = _select(scores, is_candidate, carried, k)
    new_weights, fraction_clipped = _mirror_ascent(
        state.weights, scores, new_selected, carried, weight_lr, score_clip, max_weight, sparsity
    )
    new_state = WeightState(new_weights, scores, state.refresh + 1)
    info = _refresh_info(
        cand_scores, scores, state.weights, new_weights, new_selected, carried, stale, fraction_clipped
    )
    return new_state, info


def _select(scores: torch.Tensor, is_candidate: torch.Tensor, carried: torch.Tensor, k: int) -> torch.Tensor:
    """`(n,)` bool: the carried examples and the top-`(k − carried)` candidates with a positive score."""
    slots = max(0, k - int(carried.sum()))
    eligible_ids = (is_candidate & (scores > 0)).nonzero().flatten()  # ascending index
    # Stable descending sort keeps equal scores in ascending-index order: deterministic ties, lower index first.
    order = torch.sort(scores[eligible_ids], descending=True, stable=True).indices
    new_selected = carried.clone()
    new_selected[eligible_ids[order[:slots]]] = True
    return new_selected


def _mirror_ascent(
    old_weights: torch.Tensor,
    scores: torch.Tensor,
    new_selected: torch.Tensor,
    carried: torch.Tensor,
    weight_lr: float,
    score_clip: float,
    max_weight: float,
    sparsity: float,
) -> tuple[torch.Tensor, float]:
    """The new weights `(n,)` of the selection (0 elsewhere) and the fraction of ranked scores clipped."""
    n = old_weights.numel()
    sel = new_selected.nonzero().flatten()  # ascending index, so the update below is order-independent of `k`
    old_selected = old_weights > 0
    kept = new_selected & old_selected
    entrants = new_selected & ~old_selected
    start = float(old_weights[kept].mean()) if kept.any() else 1.0

    new_weights = torch.zeros(n, dtype=_DTYPE)
    fraction_clipped = 0.0
    if sel.numel() == 0:
        return new_weights, fraction_clipped
    if weight_lr == 0.0:
        # Selection only: carried weights would encode past updates that η_w = 0 asks not to make.
        new_weights[sel] = 1.0
        return new_weights, fraction_clipped
    w = torch.where(entrants[sel], torch.full((sel.numel(),), start, dtype=_DTYPE), old_weights[sel])
    # Mirror ascent (exponentiated gradient) on Σ ω s − ρ Σ √ω: the gradient is the effective score g,
    # standardised over the ranked examples; a carried one has no score under this query, so no step.
    ranked = ~carried[sel]
    g = scores[sel][ranked]
    if sparsity > 0.0:
        g = g - sparsity / (2.0 * w[ranked].sqrt())
    # Population std: defined (0) for one example; centred before the clip (see the module docstring).
    std = g.std(correction=0) if g.numel() > 1 else torch.zeros((), dtype=_DTYPE)
    z = torch.zeros_like(w)
    if std > 0 and torch.isfinite(std):
        raw = (g - g.mean()) / std
        z[ranked] = raw.clamp(-score_clip, score_clip)
        fraction_clipped = float((raw.abs() > score_clip).to(_DTYPE).mean())
    w = w * torch.exp(weight_lr * z)
    w = w * (w.numel() / w.sum())
    new_weights[sel] = _cap_to_mean_one(w, float(max_weight))
    return new_weights, fraction_clipped


def _refresh_info(
    cand_scores: torch.Tensor,
    scores: torch.Tensor,
    old_weights: torch.Tensor,
    new_weights: torch.Tensor,
    new_selected: torch.Tensor,
    carried: torch.Tensor,
    stale: torch.Tensor,
    fraction_clipped: float,
) -> dict[str, float]:
    """`refresh_weights`' `info` (python floats and ints, for logging)."""
    if cand_scores.numel() > 0:
        q = torch.quantile(cand_scores, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=_DTYPE))
        quantiles = [float(x) for x in q]
        fraction_positive = float((cand_scores > 0).to(_DTYPE).mean())
        score_scale = float(cand_scores.abs().mean())
        score_std = float(cand_scores.std(correction=0))
    else:
        quantiles = [math.nan] * 5
        fraction_positive = score_scale = score_std = math.nan
    old_selected = old_weights > 0
    num_selected = int(new_selected.sum())
    scored = new_selected & ~carried
    total = new_weights[scored].sum()
    predicted_gain = float((new_weights[scored] * scores[scored]).sum() / total) if total > 0 else 0.0
    entropy = weight_entropy(new_weights)
    selected_weights = new_weights[new_selected]
    return {
        "n_candidates": int(cand_scores.numel()),
        "n_stale": int(stale.sum()),
        "n_carried": int(carried.sum()),
        "n_selected": num_selected,
        "n_new": int((new_selected & ~old_selected).sum()),
        "n_dropped": int((old_selected & ~new_selected).sum()),
        "n_positive": int((cand_scores > 0).sum()),
        "fraction_positive": fraction_positive,
        "score_min": quantiles[0],
        "score_q25": quantiles[1],
        "score_median": quantiles[2],
        "score_q75": quantiles[3],
        "score_max": quantiles[4],
        "score_scale": score_scale,
        "score_std": score_std,
        "entropy": entropy,
        "effective_n": math.exp(entropy) if num_selected > 0 else 0.0,
        "weight_max": float(selected_weights.max()) if num_selected > 0 else 0.0,
        "weight_min": float(selected_weights.min()) if num_selected > 0 else 0.0,
        "fraction_clipped": fraction_clipped,
        "predicted_gain": predicted_gain,
    }
