"""`RefreshController`: U2A's periodic bi-level refresh, which scores, selects and reweights the negatives.

Before the first step or after the warm-up (the initial pass), then after the steps of `core.schedule.refresh_steps`
(or every `reweight_steps`):

1. `v = P⁻¹∇J` on the alignment set (or a sample of its pairs), pairs sharded across ranks, `∇J` all-reduced; at an
   initial pass at step 0, Adam's second moments are estimated from a few batches (the optimizer has no state yet);
2. scores `s_i = ⟨v, ∇ℓ_i⟩` of the candidates, all with ONE query vector (a ranking never mixes scales): every
   negative at the initial pass. Later, with in-training scores, the ranking uses the query the trained negatives
   were scored with during the window (the previous refresh's): it scores the exploration pool with it too, carries
   the selected negatives not trained since, and installs the new `v` for the next window. Without in-training
   scores, the selected negatives and the pool are scored with the new `v`. Candidates are sharded across ranks and
   the scores gathered;
3. selection of the top-`budget` positive scores (with `auto_budget`, the count the initial pass's scores give) and the
   tempered mirror-ascent update (`core.weighting`), computed identically on every rank.

Every collective runs on every rank in the same order, whatever the data. Only the main process writes files. The
controller talks to the training loop through `RefreshHost` only; `refresh.callback` adapts a `U2ATrainer` to it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core.auto_budget import auto_budget_count
from ..core.modeling import PADDING, model_device, move_batch, sequence_logps
from ..core.objectives import AlignmentObjective, pair_reference_values
from ..core.sampler import mix_seed
from ..core.schedule import fixed_steps, refresh_rows, refresh_steps
from ..core.weighting import refresh_weights
from ..doc_links import docs_page
from ..influence import (
    GhostDotProduct,
    QueryVector,
    compute_query,
    gradient_second_moments,
    make_unlearning_loss_fn,
    resolve_tracking,
    score_dataset,
    scoring_mode,
    tracked_parameters,
    unwrap_model,
)
from .guards import CollapseGuard, StopRule
from .host import RefreshHost
from .record import IN_MEMORY_ONLY, RefreshRecord, TraceWriter, refresh_metrics, reweighting_cost

logger = logging.getLogger(__name__)

RETAIN_SAMPLE = 64
# Mean |s| below which the scores are reported as negligible (memorised negatives: near-zero gradients)
NEGLIGIBLE_SCORE_SCALE = 1e-8


class RefreshController:
    """The refresh's state and steps, driven by a training loop through `begin`, `step_end`, `end` and
    `record_training_scores`.

    Args:
        host: the training loop (`RefreshHost`).
        pairs: the tokenized alignment pairs (`data.tokenize_pairs`), `P` of them.
        pair_collator: collates pairs into `chosen_*`/`rejected_*` batches (`data.PairCollator`).
        objective: the alignment objective `J` (`core.objectives`).
        in_training: score the trained negatives during the training backward (ghost hooks) instead of at refreshes.
        rows_per_step: rows one optimizer step trains (all ranks): the unit of the automatic pool, pair sample and
            cadence.
    """

    def __init__(
        self,
        host: RefreshHost,
        pairs: list[dict],
        pair_collator,
        objective: AlignmentObjective,
        in_training: bool,
        rows_per_step: int,
    ):
        args = host.args
        self.host = host
        self.pairs = pairs
        if args.pa_samples is not None and args.pa_samples > len(pairs):
            raise ValueError(
                f"pa_samples={args.pa_samples} is larger than the {len(pairs)} pairs of alignment_dataset; use "
                f"pa_samples ≤ {len(pairs)} or None (automatic)."
            )
        self.rows_per_step = rows_per_step
        self.pool_size = rows_per_step if args.pool_size is None else args.pool_size
        self.pairs_first = len(pairs) if args.pa_samples is None else args.pa_samples
        self.pairs_later = min(len(pairs), rows_per_step) if args.pa_samples is None else args.pa_samples
        self.schedule: set[int] = set()  # optimizer steps after which a refresh runs (`begin`)
        self.initial_step = 0  # the step after which the initial pass runs (`reweight_warmup_steps`)
        self.pair_collator = pair_collator
        self.objective = objective
        self.loss_fn = make_unlearning_loss_fn(args.loss_type, args.beta, args.gamma)
        self.batch_size = args.scoring_batch_size or args.per_device_train_batch_size
        self.in_training = in_training
        self.trace = TraceWriter(args.output_dir)
        self.stop_rule = StopRule(args.patience, args.retain_nll_tolerance)
        self.collapse_guard = CollapseGuard(
            enabled=args.retain_nll_tolerance is not None and not host.is_sharded, say=self._say
        )

        self.refresh_index = 0  # refreshes done
        self.auto_budget: int | None = None  # the budget the initial pass found (`auto_budget`); else host.budget
        self.history: list[RefreshRecord] = []
        self.ref_pair_logps: torch.Tensor | None = None  # (P, 2): log π_0 of chosen and rejected
        # In-training scores since the last refresh on this rank: id -> ((micro-batch, global row), score)
        self.fresh_scores: dict[int, tuple] = {}
        self._micro_batches = 0
        self.query: QueryVector | None = None  # v of the last refresh
        self.ghost: GhostDotProduct | None = None
        self._lr_sum = 0.0
        self._warned_no_retain = False
        self._window_start: float | None = None  # when the last refresh ended (wall clock of this process)

    def _say(self, level: int, message: str) -> None:
        """Log on the main process only (every rank runs the same refresh)."""
        if self.host.sharding.is_main_process:
            logger.log(level, message)

    # ---------------------------------------------------------------- driving
    def begin(self, step: int, max_steps: int) -> RefreshRecord | None:
        """At the start of training (or of a resumed run): plan the refreshes, take the pairs' reference log-probs,
        and run the initial pass when it is due now. Returns its record, if any."""
        warmup = self.host.args.reweight_warmup_steps
        planned = int(warmup * max_steps) if warmup < 1 else int(warmup)
        self.initial_step = min(planned, max_steps - 1)
        if planned >= max_steps and self.refresh_index == 0:
            # Legal, but a warm-up as long as the run is plain unlearning of every negative: almost surely a mistake
            self._say(
                logging.WARNING,
                f"reweight_warmup_steps={warmup} is at or beyond the end of the run ({max_steps} optimizer steps): "
                f"the initial pass moves to after step {self.initial_step}, so {self.initial_step} of the "
                f"{max_steps} steps unlearn every negative with its initial weight, without selection. Lower "
                "reweight_warmup_steps (a float in [0, 1) is a share of the run, e.g. 0.2) or raise max_steps.",
            )
        self.schedule = set(self._plan(max_steps))
        self._window_start = time.perf_counter()
        if self.ref_pair_logps is None and getattr(self.objective, "needs_reference", False):
            # Before any optimizer step: without a reference model or adapter, the policy now IS the start model
            with scoring_mode(self.host.policy()) as model:
                self.ref_pair_logps = self._reference_pair_logps(model)
        if self.refresh_index == 0 and step == self.initial_step:
            return self.refresh(step)
        if self.in_training and self.query is not None:
            self._attach_ghost()  # resumed: keep scoring trained negatives with the restored v
        return None

    def step_end(self, step: int, stopping: bool) -> RefreshRecord | None:
        """After optimizer step `step`: run a refresh when one is due (not when training stops anyway)."""
        self._lr_sum += self.host.learning_rate()
        due = step in self.schedule if self.refresh_index else step == self.initial_step
        if due and not stopping:
            return self.refresh(step)
        return None

    def end(self, step: int) -> None:
        """At the end of training: detach the hooks, report the cost, and record J after the last window."""
        if self.ghost is not None:
            self.ghost.detach()
            self.ghost = None
        cost = self._report_cost()
        if self.history and (self.history[-1]["step"] < step or self.history[-1].get("stopped")):
            # J after the last window, so that every refresh has its realised change (no scoring: weights are final);
            # an early stop gets it too (after a collapse guard's restore, the model differs from the refresh's)
            self.host.log_metrics({"u2a/objective": self._final_objective(step, cost)})
        elif self.history:
            self.history[-1].update(cost)

    # ---------------------------------------------------------------- refresh
    def refresh(self, step: int) -> RefreshRecord:
        """One refresh after `step` optimizer steps; returns its record (also appended to `history`). A record with
        `stopped` asks the training loop to stop."""
        started = time.perf_counter()
        host, args = self.host, self.host.args
        model = host.policy()
        generator = torch.Generator().manual_seed(mix_seed(args.seed, self.refresh_index))
        if self.ghost is not None:
            self.ghost.detach()
            self.ghost = None

        # With in-training scores, the trained negatives were scored with the previous refresh's query: the ranking
        # uses that query for every candidate (one scale), and the new one scores the next window
        lagged = self.in_training and self.query is not None
        with scoring_mode(model):
            if self.ref_pair_logps is None and getattr(self.objective, "needs_reference", False):
                # `begin` takes them before the first step; a refresh called on its own takes them now
                self.ref_pair_logps = self._reference_pair_logps(model)
            second_moments = None
            if args.preconditioner == "adam" and args.preconditioner_batches > 0 and step == 0:
                second_moments = gradient_second_moments(model, self.loss_fn, self._dry_batches(generator))
            query = compute_query(
                model,
                self.objective,
                self._pair_batches(model, generator, self.pairs_first if self.refresh_index == 0 else self.pairs_later),
                preconditioner=args.preconditioner,
                damping=args.damping,
                optimizer=host.optimizer,
                second_moments=second_moments,
            )
            query.refresh = self.refresh_index
            ranking_query = self.query if lagged else query
            candidates, fresh_ids, fresh_scores = self._candidates(generator, lagged)
            scores = self._score(model, ranking_query, candidates)
            retain_nll = self._retain_nll(model) if args.retain_nll_tolerance is not None else None

        ids = torch.cat([candidates, fresh_ids])
        all_scores = torch.cat([scores.double(), fresh_scores])
        record: RefreshRecord = {
            "refresh": self.refresh_index,
            "step": step,
            "objective": query.objective_value,
            "num_pairs": query.num_pairs,
            "preconditioner": query.preconditioner,
            "ranked_with_query_of": ranking_query.refresh,
            "ranking_preconditioner": ranking_query.preconditioner,
            "num_scored": len(candidates),
            "num_scored_in_training": len(fresh_ids),
            "retain_nll": retain_nll,
        }
        if self.history:
            self._close_window(self.history[-1], query.objective_value)
        self._lr_sum = 0.0
        self._select(record, ids, all_scores)
        self.query = query
        self.fresh_scores = {}
        if self.in_training:
            self._attach_ghost()
        reason = self.stop_rule.check(record)
        if reason is not None:
            record["stopped"] = reason
            self._say(logging.WARNING, f"U2A early stop at step {step}: {reason}.")
        if record.get("collapsed"):
            restored = self.collapse_guard.restore(model)
            if restored is not None:
                record["restored_step"] = restored
        else:
            self.collapse_guard.snapshot(model, step)
        self._time(record, started)
        self._log(record, ids, all_scores)
        self.history.append(record)
        self.refresh_index += 1
        return record

    def _select(self, record: RefreshRecord, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Select and reweight from `scores` `(m,)` of negatives `ids` `(m,)` into `record` and the host's weights;
        skip non-finite refreshes, and stop when no negative is predicted to help any more."""
        host, args = self.host, self.host.args
        finite = torch.isfinite(scores)
        if not math.isfinite(record["objective"]) or not bool(finite.all()):
            record["skipped"] = (
                f"non-finite alignment objective ({record['objective']}) or scores "
                f"({int((~finite).sum())} of {len(scores)})"
            )
            self._say(
                logging.WARNING,
                f"U2A refresh {self.refresh_index} at step {record['step']} skipped: {record['skipped']}. The "
                "weights stay as they were.",
            )
            return
        if args.auto_budget and self.refresh_index == 0:
            self.auto_budget = auto_budget_count(scores, host.budget)
            record["budget"] = self.auto_budget
            self._say(
                logging.INFO,
                f"U2A: the initial pass sets the budget to {self.auto_budget} of {len(scores)} negatives (auto_budget: "
                f"the positive scores at or above their Otsu threshold, at most budget={host.budget}); later "
                "refreshes keep it. auto_budget=False selects exactly budget.",
            )
        new_state, info = refresh_weights(
            host.weight_state,
            ids,
            scores,
            self.budget,
            weight_lr=args.weight_lr,
            score_clip=args.score_clip,
            max_weight=args.max_weight,
            sparsity=args.sparsity,
        )
        record.update(info)
        if info["n_selected"] == 0:
            initial = self.refresh_index == 0
            nothing = (
                f"no negative has a positive influence score at the initial pass ({len(ids)} scored, mean |s| = "
                f"{info['score_scale']:.3g}): unlearning any of them is predicted to raise the alignment loss J"
            )
            page = docs_page("troubleshooting", "no-negative-has-a-positive-influence-score")
            advice = (
                "Check that alignment_dataset's rejected responses resemble the negatives, and that the start model "
                f"is not untrained or memorised ({page})."
            )
            if initial and record["step"] == 0:
                # Nothing trained yet: refusing to start loses nothing
                raise ValueError(f"{nothing[0].upper()}{nothing[1:]}. {advice}")
            # After a warm-up (the initial pass) or later (the brake of re-selection): stop with the weights as they
            # are, so that the steps trained so far end in a saved model rather than a traceback
            record["stopped"] = nothing if initial else "no negative has a positive influence score any more"
            self._say(
                logging.WARNING,
                f"U2A early stop at step {record['step']}: {record['stopped']}; the weights stay as they were."
                + (f" {advice}" if initial else ""),
            )
        else:
            host.set_weights(new_state)
        if info["score_scale"] < NEGLIGIBLE_SCORE_SCALE:
            self._say(
                logging.WARNING,
                f"U2A refresh {self.refresh_index}: the scores are negligible (mean |s| = {info['score_scale']:.3g}). "
                "The model may have memorised its negatives (near-zero gradients), and the selection is then noise.",
            )

    @property
    def budget(self) -> int:
        """How many negatives a refresh selects: the initial pass's `auto_budget`, else the host's (numeric) budget."""
        return self.host.budget if self.auto_budget is None else self.auto_budget

    def _close_window(self, previous: RefreshRecord, objective: float) -> None:
        """J at the end of the window that `previous` opened, and its predicted change."""
        previous["objective_next"] = objective
        previous["realised_change"] = objective - previous["objective"]
        previous["predicted_change"] = -self._lr_sum * previous.get("predicted_gain", 0.0)

    def _time(self, record: RefreshRecord, started: float) -> None:
        """Record the refresh's wall time and that of the training window before it (this process's clock)."""
        now = time.perf_counter()
        record["refresh_seconds"] = now - started
        if self._window_start is not None:
            record["window_seconds"] = started - self._window_start
        self._window_start = now

    def _plan(self, max_steps: int) -> list[int]:
        """The steps after which a refresh runs: `reweight_steps`, or the overhead-bounded schedule. Warns once when a
        fixed cadence costs more than `reweight_overhead` of the training compute."""
        args = self.host.args
        # With in-training scores a refresh scores the pool and ∇J; without, also every selected negative
        rescored = 0 if self.in_training else self.budget
        rows = refresh_rows(self.pairs_later, self.pool_size, rescored)
        if args.reweight_steps is None:
            steps = refresh_steps(max_steps, self.rows_per_step, rows, args.reweight_overhead, start=self.initial_step)
            self._say(
                logging.INFO,
                f"U2A: the initial pass after step {self.initial_step}{self._no_selection_note(max_steps)}, then "
                f"{len(steps)} refreshes after the initial pass, after steps {steps} of {max_steps} (each about "
                f"{rows} row passes; in all at most {args.reweight_overhead:.0%} of the training's row passes, a bound "
                "on work: their share of the wall time can differ a little).",
            )
            return steps
        share = rows / (args.reweight_steps * self.rows_per_step)
        if share > args.reweight_overhead:
            self._say(
                logging.WARNING,
                f"reweight_steps={args.reweight_steps}: each refresh costs about {rows} row passes (2 x "
                f"{self.pairs_later} alignment pairs + a pool of {self.pool_size} + {rescored} rescored negatives), "
                f"{share:.0%} of the {args.reweight_steps} x {self.rows_per_step} rows trained between two refreshes, "
                f"above reweight_overhead={args.reweight_overhead}. Leave reweight_steps=None to place the refreshes "
                f"within that bound, or raise reweight_steps or the effective batch "
                f"({docs_page('usage', 'choosing-the-knobs')}).",
            )
        return fixed_steps(max_steps, args.reweight_steps, start=self.initial_step)

    def _no_selection_note(self, max_steps: int) -> str:
        """What the plan line adds when the warm-up reaches the end of the run (every step before it unselected)."""
        if self.initial_step < max_steps - 1 or self.initial_step == 0:
            return ""
        return f" (the warm-up covers the run: steps 1-{self.initial_step} train every negative, no selection)"

    def _report_cost(self) -> dict[str, float]:
        """What reweighting cost (`record.reweighting_cost`), logged and returned for the last record."""
        args = self.host.args
        cost = reweighting_cost(self.history, self.rows_per_step)
        if cost:
            initial = self.history[0]
            later = sum(r.get("refresh") is not None for r in self.history) - 1
            self._say(
                logging.INFO,
                f"U2A reweighting cost: the initial pass {cost['initial_pass_seconds']:.1f} s "
                f"({cost['initial_pass_multiple']:.2f}x one training pass over its {initial['num_scored']} "
                f"candidates); the {later} later refreshes {cost['reweight_share']:.1%} of the training time "
                f"(reweight_overhead={args.reweight_overhead} bounds their row passes, not their time).",
            )
        return cost

    def _final_objective(self, step: int, extra: dict[str, Any]) -> float:
        """`J` of the current model on the alignment pairs (no gradient), recorded with `extra` as the final point of
        `history`."""
        model = self.host.policy()
        generator = torch.Generator().manual_seed(mix_seed(self.host.args.seed, self.refresh_index))
        total = torch.zeros(2, dtype=torch.float64)
        with scoring_mode(model), torch.no_grad():
            for batch in self._pair_batches(model, generator, self.pairs_first):
                losses = self.objective(model, batch)[~batch[PADDING]]
                total += torch.tensor([losses.double().sum().item(), len(losses)], dtype=torch.float64)
        total = self.host.sharding.reduce_sum(total)
        value = float(total[0] / total[1])
        self._close_window(self.history[-1], value)
        final: RefreshRecord = {"refresh": None, "step": step, "objective": value, "final": True, **extra}
        self.history.append(final)
        if self.host.sharding.is_main_process:
            self.trace.write_record(final)
        return value

    # ---------------------------------------------------------------- batches
    def _pair_batches(self, model: nn.Module, generator: torch.Generator | None, sample: int) -> Iterator[dict]:
        """This rank's share of `sample` alignment pairs drawn with `generator` (all of them, in order and without
        drawing, when `sample` is the number of pairs), collated, with their reference log-probs once known; each
        batch is built when asked for (the draw happens at the first)."""
        num_pairs = len(self.pairs)
        order = torch.arange(num_pairs)
        if sample < num_pairs:
            order = torch.randperm(num_pairs, generator=generator)[:sample].sort().values
        local, padding = self.host.sharding.chunk(order.tolist())
        device = model_device(model)
        for start in range(0, len(local), self.batch_size):
            rows = local[start : start + self.batch_size]
            batch = self.pair_collator([self.pairs[i] for i in rows])
            batch[PADDING] = padding[start : start + self.batch_size]
            if self.ref_pair_logps is not None:
                batch["ref_chosen_logps"] = self.ref_pair_logps[rows, 0]
                batch["ref_rejected_logps"] = self.ref_pair_logps[rows, 1]
            yield move_batch(batch, device)

    def _reference_pair_logps(self, model: nn.Module) -> torch.Tensor:
        """`log π_0` of every pair's chosen and rejected completion, `(P, 2)`, computed once (saved in checkpoints):
        the host's reference model, or the policy under the host's reference context, or the policy itself (this
        runs before any optimizer step)."""
        reference, context = self.host.reference()
        if reference is not None:
            model = reference
        num_pairs = len(self.pairs)
        batches = self._pair_batches(model, None, num_pairs)  # every pair, in order: this rank's padded chunk
        values = pair_reference_values(model, batches, reference_context=context)
        local = torch.stack([values["ref_chosen_logps"], values["ref_rejected_logps"]], dim=1)
        return self.host.sharding.gather_chunks(local.float(), num_pairs)

    def _dry_batches(self, generator: torch.Generator) -> list[dict]:
        """`preconditioner_batches` random batches of the negatives that can be selected, each of the size of one
        global training micro-batch, this rank's share of each (padding marked): to estimate Adam's second moments."""
        host = self.host
        eligible = torch.nonzero(host.weight_state.selected).flatten()
        size = host.args.per_device_train_batch_size * host.sharding.world
        draws = host.args.preconditioner_batches * size
        order = torch.cat(
            [eligible[torch.randperm(len(eligible), generator=generator)] for _ in range(-(-draws // len(eligible)))]
        )[:draws]
        device = model_device(host.policy())
        batches = []
        for start in range(0, draws, size):
            local, padding = host.sharding.chunk(order[start : start + size].tolist())
            batch = next(iter(host.negative_batches(local, len(local), device)))
            batch[PADDING] = padding.to(device)
            batches.append(batch)
        return batches

    def _candidates(self, generator: torch.Generator, lagged: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negatives to score now, and the (ids, scores) scored during training since the last refresh (all ranks).

        `lagged`: the ranking uses the in-training query, so the selected negatives not trained since the last refresh
        are carried rather than rescored; otherwise every selected negative is rescored with the new query."""
        selected = self.host.weight_state.selected
        if self.refresh_index == 0:
            # The initial weights (a `weight` column) may exclude negatives from the start
            eligible = torch.nonzero(selected).flatten()
            return eligible, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        merged: dict[int, tuple] = {}
        for part in self.host.sharding.gather_object(self.fresh_scores):
            for i, entry in part.items():
                if i not in merged or entry[0] > merged[i][0]:
                    merged[i] = entry
        fresh_ids = torch.tensor(sorted(i for i in merged if selected[i]), dtype=torch.long)
        fresh_scores = torch.tensor([merged[int(i)][1] for i in fresh_ids], dtype=torch.float64)
        stale = torch.zeros(0, dtype=torch.long)
        if not lagged:
            selected_ids = torch.nonzero(selected).flatten()
            stale = selected_ids[~torch.isin(selected_ids, fresh_ids)]
        unselected = torch.nonzero(~selected).flatten()
        pool_size = min(self.pool_size, len(unselected))
        pool = unselected[torch.randperm(len(unselected), generator=generator)[:pool_size]].sort().values
        return torch.cat([stale, pool]), fresh_ids, fresh_scores

    def _score(self, model: nn.Module, query: QueryVector, candidates: torch.Tensor) -> torch.Tensor:
        """Scores of `candidates` `(m,)`: each rank scores a contiguous chunk, padded to equal size, then gathered."""
        m = len(candidates)
        # At least one entry, so that every rank still takes part in the gather when there is nothing to score
        chunk, _ = self.host.sharding.chunk(candidates.tolist(), min_size=1)
        scores = torch.zeros(max(1, len(chunk)), dtype=torch.float32)
        if m:
            # Built one batch at a time, on the CPU; `score_dataset` moves each to the device (all of them at once
            # would hold every candidate there at refresh 0)
            batches = self.host.negative_batches(chunk, self.batch_size, torch.device("cpu"))
            scores = score_dataset(
                model,
                batches,
                self.loss_fn,
                query,
                desc=f"U2A refresh {self.refresh_index}",
                disable_progress=self.host.args.disable_tqdm,
                total=-(-len(chunk) // self.batch_size),
            ).cpu()
        return self.host.sharding.gather_chunks(scores, m)

    def _retain_nll(self, model: nn.Module) -> float | None:
        """Token-mean NLL of a fixed sample of retain examples (the guard against gradient-ascent collapse)."""
        host = self.host
        if host.num_retain == 0:
            if not self._warned_no_retain:
                self._say(
                    logging.WARNING, "retain_nll_tolerance is set but train_dataset has no retain rows; it is ignored."
                )
                self._warned_no_retain = True
            return None
        local, padding = host.sharding.chunk(list(range(min(RETAIN_SAMPLE, host.num_retain))))
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            batches = host.retain_batches(local, self.batch_size, model_device(model))
            for start, batch in zip(range(0, len(local), self.batch_size), batches):
                logps, lengths = sequence_logps(
                    model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                )
                real = ~padding[start : start + self.batch_size].to(logps.device)
                logps, lengths = logps[real], lengths[real]
                total += torch.stack(
                    [
                        (-logps / lengths.clamp(min=1)).sum().double().cpu(),
                        torch.tensor(len(logps), dtype=torch.float64),
                    ]
                )
        total = host.sharding.reduce_sum(total)
        return float(total[0] / total[1])

    # ---------------------------------------------------------- in-training
    def _attach_ghost(self) -> None:
        model = self.host.policy()
        if not resolve_tracking(model).covers(self.query):
            # e.g. DoRA: its weights act outside the module calls the ghost hooks see, so scoring is brute force
            self._say(
                logging.INFO, "in_training_scores is off: the query covers parameters the ghost scorer cannot hook."
            )
            self.in_training = False
            return
        self.ghost = GhostDotProduct(model, self.query, active=False)

    @property
    def scoring_in_training(self) -> bool:
        """Whether the next training backward should go through `record_training_scores`."""
        return self.ghost is not None

    def record_training_scores(self, negative_ids: torch.Tensor, coefficients, run_backward):
        """Run `run_backward()` (a training forward+backward) while recording the in-training scores of its rows.

        Row `i` records `c_i s_i` where `c_i` is its coefficient in the backpropagated loss (`coefficients()`, read
        after the backward, `(B,)`); `s_i` is recovered for rows with `c_i > 0` (negatives with positive weight) and
        kept until the next refresh, with its position in the global batch sequence so that merging the ranks keeps
        the latest score, as a one-process run would.
        """
        if self.ghost is None:
            return run_backward()
        with self.ghost.recording():
            result = run_backward()
        recorded = self.ghost.scores(batch_size=len(negative_ids)).double().cpu()
        coefficients = coefficients().double().cpu()
        offset = self.host.sharding.rank * len(negative_ids)
        rows = torch.nonzero(coefficients > 0).flatten()
        # One conversion per micro-batch, not two scalar reads per row
        ids = negative_ids.cpu()[rows].tolist()
        scores = (recorded[rows] / coefficients[rows]).tolist()
        for i, negative_id, score in zip(rows.tolist(), ids, scores):
            self.fresh_scores[negative_id] = ((self._micro_batches, offset + i), score)
        self._micro_batches += 1
        return result

    # ---------------------------------------------------------------- output
    def _log(self, record: RefreshRecord, ids: torch.Tensor, scores: torch.Tensor) -> None:
        previous = self.history[-1] if self.history else None
        metrics = refresh_metrics(record, previous)
        self.host.log_metrics(metrics)
        if self.host.sharding.is_main_process:
            record["weights"] = self.host.weight_state.weights.tolist()
            for previous in self.history:  # only the latest refresh's scores are kept in memory (the plots read them)
                previous.pop("last_scores", None)
            record["last_scores"] = dict(zip(ids.tolist(), scores.tolist()))
            self.trace.write_rows(record, ids, scores, self.host.weight_state.weights, self.host.negative_names)
            self.trace.write_record(record)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        state = {
            "refresh_index": self.refresh_index,
            # Without the in-memory weight vectors and scores: they would make every checkpoint grow with
            # refreshes x negatives (the trace files hold them)
            "history": [{k: v for k, v in r.items() if k not in IN_MEMORY_ONLY} for r in self.history],
            "ref_pair_logps": self.ref_pair_logps,
            "lr_sum": self._lr_sum,
            "micro_batches": self._micro_batches,
            "auto_budget": self.auto_budget,
            "fresh_scores": self.host.sharding.gather_object(self.fresh_scores),
            **self.stop_rule.state_dict(),
        }
        if self.query is not None and self.in_training:
            # By parameter name: a resume checks each tensor against the parameter of that name
            names = _parameter_names(self.host.policy())
            state["query"] = {names[p]: v.cpu() for p, v in self.query.items()}
            state["query_attrs"] = {
                k: getattr(self.query, k) for k in ("objective_value", "num_pairs", "preconditioner", "refresh")
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refresh_index = state["refresh_index"]
        self.history = state["history"]
        if self.host.sharding.is_main_process:
            self.trace.truncate(self.refresh_index)
        self.ref_pair_logps = state["ref_pair_logps"]
        self.stop_rule.load_state_dict(state)
        self._lr_sum = state["lr_sum"]
        self._micro_batches = state["micro_batches"]
        self.auto_budget = state.get("auto_budget")  # absent from checkpoints written before auto_budget
        rank = self.host.sharding.rank
        parts = state["fresh_scores"]
        self.fresh_scores = dict(parts[rank]) if rank < len(parts) else {}
        if "query" in state:
            self.query = self._restored_query(state["query"])
            for k, v in state["query_attrs"].items():
                setattr(self.query, k, v)

    def _restored_query(self, saved: dict[str, torch.Tensor] | list[torch.Tensor | None]) -> QueryVector:
        """The checkpoint's query `{parameter name: tensor}` on this model's parameters (an earlier trl-u2a saved a
        list in `tracked_parameters` order), refused when a name is missing or a shape differs.

        Raises:
            ValueError: naming the parameters and shapes that disagree.
        """
        model = self.host.policy()
        by_name = {name: p for p, name in _parameter_names(model).items()}
        if isinstance(saved, list):
            tracked = tracked_parameters(model, warn=False)
            if len(saved) != len(tracked):
                raise ValueError(
                    f"The checkpoint's in-training query has {len(saved)} parameter tensors but this model tracks "
                    f"{len(tracked)}: it was saved with another adapter or set of target modules. Resume with the "
                    "peft_config of the run that wrote it, or start from scratch."
                )
            names = _parameter_names(model)
            saved = {names[p]: v for p, v in zip(tracked, saved) if v is not None}
        missing = sorted(set(saved) - set(by_name))
        reshaped = [
            f"{name} {tuple(v.shape)} (this model: {tuple(by_name[name].shape)})"
            for name, v in saved.items()
            if name in by_name and v.shape != by_name[name].shape
        ]
        if missing or reshaped:
            problems = ([f"parameters this model lacks: {', '.join(missing[:5])}"] if missing else []) + (
                [f"other shapes: {', '.join(reshaped[:5])}"] if reshaped else []
            )
            raise ValueError(
                f"The checkpoint's in-training query does not fit this model ({'; '.join(problems)}): it was saved "
                "with another adapter or set of target modules. Resume with the peft_config of the run that wrote "
                "it, or start from scratch."
            )
        query = QueryVector()
        for name, v in saved.items():
            query[by_name[name]] = v.to(by_name[name].device)
        return query


def _parameter_names(model: nn.Module) -> dict[nn.Parameter, str]:
    """`{parameter: name}` of the unwrapped `model` (the names a checkpoint's query is saved under)."""
    return {p: name for name, p in unwrap_model(model).named_parameters()}
