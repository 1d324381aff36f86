import math
import random

import pytest
import torch

from trl_u2a.core.weighting import (
    WeightState,
    budget_size,
    refresh_weights,
    weight_entropy,
)


def _all(n, scores, **kwargs):
    """Refresh 0 from uniform: every negative is a candidate."""
    state = WeightState.uniform(n)
    return refresh_weights(state, torch.arange(n), torch.tensor(scores, dtype=torch.float64), **kwargs)


# ---------------------------------------------------------------- budget


def test_budget_size_counts_and_fractions():
    assert budget_size(5, 300) == 5
    assert budget_size(300, 300) == 300
    assert budget_size(0.5, 300) == 150
    assert budget_size(1.0, 7) == 7
    assert budget_size(0.25, 10) == 3  # 2.5 rounds half up
    assert budget_size(0.001, 10) == 1  # at least one
    # One rule for ints and floats: 1 is the fraction "all", a whole number above 1 a count
    assert budget_size(1, 7) == budget_size(1.0, 7) == 7
    assert budget_size(2, 7) == budget_size(2.0, 7) == 2
    assert budget_size(0.25, 234) == 59  # 58.5 rounds half up (Python's round gives 58)


@pytest.mark.parametrize(
    "budget, match",
    [
        (0, "selects nothing"),
        (-3, "selects nothing"),
        (0.0, "selects nothing"),
        (-0.5, "selects nothing"),
        (float("nan"), "selects nothing"),
        (1.5, "not a whole count"),
        (float("inf"), "not a whole count"),
        (500, "budget=500 is larger than the 300 negatives"),
    ],
)
def test_budget_size_errors(budget, match):
    with pytest.raises(ValueError, match=match):
        budget_size(budget, 300)
    for bad in (True, "10", None):
        with pytest.raises(ValueError, match="not a number"):
            budget_size(bad, 300)
    with pytest.raises(ValueError, match="n=0"):
        budget_size(1, 0)
    with pytest.raises(ValueError, match="larger than the 3 negatives"):
        budget_size(4.0, 3)


# ---------------------------------------------------------------- selection


def test_top_k_picks_exactly_the_best_positive_ones():
    scores = [0.3, -1.0, 2.0, 0.0, 0.9, 5.0, -0.1, 0.31]
    state, info = _all(8, scores, k=3)
    assert state.selected.nonzero().flatten().tolist() == [2, 4, 5]
    assert info["n_selected"] == 3 and info["n_dropped"] == 5 and info["n_new"] == 0


def test_non_positive_scores_are_never_selected():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randn(50, generator=gen, dtype=torch.float64)
        scores[::7] = 0.0
        state, _ = refresh_weights(WeightState.uniform(50), torch.arange(50), scores, k=50)
        assert torch.equal(state.selected, scores > 0)


def test_budget_larger_than_positives_selects_fewer():
    state, info = _all(6, [1.0, -1.0, 2.0, -3.0, 0.0, -0.5], k=5)
    assert state.selected.tolist() == [True, False, True, False, False, False]
    assert info["n_selected"] == 2
    state, info = _all(3, [-1.0, -2.0, 0.0], k=2)
    assert info["n_selected"] == 0 and state.weights.sum() == 0 and info["predicted_gain"] == 0.0


def test_ties_broken_by_lower_index():
    state, _ = _all(6, [1.0, 2.0, 1.0, 2.0, 1.0, 2.0], k=4)
    assert state.selected.nonzero().flatten().tolist() == [0, 1, 3, 5]


def test_new_entrants_start_at_the_mean_of_the_kept():
    state = WeightState.from_initial([2.0, 4.0, 6.0, 0.0])
    # 2 is dropped (negative score), 3 enters; equal scores on the selection -> z = 0, weights only renormalised.
    new, info = refresh_weights(state, torch.arange(4), torch.tensor([1.0, 1.0, -1.0, 1.0]), k=3)
    assert info["n_new"] == 1 and info["n_dropped"] == 1
    torch.testing.assert_close(new.weights, torch.tensor([2.0, 4.0, 0.0, 3.0], dtype=torch.float64) / 3.0)
    # No kept examples: an entrant starts at 1 and then the mean is 1 anyway.
    state = WeightState.from_initial([5.0, 0.0])
    new, _ = refresh_weights(state, torch.arange(2), torch.tensor([-1.0, 1.0]), k=1)
    assert new.weights.tolist() == [0.0, 1.0]


