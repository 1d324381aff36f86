"""The record of one refresh (`RefreshRecord`) and the JSONL trace files the main process writes.

`output_dir/u2a_refreshes.jsonl` holds one record per refresh (and a final one with `final: true`);
`output_dir/u2a_trace.jsonl` one row per scored or selected negative per refresh (`refresh, step, example_id, score,
weight`, and the user's `id` when the training data has that column).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any, TypedDict

import torch

TRACE_FILE = "u2a_trace.jsonl"
REFRESH_FILE = "u2a_refreshes.jsonl"
TRACE_CHUNK = 4096  # trace rows built at a time
IN_MEMORY_ONLY = ("weights", "last_scores")


class RefreshRecord(TypedDict, total=False):
    """One refresh, as kept in `history`, logged and written to `u2a_refreshes.jsonl` (a plain dict: JSON as is).

    The selection statistics (`n_candidates` ... `predicted_gain`) come from `core.weighting.refresh_weights`.
    """

    refresh: int | None  # index; None on the final record
    step: int  # optimizer steps done when it ran
    final: bool  # the record of J after the last window (no selection)
    objective: float  # J on the alignment pairs
    num_pairs: int  # pairs behind ∇J
    preconditioner: str  # the one applied to this refresh's query
    ranked_with_query_of: int  # the refresh whose query scored every candidate of this ranking
    ranking_preconditioner: str
    num_scored: int  # candidates scored now
    num_scored_in_training: int  # candidates scored during the window (in-training scores)
    retain_nll: float | None
    budget: int  # the budget the initial pass found (`auto_budget` only)
    objective_next: float  # J at the next refresh
    realised_change: float  # objective_next - objective
    predicted_change: float  # -(Σ learning rates of the window) · predicted_gain
    n_candidates: int
    n_stale: int
    n_carried: int
    n_selected: int
    n_new: int
    n_dropped: int
    n_positive: int
    fraction_positive: float
    score_min: float
    score_q25: float
    score_median: float
    score_q75: float
    score_max: float
    score_scale: float
    score_std: float
    entropy: float
    effective_n: float
    weight_max: float
    weight_min: float
    fraction_clipped: float
    predicted_gain: float
    skipped: str  # why the weights were left as they were
    stopped: str  # why training stopped here
    collapsed: bool  # the retain-NLL guard fired
    restored_step: int  # the step whose parameters were restored after a collapse
    refresh_seconds: float
    window_seconds: float
    initial_pass_seconds: float
    initial_pass_multiple: float
    reweight_share: float
    # In memory on the main process only (for plots and callers), never written to the JSONL or a checkpoint
    weights: list[float]  # (N,) the weights after this refresh
    last_scores: dict[int, float]  # negative id -> score, of the candidates of the latest refresh only


# What each refresh logs (as `u2a/<key>`), when the record has it
LOGGED_KEYS = (
    "objective",
    "n_selected",
    "entropy",
    "score_median",
    "score_q25",
    "score_q75",
    "score_scale",
    "fraction_positive",
    "predicted_gain",
    "retain_nll",
    "refresh_seconds",
)


def refresh_metrics(record: RefreshRecord, previous: RefreshRecord | None) -> dict[str, float]:
    """The `u2a/*` metrics of a refresh, with the realised and predicted change of `J` over the window `previous`
    opened (its record is closed by then)."""
    metrics = {f"u2a/{key}": float(record[key]) for key in LOGGED_KEYS if record.get(key) is not None}
    if previous is not None and "realised_change" in previous:
        metrics["u2a/objective_change"] = previous["realised_change"]
        metrics["u2a/objective_change_predicted"] = previous["predicted_change"]
    return metrics


def reweighting_cost(history: list[RefreshRecord], rows_per_step: int) -> dict[str, float]:
    """What reweighting cost, from the refreshes' wall times: the initial pass in seconds and as a multiple of one
    training pass over its candidates, and the later refreshes as a share of the training time. Empty before any
    training window."""
    records = [r for r in history if r.get("refresh") is not None]
    if not records:
        return {}
    windows = sum(r.get("window_seconds", 0.0) for r in records)
    trained_rows = records[-1]["step"] * rows_per_step
    if windows <= 0 or trained_rows <= 0:
        return {}
    initial = records[0]
    seconds_per_row = windows / trained_rows
    return {
        "initial_pass_seconds": initial["refresh_seconds"],
        "initial_pass_multiple": initial["refresh_seconds"] / (seconds_per_row * max(1, initial["num_scored"])),
        "reweight_share": sum(r["refresh_seconds"] for r in records[1:]) / windows,
    }


class TraceWriter:
    """Appends refreshes to the JSONL files of `output_dir` (call it on the main process only)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def _append(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, name), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def write_record(self, record: RefreshRecord) -> None:
        self._append(REFRESH_FILE, [{k: v for k, v in record.items() if k not in IN_MEMORY_ONLY}])

    def write_rows(
        self,
        record: RefreshRecord,
        ids: torch.Tensor,
        scores: torch.Tensor,
        weights: torch.Tensor,
        names: list[str] | None,
    ) -> None:
        """One row per negative scored in this refresh (`ids`, `scores`, `(m,)`) or selected after it (`weights[i] >
        0`, `(N,)`), by id. Rows are built and written `TRACE_CHUNK` at a time: the initial pass scores every negative,
        and a list of N row dicts would be the largest thing it holds."""
        score_of = torch.full_like(weights, math.nan, dtype=torch.float64)
        score_of[ids] = scores.to(torch.float64)
        scored = torch.zeros(len(weights), dtype=torch.bool)
        scored[ids] = True
        rows = torch.nonzero(scored | (weights > 0)).flatten()

        def chunks():
            for start in range(0, len(rows), TRACE_CHUNK):
                chunk = rows[start : start + TRACE_CHUNK]
                for i, is_scored, score, weight in zip(
                    chunk.tolist(), scored[chunk].tolist(), score_of[chunk].tolist(), weights[chunk].tolist()
                ):
                    row = {
                        "refresh": record["refresh"],
                        "step": record["step"],
                        "example_id": i,
                        "score": score if is_scored else None,
                        "weight": weight,
                    }
                    if names is not None:
                        row["id"] = names[i]
                    yield row

        self._append(TRACE_FILE, chunks())

    def truncate(self, refresh_index: int) -> None:
        """Drop what was written after a checkpoint (refreshes `>= refresh_index` and the final record), so that a
        resumed run does not repeat them."""
        for name in (TRACE_FILE, REFRESH_FILE):
            path = os.path.join(self.output_dir, name)
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            with open(path, "w") as f:
                f.writelines(
                    json.dumps(row) + "\n"
                    for row in rows
                    if row.get("refresh") is not None and row["refresh"] < refresh_index
                )
