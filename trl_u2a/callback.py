"""`U2ARefreshCallback`: the periodic bi-level refresh that scores, selects and reweights the negatives.

Before the first step (the initial pass), then after the steps of `schedule.refresh_steps` (or every
`reweight_steps`):

1. `v = P⁻¹∇J` on the alignment set (or a sample of its pairs), pairs sharded across ranks, `∇J` all-reduced; at the
   initial pass, Adam's second moments are estimated from a few batches when the optimizer has no state yet;
2. scores `s_i = ⟨v, ∇ℓ_i⟩` of the candidates, all with ONE query vector (a ranking never mixes scales): every
   negative at the initial pass. Later, with in-training scores, the ranking uses the query the trained negatives
   were scored with during the window (the previous refresh's): it scores the exploration pool with it too, carries
   the selected negatives not trained since, and installs the new `v` for the next window. Without in-training
   scores, the selected negatives and the pool are scored with the new `v`. Candidates are sharded across ranks and
   the scores gathered;
3. selection of the top-`budget` positive scores and the tempered mirror-ascent update (`weighting.refresh_weights`),
   computed identically on every rank.

Every collective runs on every rank in the same order, whatever the data. Only the main process writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl.trainer.utils import use_adapter

from . import data as u2a_data
from .influence import (
    PADDING,
    GhostDotProduct,
    compute_query,
    gradient_second_moments,
    make_unlearning_loss_fn,
    resolve_tracking,
    score_dataset,
    scoring_mode,
    tracked_parameters,
)
from .modeling import move_batch, sequence_logps
from .objectives import DPOObjective, as_objective, reference_logps
from .sampler import mix_seed
from .schedule import fixed_steps, refresh_rows, refresh_steps
from .weighting import refresh_weights

logger = get_logger(__name__)

TRACE_FILE = "u2a_trace.jsonl"
REFRESH_FILE = "u2a_refreshes.jsonl"
RETAIN_SAMPLE = 64
SNAPSHOT_MAX_NUMEL = 200_000_000  # 0.8 GB in fp32: adapters, not full models


class U2ARefreshCallback(TrainerCallback):
    """Runs U2A's refresh inside a `U2ATrainer`; installed by the trainer when it gets an `alignment_dataset`.

    Args:
        trainer: the `U2ATrainer` (a callback is not given the trainer by transformers, and the refresh needs its
            model, optimizer, datasets and accelerator).
        alignment_dataset: preference pairs (`prompt, chosen, rejected`, standard or conversational).
        objective: a custom alignment objective (`trl_u2a.objectives`); default the DPO loss with `args.beta_pa`.
    """

    def __init__(self, trainer, alignment_dataset, objective=None):
        args = trainer.args
        self.trainer = trainer
        tokenizer = trainer._tokenizer
        self.pairs = u2a_data.tokenize_pairs(
            alignment_dataset, tokenizer, args.max_length, "alignment_dataset", num_proc=args.dataset_num_proc
        )
        world = trainer.accelerator.num_processes
        if len(self.pairs) < world:
            raise ValueError(
                f"alignment_dataset has {len(self.pairs)} pairs but the run has {world} processes; every process needs "
                "at least one pair."
            )
        if args.pa_samples is not None and args.pa_samples > len(self.pairs):
            raise ValueError(
                f"pa_samples={args.pa_samples} is larger than the {len(self.pairs)} pairs of alignment_dataset; use "
                f"pa_samples ≤ {len(self.pairs)} or None (automatic)."
            )
        # Rows one optimizer step trains: the unit of the automatic pool, pair sample and cadence
        self.rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        self.pool_size = self.rows_per_step if args.pool_size is None else args.pool_size
        self.pairs_first = len(self.pairs) if args.pa_samples is None else args.pa_samples
        self.pairs_later = min(len(self.pairs), self.rows_per_step) if args.pa_samples is None else args.pa_samples
        self.schedule: set[int] = set()  # optimizer steps after which a refresh runs (`on_train_begin`)
        self.initial_step = 0  # the step after which the initial pass runs (`reweight_warmup_steps`)
        self.pair_collator = u2a_data.PairCollator(tokenizer.pad_token_id, args.max_length)
        self.objective = as_objective(objective) if objective is not None else DPOObjective(args.beta_pa)
        self.loss_fn = make_unlearning_loss_fn(args.loss_type, args.beta, args.gamma, args.ga_reduction)
        self.batch_size = args.scoring_batch_size or args.per_device_train_batch_size

        self.refresh_index = 0  # refreshes done
        self.history: list[dict[str, Any]] = []
        self.ref_pair_logps: torch.Tensor | None = None  # (P, 2): log π_0 of chosen and rejected
        self.best_objective = math.inf
        self.refreshes_without_improvement = 0
        self.retain_nll_start: float | None = None
        # In-training scores since the last refresh on this rank: id -> ((micro-batch, global row), score)
        self.fresh_scores: dict[int, tuple] = {}
        self._micro_batches = 0
        self.query = None  # v of the last refresh
        self.ghost: GhostDotProduct | None = None
        self._lr_sum = 0.0
        self._warned_no_retain = False
        self._window_start: float | None = None  # when the last refresh ended (wall clock of this process)
        self._good: tuple[int, dict[str, torch.Tensor]] | None = None  # last trainable parameters that passed the guard
        # TRL's fused LM head reads `lm_head.weight` without calling the module, so the training backward cannot see
        # the head's share of a score; with a trainable head (full fine-tuning) every refresh rescores instead.
        head = trainer.model.get_output_embeddings()
        self.in_training = args.in_training_scores and not (head is not None and head.weight.requires_grad)
        if args.in_training_scores and not self.in_training:
            logger.info(
                "in_training_scores is off: the output embedding is trainable and TRL's fused LM head bypasses its "
                "module, so trained negatives are rescored at each refresh instead.",
                main_process_only=True,
            )

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, args, state, control, **kwargs):
        warmup = args.reweight_warmup_steps
        self.initial_step = min(int(warmup * state.max_steps) if warmup < 1 else int(warmup), state.max_steps - 1)
        self.schedule = set(self._plan(state.max_steps))
        self._window_start = time.perf_counter()
        if self.ref_pair_logps is None and getattr(self.objective, "needs_reference", False):
            # Before any optimizer step: without a reference model or adapter, the policy now IS the start model
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            with scoring_mode(model):
                self.ref_pair_logps = self._reference_pair_logps(model)
        if self.refresh_index == 0 and state.global_step == self.initial_step:
            self.refresh(state, control)
        elif self.in_training and self.query is not None:
            self._attach_ghost()  # resumed: keep scoring trained negatives with the restored v

    def on_step_end(self, args, state, control, **kwargs):
        self._lr_sum += self.trainer._get_learning_rate()
        due = state.global_step in self.schedule if self.refresh_index else state.global_step == self.initial_step
        if due and not control.should_training_stop:
            self.refresh(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if self.ghost is not None:
            self.ghost.detach()
            self.ghost = None
        cost = self._report_cost()
        if self.history and self.history[-1]["step"] < state.global_step:
            # J after the last window, so that every refresh has its realised change (no scoring: weights are final)
            final = self._objective(state.global_step, cost)
            self.trainer.log_refresh({"u2a/objective": final})
        elif self.history:
            self.history[-1].update(cost)
        if self.trainer.accelerator.is_main_process and self.history and args.save_refresh_plots:
            from .plots import plot_refreshes

            plot_refreshes(self.history, os.path.join(args.output_dir, "u2a_plots"))

    # ---------------------------------------------------------------- refresh
    def refresh(self, state, control) -> dict[str, Any]:
        """One refresh; returns its record (also appended to `history`)."""
        started = time.perf_counter()
        trainer, args = self.trainer, self.trainer.args
        accelerator = trainer.accelerator
        model = accelerator.unwrap_model(trainer.model)
        generator = torch.Generator().manual_seed(mix_seed(args.seed, self.refresh_index))
        if self.ghost is not None:
            self.ghost.detach()
            self.ghost = None

        # With in-training scores, the trained negatives were scored with the previous refresh's query: the ranking
        # uses that query for every candidate (one scale), and the new one scores the next window
        lagged = self.in_training and self.query is not None
        with scoring_mode(model):
            if self.ref_pair_logps is None and getattr(self.objective, "needs_reference", False):
                # `on_train_begin` takes them before the first step; a refresh called on its own takes them now
                self.ref_pair_logps = self._reference_pair_logps(model)
            second_moments = None
            if args.preconditioner == "adam" and args.preconditioner_batches > 0 and state.global_step == 0:
                second_moments = gradient_second_moments(model, self.loss_fn, self._dry_batches(generator))
            query = compute_query(
                model,
                self.objective,
                self._pair_batches(model, generator, self.pairs_first if self.refresh_index == 0 else self.pairs_later),
                preconditioner=args.preconditioner,
                damping=args.damping,
                optimizer=trainer.optimizer,
                second_moments=second_moments,
            )
            query.refresh = self.refresh_index
            ranking_query = self.query if lagged else query
            candidates, fresh_ids, fresh_scores = self._candidates(generator, lagged)
            scores = self._score(model, ranking_query, candidates)
            retain_nll = self._retain_nll(model) if args.retain_nll_tolerance is not None else None

        ids = torch.cat([candidates, fresh_ids])
        all_scores = torch.cat([scores.double(), fresh_scores])
        record: dict[str, Any] = {
            "refresh": self.refresh_index,
            "step": state.global_step,
            "objective": query.objective_value,
            "num_pairs": query.num_pairs,
            "preconditioner": query.preconditioner,
            # The refresh whose query vector scored every candidate of this ranking
            "ranked_with_query_of": ranking_query.refresh,
            "ranking_preconditioner": ranking_query.preconditioner,
            "num_scored": len(candidates),
            "num_scored_in_training": len(fresh_ids),
            "retain_nll": retain_nll,
        }
        if self.history:
            previous = self.history[-1]
            previous["objective_next"] = query.objective_value
            previous["realised_change"] = query.objective_value - previous["objective"]
            previous["predicted_change"] = -self._lr_sum * previous.get("predicted_gain", 0.0)
        self._lr_sum = 0.0

        finite = torch.isfinite(all_scores)
        if not math.isfinite(query.objective_value) or not bool(finite.all()):
            record["skipped"] = (
                f"non-finite alignment objective ({query.objective_value}) or scores "
                f"({int((~finite).sum())} of {len(all_scores)})"
            )
            logger.warning(
                f"U2A refresh {self.refresh_index} at step {state.global_step} skipped: {record['skipped']}. The "
                "weights stay as they were.",
                main_process_only=True,
            )
        else:
            new_state, info = refresh_weights(
                trainer.weight_state,
                ids,
                all_scores,
                trainer.budget,
                weight_lr=args.weight_lr,
                score_clip=args.score_clip,
                max_weight=args.max_weight,
                sparsity=args.sparsity,
            )
            record.update(info)
            if info["n_selected"] == 0:
                if self.refresh_index == 0:
                    raise ValueError(
                        f"No negative has a positive influence score at the initial pass ({len(ids)} scored, mean "
                        f"|s| = {info['score_scale']:.3g}): unlearning any of them is predicted to raise the alignment "
                        "loss J. Check that alignment_dataset's rejected responses resemble the negatives, and that "
                        "the start model is not untrained or memorised."
                    )
                # The brake of re-selection: nothing is predicted to help any more, so stop with the last weights
                record["stopped"] = "no negative has a positive influence score any more"
                control.should_training_stop = True
                logger.warning(
                    f"U2A early stop at step {state.global_step}: {record['stopped']}; the weights stay as they were.",
                    main_process_only=True,
                )
            else:
                trainer.set_weights(new_state)
            if info["score_scale"] < args.min_score_scale:
                logger.warning(
                    f"U2A refresh {self.refresh_index}: the scores are negligible "
                    f"(mean |s| = {info['score_scale']:.3g} "
                    f"< min_score_scale={args.min_score_scale}). The model may have memorised its negatives (near-zero "
                    "gradients), and the selection is then noise.",
                    main_process_only=True,
                )
        self.query = query
        self.fresh_scores = {}
        if self.in_training:
            self._attach_ghost()
        self._check_stop(record, control)
        if record.get("collapsed"):
            self._restore_snapshot(record)
        else:
            self._snapshot(state.global_step)
        self._time(record, started)
        self._log(record, ids, all_scores)
        self.history.append(record)
        self.refresh_index += 1
        return record

    def _time(self, record: dict[str, Any], started: float) -> None:
        """Record the refresh's wall time and that of the training window before it (this process's clock)."""
        now = time.perf_counter()
        record["refresh_seconds"] = now - started
        if self._window_start is not None:
            record["window_seconds"] = started - self._window_start
        self._window_start = now

    def _plan(self, max_steps: int) -> list[int]:
        """The steps after which a refresh runs: `reweight_steps`, or the overhead-bounded schedule. Warns once when a
        fixed cadence costs more than `reweight_overhead` of the training compute."""
        args = self.trainer.args
        # With in-training scores a refresh scores the pool and ∇J; without, also every selected negative
        rescored = 0 if self.in_training else self.trainer.budget
        rows = refresh_rows(self.pairs_later, self.pool_size, rescored)
        if args.reweight_steps is None:
            steps = refresh_steps(max_steps, self.rows_per_step, rows, args.reweight_overhead, start=self.initial_step)
            logger.info(
                f"U2A: {len(steps)} refreshes after the initial pass, after steps {steps} of {max_steps} (each about "
                f"{rows} row passes, {args.reweight_overhead:.0%} of the training compute in all).",
                main_process_only=True,
            )
            return steps
        share = rows / (args.reweight_steps * self.rows_per_step)
        if share > args.reweight_overhead:
            logger.warning(
                f"reweight_steps={args.reweight_steps}: each refresh costs about {rows} row passes (2 x "
                f"{self.pairs_later} alignment pairs + a pool of {self.pool_size} + {rescored} rescored negatives), "
                f"{share:.0%} of the {args.reweight_steps} x {self.rows_per_step} rows trained between two refreshes, "
                f"above reweight_overhead={args.reweight_overhead}. Leave reweight_steps=None to place the refreshes "
                "within that bound, or raise reweight_steps or the effective batch (docs/usage.md).",
                main_process_only=True,
            )
        return fixed_steps(max_steps, args.reweight_steps, start=self.initial_step)

    def _report_cost(self) -> dict[str, float]:
        """What reweighting cost, logged and returned for the last record: the initial pass as a multiple of one
        training pass over its candidates, and the later refreshes as a share of the training time."""
        records = [r for r in self.history if r.get("refresh") is not None]
        if not records:
            return {}
        windows = sum(r.get("window_seconds", 0.0) for r in records)
        trained_rows = records[-1]["step"] * self.rows_per_step
        if windows <= 0 or trained_rows <= 0:
            return {}
        initial = records[0]
        seconds_per_row = windows / trained_rows
        cost = {
            "initial_pass_seconds": initial["refresh_seconds"],
            "initial_pass_multiple": initial["refresh_seconds"] / (seconds_per_row * max(1, initial["num_scored"])),
            "reweight_share": sum(r["refresh_seconds"] for r in records[1:]) / windows,
        }
        logger.info(
            f"U2A reweighting cost: the initial pass {cost['initial_pass_seconds']:.1f} s "
            f"({cost['initial_pass_multiple']:.2f}x one training pass over its {initial['num_scored']} candidates); "
            f"the {len(records) - 1} later refreshes {cost['reweight_share']:.1%} of the training time.",
            main_process_only=True,
        )
        return cost

    def _objective(self, step: int, extra: dict[str, Any]) -> float:
        """`J` of the current model on the alignment pairs (no gradient), recorded with `extra` as the final point of
        `history`."""
        trainer, accelerator = self.trainer, self.trainer.accelerator
        model = accelerator.unwrap_model(trainer.model)
        generator = torch.Generator().manual_seed(mix_seed(trainer.args.seed, self.refresh_index))
        total = torch.zeros(2, dtype=torch.float64)
        with scoring_mode(model), torch.no_grad():
            for batch in self._pair_batches(model, generator, self.pairs_first):
                losses = self.objective(model, batch)[~batch[PADDING]]
                total += torch.tensor([losses.double().sum().item(), len(losses)], dtype=torch.float64)
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
        value = float(total[0] / total[1])
        previous = self.history[-1]
        previous["objective_next"] = value
        previous["realised_change"] = value - previous["objective"]
        previous["predicted_change"] = -self._lr_sum * previous.get("predicted_gain", 0.0)
        self.history.append({"refresh": None, "step": step, "objective": value, "final": True, **extra})
        if accelerator.is_main_process:
            with open(os.path.join(trainer.args.output_dir, REFRESH_FILE), "a") as f:
                f.write(json.dumps(self.history[-1]) + "\n")
        return value

    def _pair_batches(self, model, generator, sample: int) -> list[dict]:
        """This rank's share of `sample` alignment pairs drawn with `generator` (all of them when `sample` is the
        number of pairs), collated, with their reference log-probs."""
        accelerator = self.trainer.accelerator
        num_pairs = len(self.pairs)
        order = torch.arange(num_pairs)
        if sample < num_pairs:
            order = torch.randperm(num_pairs, generator=generator)[:sample].sort().values
        local, padding = _padded_share(order.tolist(), accelerator.process_index, accelerator.num_processes)
        batches = []
        for start in range(0, len(local), self.batch_size):
            rows = local[start : start + self.batch_size]
            batch = self.pair_collator([self.pairs[i] for i in rows])
            batch[PADDING] = padding[start : start + self.batch_size]
            if self.ref_pair_logps is not None:
                batch["ref_chosen_logps"] = self.ref_pair_logps[rows, 0]
                batch["ref_rejected_logps"] = self.ref_pair_logps[rows, 1]
            batches.append(move_batch(batch, _device(model)))
        return batches

    def _reference_pair_logps(self, model) -> torch.Tensor:
        """`log π_0` of every pair's chosen and rejected completion, `(P, 2)`, computed once.

        The start model is, in order: the trainer's `ref_model`; under PEFT, TRL's frozen "ref" copy of a pretrained
        adapter or else the base model (adapter disabled); otherwise the policy itself, since this runs at the first
        refresh, before any optimizer step. Saved in checkpoints.
        """
        context = None
        if self.trainer.ref_model is not None:
            model = self.trainer.ref_model
        elif hasattr(model, "peft_config"):
            # TRL keeps a frozen copy of a pretrained adapter as "ref"; a fresh adapter's start model is the base
            adapter = "ref" if "ref" in model.peft_config else None
            context = partial(_reference_adapter, model, adapter)
        # Each rank computes an equal, padded chunk of the pairs
        accelerator = self.trainer.accelerator
        num_pairs = len(self.pairs)
        rows = u2a_data.padded_chunk(list(range(num_pairs)), accelerator.process_index, accelerator.num_processes)
        batches = _collated(self.pair_collator, self.pairs, rows, self.batch_size, _device(model))
        filled = reference_logps(model, batches, reference_context=context)
        local = torch.cat([torch.stack([b["ref_chosen_logps"], b["ref_rejected_logps"]], dim=1) for b in filled])
        return u2a_data.gather_chunks(accelerator, local.float(), num_pairs)

    def _dry_batches(self, generator) -> list[dict]:
        """`preconditioner_batches` random batches of the negatives that can be selected, each of the size of one
        global training micro-batch, this rank's share of each (padding marked): to estimate Adam's second moments."""
        trainer, accelerator = self.trainer, self.trainer.accelerator
        eligible = torch.nonzero(trainer.weight_state.weights > 0).flatten()
        size = trainer.args.per_device_train_batch_size * accelerator.num_processes
        draws = trainer.args.preconditioner_batches * size
        order = torch.cat(
            [eligible[torch.randperm(len(eligible), generator=generator)] for _ in range(-(-draws // len(eligible)))]
        )[:draws]
        device = _device(accelerator.unwrap_model(trainer.model))
        batches = []
        for start in range(0, draws, size):
            local, padding = _padded_share(
                order[start : start + size].tolist(), accelerator.process_index, accelerator.num_processes
            )
            rows = trainer._negative_rows[local].tolist()
            batch = _collated(trainer.data_collator, trainer.train_dataset, rows, len(rows), device)[0]
            batch[PADDING] = padding.to(device)
            batches.append(batch)
        return batches

    def _candidates(self, generator, lagged: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negatives to score now, and the (ids, scores) scored during training since the last refresh (all ranks).

        `lagged`: the ranking uses the in-training query, so the selected negatives not trained since the last refresh
        are carried rather than rescored; otherwise every selected negative is rescored with the new query."""
        trainer = self.trainer
        weights = trainer.weight_state.weights
        if self.refresh_index == 0:
            # The initial weights (a `weight` column) may exclude negatives from the start
            eligible = torch.nonzero(weights > 0).flatten()
            return eligible, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        merged: dict[int, tuple] = {}
        for part in gather_object([self.fresh_scores]):
            for i, entry in part.items():
                if i not in merged or entry[0] > merged[i][0]:
                    merged[i] = entry
        fresh_ids = torch.tensor(sorted(i for i in merged if weights[i] > 0), dtype=torch.long)
        fresh_scores = torch.tensor([merged[int(i)][1] for i in fresh_ids], dtype=torch.float64)
        stale = torch.zeros(0, dtype=torch.long)
        if not lagged:
            selected = torch.nonzero(weights > 0).flatten()
            stale = selected[~torch.isin(selected, fresh_ids)]
        unselected = torch.nonzero(weights <= 0).flatten()
        pool_size = min(self.pool_size, len(unselected))
        pool = unselected[torch.randperm(len(unselected), generator=generator)[:pool_size]].sort().values
        return torch.cat([stale, pool]), fresh_ids, fresh_scores

    def _score(self, model, query, candidates: torch.Tensor) -> torch.Tensor:
        """Scores of `candidates` `(m,)`: each rank scores a contiguous chunk, padded to equal size, then gathered."""
        accelerator = self.trainer.accelerator
        m = len(candidates)
        # At least one entry, so that every rank still takes part in the gather when there is nothing to score
        padded = u2a_data.padded_chunk(candidates.tolist(), accelerator.process_index, accelerator.num_processes, 1)
        scores = torch.zeros(max(1, len(padded)), dtype=torch.float32)
        if m:
            rows = self.trainer._negative_rows[padded].tolist()
            # Collated on the CPU: `score_dataset` moves one batch at a time to the device (all of them at once
            # would hold every candidate there at refresh 0)
            batches = _collated(
                self.trainer.data_collator, self.trainer.train_dataset, rows, self.batch_size, torch.device("cpu")
            )
            scores = score_dataset(
                model,
                batches,
                self.loss_fn,
                query,
                desc=f"U2A refresh {self.refresh_index}",
                disable_progress=self.trainer.args.disable_tqdm,
            ).cpu()
        return u2a_data.gather_chunks(accelerator, scores, m)

    def _retain_nll(self, model) -> float | None:
        """Token-mean NLL of a fixed sample of retain examples (the guard against gradient-ascent collapse)."""
        trainer = self.trainer
        retain_rows = trainer._retain_rows
        accelerator = trainer.accelerator
        if len(retain_rows) == 0:
            if trainer.args.retain_nll_tolerance is not None and not self._warned_no_retain:
                logger.warning("retain_nll_tolerance is set but train_dataset has no retain rows; it is ignored.")
                self._warned_no_retain = True
            return None
        sample = retain_rows[:RETAIN_SAMPLE].tolist()
        local, padding = _padded_share(sample, accelerator.process_index, accelerator.num_processes)
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            batches = _collated(trainer.data_collator, trainer.train_dataset, local, self.batch_size, _device(model))
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
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
        return float(total[0] / total[1])

    # ---------------------------------------------------------- in-training
    def _attach_ghost(self) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if not resolve_tracking(model).covers(self.query):
            # e.g. DoRA: its weights act outside the module calls the ghost hooks see, so scoring is brute force
            logger.info(
                "in_training_scores is off: the query covers parameters the ghost scorer cannot hook.",
                main_process_only=True,
            )
            self.in_training = False
            return
        self.ghost = GhostDotProduct(model, self.query, active=False)

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
        accelerator = self.trainer.accelerator
        offset = accelerator.process_index * len(negative_ids)
        rows = torch.nonzero(coefficients > 0).flatten()
        # One conversion per micro-batch, not two scalar reads per row
        ids = negative_ids.cpu()[rows].tolist()
        scores = (recorded[rows] / coefficients[rows]).tolist()
        for i, negative_id, score in zip(rows.tolist(), ids, scores):
            self.fresh_scores[negative_id] = ((self._micro_batches, offset + i), score)
        self._micro_batches += 1
        return result

    # ---------------------------------------------------------------- output
    def _log(self, record: dict[str, Any], ids: torch.Tensor, scores: torch.Tensor) -> None:
        trainer = self.trainer
        metrics = {}
        for key in (
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
        ):
            value = record.get(key)
            if value is not None:
                metrics[f"u2a/{key}"] = float(value)
        if self.history and "realised_change" in self.history[-1]:
            metrics["u2a/objective_change"] = self.history[-1]["realised_change"]
            metrics["u2a/objective_change_predicted"] = self.history[-1]["predicted_change"]
        trainer.log_refresh(metrics)
        if not trainer.accelerator.is_main_process:
            return
        weights = trainer.weight_state.weights
        record["weights"] = weights.tolist()
        record["last_scores"] = {int(i): float(s) for i, s in zip(ids.tolist(), scores.tolist())}
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        with open(os.path.join(trainer.args.output_dir, TRACE_FILE), "a") as f:
            score_of = dict(zip(ids.tolist(), scores.tolist()))
            names = trainer.negative_names  # the user's `id` column, if the training data has one
            for i in sorted(set(score_of) | set(torch.nonzero(weights > 0).flatten().tolist())):
                row = {
                    "refresh": record["refresh"],
                    "step": record["step"],
                    "example_id": int(i),
                    "score": score_of.get(i),
                    "weight": float(weights[i]),
                }
                if names is not None:
                    row["id"] = names[i]
                f.write(json.dumps(row) + "\n")
        with open(os.path.join(trainer.args.output_dir, REFRESH_FILE), "a") as f:
            f.write(json.dumps({k: v for k, v in record.items() if k not in ("weights", "last_scores")}) + "\n")

    def _check_stop(self, record: dict[str, Any], control) -> None:
        args = self.trainer.args
        objective = record["objective"]
        if objective < self.best_objective - 1e-12:
            self.best_objective = objective
            self.refreshes_without_improvement = 0
        else:
            self.refreshes_without_improvement += 1
        retain_nll = record.get("retain_nll")
        if retain_nll is not None and self.retain_nll_start is None:
            self.retain_nll_start = retain_nll
        reason = None
        if args.patience and self.refreshes_without_improvement >= args.patience:
            reason = (
                f"the alignment objective J has not improved for {args.patience} refreshes "
                f"(best {self.best_objective:.4f}, "
                f"now {objective:.4f})"
            )
        elif (
            args.retain_nll_tolerance is not None
            and retain_nll is not None
            and retain_nll > self.retain_nll_start + args.retain_nll_tolerance
        ):
            reason = (
                f"the retain NLL rose to {retain_nll:.4f}, more than retain_nll_tolerance={args.retain_nll_tolerance} "
                f"above its first value {self.retain_nll_start:.4f} (gradient-ascent collapse guard)"
            )
            record["collapsed"] = True
        if reason is not None:
            record["stopped"] = reason
            control.should_training_stop = True
            logger.warning(f"U2A early stop at step {record['step']}: {reason}.", main_process_only=True)

    def _snapshot(self, step: int) -> None:
        """Keep a CPU copy of the trainable parameters that passed the collapse guard, to restore them if a later
        refresh finds the model collapsed. Only for small trainable sets (adapters) with unsharded parameters."""
        self._good = None
        trainer = self.trainer
        if trainer.args.retain_nll_tolerance is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if sum(p.numel() for p in params.values()) > SNAPSHOT_MAX_NUMEL:
            return
        self._good = (step, {n: p.detach().to("cpu", copy=True) for n, p in params.items()})

    def _restore_snapshot(self, record: dict[str, Any]) -> None:
        good = self._good
        if good is None:
            logger.warning(
                "The collapsed model is not restored: no snapshot of the trainable parameters was kept (sharded "
                f"parameters, or more than {SNAPSHOT_MAX_NUMEL} of them); use the last checkpoint before the collapse.",
                main_process_only=True,
            )
            return
        step, saved = good
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name].to(p.device))
        record["restored_step"] = step
        logger.warning(
            f"Restored the trainable parameters of step {step}, the last refresh that passed the collapse guard.",
            main_process_only=True,
        )

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        state = {
            "refresh_index": self.refresh_index,
            "history": self.history,
            "ref_pair_logps": self.ref_pair_logps,
            "best_objective": self.best_objective,
            "refreshes_without_improvement": self.refreshes_without_improvement,
            "retain_nll_start": self.retain_nll_start,
            "lr_sum": self._lr_sum,
            "micro_batches": self._micro_batches,
            "fresh_scores": gather_object([self.fresh_scores]),
        }
        if self.query is not None and self.in_training:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            state["query"] = [
                self.query[p].cpu() if p in self.query else None for p in tracked_parameters(model, warn=False)
            ]
            state["query_attrs"] = {
                k: getattr(self.query, k) for k in ("objective_value", "num_pairs", "preconditioner", "refresh")
            }
        return state

    def _truncate_logs(self) -> None:
        if self.trainer.accelerator.is_main_process:
            _truncate_logs_to(self.trainer.args.output_dir, self.refresh_index)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from .influence import QueryVector

        self.refresh_index = state["refresh_index"]
        self.history = state["history"]
        self._truncate_logs()
        self.ref_pair_logps = state["ref_pair_logps"]
        self.best_objective = state["best_objective"]
        self.refreshes_without_improvement = state["refreshes_without_improvement"]
        self.retain_nll_start = state["retain_nll_start"]
        self._lr_sum = state["lr_sum"]
        self._micro_batches = state["micro_batches"]
        rank = self.trainer.accelerator.process_index
        parts = state["fresh_scores"]
        self.fresh_scores = dict(parts[rank]) if rank < len(parts) else {}
        if "query" in state:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            query = QueryVector()
            for p, v in zip(tracked_parameters(model, warn=False), state["query"]):
                if v is not None:
                    query[p] = v.to(p.device)
            for k, v in state["query_attrs"].items():
                setattr(query, k, v)
            self.query = query