def test_stale_selected_are_carried_not_ranked_against_another_query():
    state, _ = _all(6, [3.0, 1.0, 2.0, 0.5, -1.0, -1.0], k=3, weight_lr=0.5)  # selects 0, 1, 2
    w0 = state.weights.clone()
    # Rescore 1 (now weak) and the pool {3, 4, 5} with a new query whose scale is 100x larger; 0 and 2 are stale:
    # their scores 3.0 and 2.0 come from another query, so they are carried (kept, not ranked, no update step).
    rescored = torch.tensor([10.0, 250.0, 20.0, -100.0], dtype=torch.float64)
    new, info = refresh_weights(state, torch.tensor([1, 3, 4, 5]), rescored, k=3)
    assert info["n_stale"] == 2 and info["n_carried"] == 2 and info["n_candidates"] == 4
    # One free slot: the best candidate (3) takes it; 1 and 4 lose although their new scores exceed the carried ones
    assert new.selected.nonzero().flatten().tolist() == [0, 2, 3]
    assert new.scores.tolist() == [3.0, 10.0, 2.0, 250.0, 20.0, -100.0]
    assert info["n_new"] == 1 and info["n_dropped"] == 1
    # Carried weights keep their ratio (z = 0 for both): only the common renormalisation acts on them
    torch.testing.assert_close(new.weights[0] / new.weights[2], w0[0] / w0[2])
    # The predicted gain uses this query's scores only (the entrant's), not the carried ones' old scores
    assert info["predicted_gain"] == 250.0


def test_a_ranking_never_mixes_scales():
    """With every selected example rescored, a 100x change of scale between two refreshes changes nothing: the
    ranking depends on the candidates' scores under one query only."""
    state, _ = _all(6, [3.0, 1.0, 2.0, 0.5, -1.0, -1.0], k=3)
    ids = torch.arange(6)
    scores = torch.tensor([0.3, 0.1, 0.2, 0.25, -0.1, 0.05], dtype=torch.float64)
    small, _ = refresh_weights(state, ids, scores, k=3)
    large, _ = refresh_weights(state, ids, 100 * scores, k=3)
    assert small.selected.tolist() == large.selected.tolist() == [True, False, True, True, False, False]
    torch.testing.assert_close(small.weights, large.weights)


def test_stale_selected_never_scored_are_dropped():
    state = WeightState.uniform(4)
    new, info = refresh_weights(state, torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), k=4)
    assert new.selected.tolist() == [True, True, False, False]
    assert info["n_dropped"] == 2


def test_unselected_stale_scores_do_not_revive():
    state, _ = _all(3, [1.0, 2.0, 3.0], k=1)  # selects 2; 0 and 1 keep scores 1.0, 2.0
    new, _ = refresh_weights(state, torch.tensor([2]), torch.tensor([-1.0]), k=2)
    assert new.selected.sum() == 0
    assert new.scores.tolist() == [1.0, 2.0, -1.0]


# ---------------------------------------------------------------- mirror ascent


def test_mirror_ascent_orders_weights_by_score():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores = torch.rand(30, generator=gen, dtype=torch.float64) + 0.01
        state, _ = refresh_weights(WeightState.uniform(30), torch.arange(30), scores, k=30, max_weight=math.inf)
        order = torch.argsort(scores)
        assert (state.weights[order].diff() >= 0).all()
    # Unclipped and uncapped: strictly increasing, exactly exp(η s / std) up to normalisation.
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    state, info = refresh_weights(WeightState.uniform(4), torch.arange(4), scores, k=4, score_clip=100.0)
    assert (state.weights.diff() > 0).all() and info["fraction_clipped"] == 0.0
    expected = torch.exp(0.2 * (scores - scores.mean()) / scores.std(correction=0))
    torch.testing.assert_close(state.weights, expected * 4 / expected.sum())
    # Repeated refreshes with the same scores keep raising the best one's share.
    shares = []
    for _ in range(3):
        state, _ = refresh_weights(state, torch.arange(4), scores, k=4, score_clip=100.0)
        shares.append(float(state.weights[3] / state.weights.sum()))
    assert shares[0] < shares[1] < shares[2]


