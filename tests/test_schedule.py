"""The overhead-bounded cadence (`trl_u2a.core.schedule`): pure arithmetic."""

import itertools

import pytest

from trl_u2a.core.schedule import FIRST_RESELECTION_STEP, fixed_steps, refresh_rows, refresh_steps


def test_refresh_rows_counts_two_rows_per_pair():
    assert refresh_rows(8, 8) == 24
    assert refresh_rows(8, 8, rescored=59) == 83


@pytest.mark.parametrize(
    "max_steps, rows_per_step, rows, overhead, start",
    [
        (60, 8, 24, 0.15, 12),
        (60, 8, 24, 0.15, 0),
        (1000, 32, 96, 0.1, 200),
        (500, 64, 192, 0.15, 0),
        (40, 8, 83, 0.15, 8),
    ],
)
def test_refreshes_fit_the_stated_overhead_and_come_early(max_steps, rows_per_step, rows, overhead, start):
    steps = refresh_steps(max_steps, rows_per_step, rows, overhead, start=start)
    # Within the bound: the refreshes' row passes are at most `overhead` of the training's
    assert len(steps) * rows <= overhead * max_steps * rows_per_step + 1e-9
    assert steps == sorted(set(steps))
    assert all(start + FIRST_RESELECTION_STEP <= s < max_steps for s in steps)
    # As many as the bound affords (up to distinct steps), and front-loaded: windows never shrink
    affordable = int(overhead * max_steps * rows_per_step // rows)
    assert len(steps) >= min(affordable, max_steps - start - FIRST_RESELECTION_STEP) - 2
    windows = [b - a for a, b in itertools.pairwise([start, *steps])]
    assert all(later >= earlier for earlier, later in itertools.pairwise(windows[1:]))


def test_the_benchmark_setting_gets_three_reselections():
    """Batch 8, 60 steps, a 20 % warm-up: 2 x 8 pairs + a pool of 8 per refresh at 15 % gives 3 re-selections."""
    assert refresh_steps(60, 8, refresh_rows(8, 8), 0.15, start=12) == [15, 24, 39]


def test_nothing_fits_or_nothing_left():
    assert refresh_steps(60, 8, 1000, 0.15) == []
    assert refresh_steps(2, 8, 1, 0.15) == []
    assert refresh_steps(10, 8, 24, 0.15, start=9) == []


def test_fixed_cadence_follows_the_initial_pass_and_skips_the_last_step():
    assert fixed_steps(10, 2) == [2, 4, 6, 8]
    assert fixed_steps(10, 3, start=2) == [5, 8]