def _truncate_logs_to(output_dir: str, refresh_index: int) -> None:
    """Drop the JSONL records written after a checkpoint, so that a resumed run does not repeat them."""
    for name in (TRACE_FILE, REFRESH_FILE):
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        kept = [
            line
            for line in lines
            if (json.loads(line).get("refresh") is not None and json.loads(line)["refresh"] < refresh_index)
        ]
        with open(path, "w") as f:
            f.writelines(kept)


@contextmanager
def _reference_adapter(model, adapter: str | None):
    """TRL's `use_adapter` (the "ref" adapter, or none), with every parameter's `requires_grad` kept as it was.

    PEFT's adapter switch also sets `requires_grad` (False on a disabled adapter, True on the one switched to). The
    reference pass may be the first forward of an FSDP2 model, where FSDP2 fixes each group's gradient dtypes from the
    parameters that require grad at that moment: with the adapter frozen it finds none, and the first training
    backward then fails to reduce the bf16 gradients into the fp32 adapter ("attempting to assign a gradient with
    dtype BFloat16 to a tensor with grad_dtype Float"). The pass runs under `no_grad`, so the flags change nothing
    in it.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with use_adapter(model, adapter_name=adapter):
            for p, flag in flags:
                p.requires_grad_(flag)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _padded_share(rows: list[int], rank: int, world: int) -> tuple[list[int], torch.Tensor]:
    """This rank's round-robin share of `rows`, padded (with its first row, or the first of all) to the size of the
    largest share, and the `(n,)` bool mask of the padding: every rank then runs the same forwards, as ZeRO-3 and
    FSDP2 need (they gather the parameters in collectives inside each forward)."""
    local = rows[rank::world]
    size = -(-len(rows) // world)
    padding = torch.zeros(size, dtype=torch.bool)
    padding[len(local) :] = True
    return local + (local or rows)[:1] * (size - len(local)), padding


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _collated(collator, dataset, rows: list[int], batch_size: int, device) -> list[dict]:
    """`rows` of `dataset`, in batches of `batch_size`, collated and moved to `device` (one column read per batch)."""
    batches = []
    for start in range(0, len(rows), batch_size):
        columns = dataset[rows[start : start + batch_size]]
        examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
        batches.append(move_batch(collator(examples), device))
    return batches