def test_mean_one_and_cap_hold_over_random_refreshes():
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for trial in range(40):
        n = rng.randint(1, 60)
        k = rng.randint(1, n)
        max_weight = rng.choice([1.0, 1.5, 2.0, 4.0])
        kwargs = {
            "weight_lr": rng.choice([0.2, 1.0, 3.0]),
            "score_clip": rng.choice([0.5, 2.0, 10.0]),
            "max_weight": max_weight,
            "sparsity": rng.choice([0.0, 0.0, 0.1]),
        }
        state = WeightState.uniform(n)
        for refresh in range(4):
            m = n if refresh == 0 else rng.randint(0, n)
            ids = torch.randperm(n, generator=gen)[:m]
            scores = torch.randn(m, generator=gen, dtype=torch.float64) ** 3 * 10 + 1  # heavy-tailed
            state, info = refresh_weights(state, ids, scores, k, **kwargs)
            w = state.weights[state.selected]
            assert info["n_selected"] == w.numel() <= k
            assert (state.weights >= 0).all()
            if w.numel():
                assert abs(float(w.mean()) - 1.0) < 1e-12, (trial, refresh)
                assert float(w.max()) <= max_weight * (1 + 1e-12), (trial, refresh)
                assert (state.scores[state.selected] > 0).all()


def test_weight_lr_zero_is_selection_only():
    state = WeightState.from_initial([0.5, 3.0, 1.0, 0.0, 2.0])
    new, _ = refresh_weights(state, torch.arange(5), torch.tensor([1.0, 9.0, 2.0, 4.0, -1.0]), k=4, weight_lr=0.0)
    assert new.weights.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_clip_bounds_the_one_step_ratio():
    eta, c = 0.3, 2.0
    scores = torch.tensor([1.0] * 9 + [100.0], dtype=torch.float64)
    state, info = refresh_weights(
        WeightState.uniform(10), torch.arange(10), scores, k=10, weight_lr=eta, score_clip=c, max_weight=math.inf
    )
    # One outlier among 10: its centred z is 3 (clipped to c = 2), the others' is -1/3.
    z_low, z_high = -1.0 / 3.0, c
    assert info["fraction_clipped"] == pytest.approx(0.1)
    ratio = float(state.weights[9] / state.weights[0])
    assert ratio == pytest.approx(math.exp(eta * (z_high - z_low)), rel=1e-12)
    assert ratio <= math.exp(2 * eta * c)
    # Over random inputs: every selected weight moved by a factor in [exp(-ηc), exp(ηc)] up to one common factor.
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        scores = torch.randn(40, generator=gen, dtype=torch.float64).exp() * 5
        w0 = torch.rand(40, generator=gen, dtype=torch.float64) + 0.5
        state, _ = refresh_weights(
            WeightState.from_initial(w0),
            torch.arange(40),
            scores,
            k=40,
            weight_lr=eta,
            score_clip=c,
            max_weight=math.inf,
        )
        factors = state.weights / w0
        assert float(factors.max() / factors.min()) <= math.exp(2 * eta * c) * (1 + 1e-12)


def test_clipping_is_centred_so_tight_positive_scores_still_move_weights():
    # Selected scores far from 0 relative to their spread: uncentred s/std would clip every one to c (no update).
    scores = torch.tensor([10.0, 10.5, 11.0], dtype=torch.float64)
    state, info = refresh_weights(WeightState.uniform(3), torch.arange(3), scores, k=3)
    assert (state.weights.diff() > 0).all() and info["fraction_clipped"] == 0.0


