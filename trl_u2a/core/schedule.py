"""When to refresh: a cadence whose reweighting cost stays within a share of the training compute the user states.

Pure arithmetic, no model. Costs are counted in *row passes*: one forward+backward of one training row (a scoring
pass over a negative costs the same: benchmarks/bench_scoring.py measures 0.97-1.02x; a pair's `∇J` is two rows,
chosen and rejected). Counting passes rather than seconds keeps the schedule a pure function of the configuration,
so a run is reproducible from its seed and resumes exactly; docs/benchmarks.md checks the seconds it stands for.

The initial pass (every negative scored, after `start` steps of warm-up) is reported on its own and not charged: it
is the one pass that U2A needs whatever the cadence. The later refreshes get `overhead · max_steps · rows_per_step`
row passes in all; with `N` of them affordable, the `j`-th runs after step `start + ⌈(max_steps − start) · (j /
(N + 1))²⌉`: the windows grow linearly, so the selection is revised most while it matters most, early, while the
weights still act on most of the run.
"""

from __future__ import annotations

import math

# Adam's state after one step of a fresh LoRA adapter has exactly zero second moments on `lora_A` (its gradient is
# zero while `lora_B` is zero), so a refresh after step 1 would divide by ε; the earliest re-selection is after step 2.
FIRST_RESELECTION_STEP = 2


def refresh_rows(pa_samples: int, pool_size: int, rescored: int = 0) -> int:
    """Row passes of one refresh after the initial one: `∇J` on `pa_samples` pairs (2 rows each), the exploration
    pool and the selected negatives rescored with the new query (`rescored`; 0 with in-training scores)."""
    return 2 * pa_samples + pool_size + rescored


def refresh_steps(
    max_steps: int, rows_per_step: int, rows_per_refresh: int, overhead: float, start: int = 0
) -> list[int]:
    """The optimizer steps after which a re-selection runs, at most `overhead` of the training's row passes in all.

    Args:
        max_steps: optimizer steps of the run.
        rows_per_step: rows one optimizer step trains (per-device batch × accumulation × processes).
        rows_per_refresh: row passes of one refresh (`refresh_rows`).
        overhead: the share of the training compute the refreshes may cost, `> 0`.
        start: the step of the initial pass; the re-selections follow it.

    Returns:
        Increasing steps in `[start + FIRST_RESELECTION_STEP, max_steps)`, front-loaded over the steps after `start`
        (see the module docstring); empty when not even one refresh fits. A refresh at the last step would change
        weights that are never used.
    """
    first, span = start + FIRST_RESELECTION_STEP, max_steps - start
    if max_steps <= first or rows_per_refresh <= 0:
        return []
    affordable = math.floor(overhead * max_steps * rows_per_step / rows_per_refresh + 1e-9)
    affordable = min(affordable, max_steps - first)
    steps = {max(first, start + math.ceil(span * (j / (affordable + 1)) ** 2)) for j in range(1, affordable + 1)}
    return sorted(step for step in steps if step < max_steps)


def fixed_steps(max_steps: int, every: int, start: int = 0) -> list[int]:
    """`start + every`, `start + 2 · every`, ... below `max_steps`: the fixed cadence of `reweight_steps`."""
    return list(range(start + every, max_steps, every))