def test_cap_is_water_filled_exactly():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 30.0, 40.0], dtype=torch.float64)
    state, info = refresh_weights(
        WeightState.uniform(8), torch.arange(8), scores, k=8, weight_lr=5.0, score_clip=100.0, max_weight=2.0
    )
    w = state.weights
    assert w[6] == 2.0 and w[7] == 2.0
    torch.testing.assert_close(w[:6], torch.full((6,), 4.0 / 6.0, dtype=torch.float64))
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-15) and info["weight_max"] == 2.0


def test_sparsity_lowers_small_weights():
    w0 = torch.tensor([0.1, 0.5, 1.0, 2.0, 2.4], dtype=torch.float64)
    scores = torch.tensor([1.0, 1.2, 0.9, 1.1, 1.0], dtype=torch.float64)
    kwargs = {"k": 5, "weight_lr": 0.5, "max_weight": math.inf}
    plain, _ = refresh_weights(WeightState.from_initial(w0), torch.arange(5), scores, **kwargs)
    sparse, _ = refresh_weights(WeightState.from_initial(w0), torch.arange(5), scores, sparsity=0.5, **kwargs)
    # The smallest weight is pushed down hardest (its penalty gradient ρ/(2√ω) is the largest) ...
    assert sparse.weights[0] < plain.weights[0]
    assert sparse.weights[4] > plain.weights[4]
    # Larger weights gain share relative to smaller ones under the penalty.
    assert float(sparse.weights[0] / sparse.weights[4]) < float(plain.weights[0] / plain.weights[4])


def test_one_selected_or_equal_scores_give_weight_one():
    state, _ = _all(3, [-1.0, 7.0, -2.0], k=3)
    assert state.weights.tolist() == [0.0, 1.0, 0.0]
    state, _ = _all(3, [2.0, 2.0, 2.0], k=3)
    assert state.weights.tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- info, determinism, state


def test_info_values():
    scores = [4.0, -2.0, 1.0, 0.0, 3.0]
    state, info = _all(5, scores, k=2, weight_lr=0.0)
    assert info["n_selected"] == 2 and info["n_candidates"] == 5 and info["n_positive"] == 3
    assert info["fraction_positive"] == pytest.approx(0.6)
    assert (info["score_min"], info["score_median"], info["score_max"]) == (-2.0, 1.0, 4.0)
    assert info["score_q25"] == 0.0 and info["score_q75"] == 3.0
    assert info["score_scale"] == pytest.approx(2.0)
    assert info["predicted_gain"] == pytest.approx(3.5)
    assert info["entropy"] == pytest.approx(math.log(2)) and info["effective_n"] == pytest.approx(2.0)
    assert state.refresh == 1 and "refresh" not in info  # the refresh id is the caller's (a skip applies no update)


def test_deterministic_bitwise():
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(200, generator=gen, dtype=torch.float64)
    runs = []
    for _ in range(2):
        state = WeightState.uniform(200)
        for r in range(3):
            ids = torch.arange(200) if r == 0 else torch.arange(0, 200, 2)
            state, info = refresh_weights(state, ids, scores[ids] * (r + 1), k=60, sparsity=0.05)
        runs.append((state, info))
    assert torch.equal(runs[0][0].weights, runs[1][0].weights)
    assert runs[0][0].scores.nan_to_num(-9).tolist() == runs[1][0].scores.nan_to_num(-9).tolist()
    assert runs[0][1] == runs[1][1]


def test_input_state_is_not_modified():
    state = WeightState.uniform(4)
    before = state.state_dict()
    refresh_weights(state, torch.arange(4), torch.tensor([1.0, 2.0, -1.0, 3.0]), k=2)
    assert torch.equal(state.weights, before["weights"]) and state.refresh == 0
    assert torch.isnan(state.scores).all()


def test_state_dict_round_trip():
    state, _ = _all(5, [1.0, 2.0, -1.0, 3.0, 0.5], k=3)
    sd = state.state_dict()
    assert set(sd) == {"weights", "scores", "refresh"} and isinstance(sd["refresh"], int)
    restored = WeightState.uniform(5)
    restored.load_state_dict(sd)
    assert torch.equal(restored.weights, state.weights) and torch.equal(restored.scores, state.scores)
    assert restored.refresh == 1
    again = WeightState.uniform(5)
    again.load_state_dict(torch.load(_save(sd), weights_only=True))
    assert torch.equal(again.weights, state.weights) and again.refresh == 1
    sd["weights"][0] = 123.0  # a copy: the state does not alias the checkpoint
    assert restored.weights[0] != 123.0
    with pytest.raises(ValueError, match="5 negatives but this run has 6"):
        WeightState.uniform(6).load_state_dict(sd)
    with pytest.raises(ValueError, match="lacks"):
        restored.load_state_dict({"weights": sd["weights"]})


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_state_constructors_validate():
    state = WeightState.uniform(3)
    assert state.weights.dtype == torch.float64 and state.weights.tolist() == [1.0, 1.0, 1.0]
    assert torch.isnan(state.scores).all() and state.selected.all() and state.n == 3
    state = WeightState.from_initial([0.0, 2.0])
    assert state.selected.tolist() == [False, True]
    with pytest.raises(ValueError, match=r"weights\[1\]=-0.5"):
        WeightState.from_initial([1.0, -0.5, 2.0])
    with pytest.raises(ValueError, match=r"weights\[2\]=nan"):
        WeightState.from_initial([1.0, 1.0, float("nan")])
    with pytest.raises(ValueError, match=r"weights\[0\]=inf"):
        WeightState.from_initial([float("inf")])
    with pytest.raises(ValueError, match="positive int"):
        WeightState.uniform(0)


def test_bad_scores_and_arguments_raise():
    state = WeightState.uniform(5)
    scores = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.5])
    with pytest.raises(ValueError, match=r"2 of 5 candidate scores are NaN or infinite, for negatives \[1, 3\]"):
        refresh_weights(state, torch.arange(5), scores, k=2)
    with pytest.raises(ValueError, match="duplicates"):
        refresh_weights(state, torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), k=1)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        refresh_weights(state, torch.tensor([5]), torch.tensor([1.0]), k=1)
    with pytest.raises(ValueError, match="same length"):
        refresh_weights(state, torch.tensor([0, 1]), torch.tensor([1.0]), k=1)
    with pytest.raises(ValueError, match="k=0"):
        refresh_weights(state, torch.arange(5), torch.ones(5), k=0)
    with pytest.raises(ValueError, match="k=6"):
        refresh_weights(state, torch.arange(5), torch.ones(5), k=6)
    with pytest.raises(ValueError, match="max_weight"):
        refresh_weights(state, torch.arange(5), torch.ones(5), k=2, max_weight=0.5)
    with pytest.raises(ValueError, match="weight_lr"):
        refresh_weights(state, torch.arange(5), torch.ones(5), k=2, weight_lr=-0.1)
    with pytest.raises(ValueError, match="score_clip"):
        refresh_weights(state, torch.arange(5), torch.ones(5), k=2, score_clip=0.0)


def test_entropy():
    assert weight_entropy(torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])) == pytest.approx(math.log(4))
    assert weight_entropy(torch.tensor([0.0, 3.0])) == 0.0
    assert weight_entropy(torch.zeros(3)) == 0.0
    assert weight_entropy(torch.tensor([1.0, 3.0])) < math.log(2)


@pytest.mark.parametrize("budget", [0, -1, float("nan"), float("inf"), 2.5, True, "3"])
def test_the_config_refuses_a_budget_with_budget_sizes_message(tmp_path, budget):
    from trl_u2a import U2AConfig
    from trl_u2a.testing import cpu_training_args

    with pytest.raises(ValueError) as from_size:
        budget_size(budget, 1000)
    with pytest.raises(ValueError) as from_config:
        cpu_training_args(U2AConfig, output_dir=str(tmp_path), budget=budget)
    assert str(from_config.value) == str(from_size.value)


def test_one_list_of_preconditioners():
    from trl_u2a import config
    from trl_u2a.influence import preconditioners

    assert config.PRECONDITIONERS is preconditioners.PRECONDITIONERS
