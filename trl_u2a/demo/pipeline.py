"""`run_demo`: every planned run of every seed from its start model, evaluated, summarised and reported."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .common import jsonable, quiet
from .config import DemoConfig, u2a_defaults
from .metrics import TRAJECTORY_METRICS, DemoEvaluator, selection_metrics
from .models import load_task, start_model
from .plots import make_plots
from .report import format_evidence, format_frontier, format_table, verdict_lines
from .runs import (
    RUN_KEYS,
    RunOutput,
    oracle_weights,
    plan_runs,
    random_subset,
    run_dpo,
    run_name,
    run_u2a,
    run_unlearning,
)
from .stats import claim, frontier, summarize


def _run_method(run, model_path, splits, config, kinds, subset, common) -> RunOutput:
    common = {**common, "setting": run["setting"]}
    if run["method"] in ("dpo", "dpo-pairs"):
        return run_dpo(model_path, splits, config, pairs_only=run["method"] == "dpo-pairs", **common)
    if run["method"] == "uniform":
        return run_unlearning(model_path, splits, config, loss_type=run["loss"], **common)
    if run["method"] in ("random", "oracle"):
        weights = subset if run["method"] == "random" else oracle_weights(kinds)
        return run_unlearning(model_path, splits, config, loss_type=run["loss"], weights=weights, **common)
    return run_u2a(model_path, splits, config, loss_type=run["loss"], **run["overrides"], **common)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the whole benchmark; writes `results.json`, `table.md` and the plots to `config.output_dir`.

    Returns:
        The results dict (also in `results.json`): `config`, `u2a_config` (the U2A knobs the runs used: package
        defaults and overrides), `start` (per seed), `runs` (one dict of metrics per run), `summary` (one row per
        setting × learning rate × loss × method: mean ± std over seeds, paired differences against `uniform` with
        bootstrap intervals, the recovered share of the oracle's gain), `claim` (per setting, learning rate, loss and
        U2A variant: the verdicts), `verdicts` (their lines), `frontier` and `timing`.
    """
    threads = torch.get_num_threads()
    # The matrices are tiny: one thread is several times faster than two, and far faster on a shared machine
    torch.set_num_threads(config.num_threads)
    try:
        return _run_demo(config)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig) -> dict[str, Any]:
    t0, cpu0 = time.perf_counter(), time.process_time()
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    plan = plan_runs(config)
    results: dict[str, Any] = {"config": dataclasses.asdict(config), "start": {}, "runs": []}
    timing: dict[str, float] = {"start_models": 0.0, "training": 0.0, "evaluation": 0.0}
    bar = tqdm(total=len(plan), desc="u2a demo", unit="run", disable=not config.progress)
    for seed in config.seeds:
        t = time.perf_counter()
        bar.set_postfix_str(f"seed {seed}: start model")
        splits = load_task(seed, config)
        start = start_model(seed, config, splits)
        tokenizer = AutoTokenizer.from_pretrained(start.path)
        with quiet():
            start_lm = AutoModelForCausalLM.from_pretrained(start.path, dtype=torch.float32)
        evaluator = DemoEvaluator(splits, tokenizer, start_lm, config, seed)
        del start_lm
        kinds = list(splits["forget"]["kind"])
        start_record = {**start.info, "cached": start.cached, "path": start.path, **evaluator.start_metrics}
        results["start"][str(seed)] = start_record
        timing["start_models"] += time.perf_counter() - t
        # The same number of negatives as U2A selects (its budget: the override, else the package default)
        subset = random_subset(len(kinds), config.u2a_value("budget"), seed)
        for run in (r for r in plan if r["seed"] == seed):
            name = run_name(run)
            bar.set_postfix_str(name)
            run_dir = str(runs_dir / name)
            t, cpu = time.perf_counter(), time.process_time()
            common = dict(seed=seed, learning_rate=run["lr"], output_dir=run_dir, evaluator=evaluator)
            try:
                output = _run_method(run, start.path, splits, config, kinds, subset, common)
            except ValueError as error:
                # A run the trainer refuses (e.g. no negative with a positive score): record it, keep the benchmark
                results["runs"].append(
                    {
                        "name": name,
                        **{k: run[k] for k in RUN_KEYS},
                        "overrides": run["overrides"],
                        "error": str(error),
                    }
                )
                warnings.warn(f"{name} failed: {error}", stacklevel=2)
                bar.update(1)
                continue
            train_seconds = time.perf_counter() - t
            t = time.perf_counter()
            metrics = evaluator(output.model)
            eval_seconds = time.perf_counter() - t
            record = _run_record(run, output, metrics, evaluator.start_metrics, config, kinds, out_dir)
            record.update(train_seconds=train_seconds, eval_seconds=eval_seconds, cpu_seconds=time.process_time() - cpu)
            results["runs"].append(record)
            timing["training"] += train_seconds
            timing["evaluation"] += eval_seconds
            del output
            gc.collect()
            bar.update(1)
        results.setdefault("kinds", {})[str(seed)] = kinds
    bar.close()
    if not config.keep_traces:
        shutil.rmtree(runs_dir, ignore_errors=True)
    timing["total"] = time.perf_counter() - t0
    # CPU time of this process: what sizes the benchmark on a shared machine, where wall time depends on the others
    timing["cpu"] = time.process_time() - cpu0
    _summarise(results, config, out_dir, timing, len(plan))
    return results


def _run_record(run, output, metrics, start_metrics, config, kinds, out_dir) -> dict[str, Any]:
    """One run's entry of `results["runs"]`: its settings, metrics, trajectory and, for U2A, its selection."""
    record = {
        "name": run_name(run),
        **{k: run[k] for k in RUN_KEYS},
        "overrides": run["overrides"],
        **metrics,
        "train_loss": output.train_loss,
    }
    start_point = {"step": 0, **{k: start_metrics[k] for k in TRAJECTORY_METRICS}}
    final_point = {"step": config.steps, **{k: metrics[k] for k in TRAJECTORY_METRICS}}
    record["trajectory"] = [start_point, *output.trajectory, final_point]
    if output.weights is not None:
        record.update(selection_metrics(output.weights, kinds))
        record["weights"] = output.weights
    record.update(output.precision)
    if output.history:
        record["history"] = output.history
    if output.trace and config.keep_traces:
        record["trace"] = os.path.relpath(output.trace, out_dir)
    return record


def _summarise(results: dict[str, Any], config: DemoConfig, out_dir: Path, timing: dict, num_runs: int) -> None:
    """The summary, frontier, claim and timing of `results`, and the files `table.md`, the plots and
    `results.json`."""
    results["summary"] = summarize(
        results["runs"],
        results["start"],
        resamples=config.bootstrap_resamples,
        confidence=config.confidence,
        seed=config.bootstrap_seed,
        min_seeds=config.min_seeds,
    )
    results["frontier"] = frontier(results["runs"], config)
    results["claim"] = claim(results["summary"])
    results["verdicts"] = verdict_lines(results["claim"])
    results["u2a_config"] = {**u2a_defaults(), **config.u2a_overrides}
    timing["runs"] = num_runs
    timing["seconds_per_run"] = (timing["training"] + timing["evaluation"]) / max(1, num_runs)
    results["timing"] = timing
    (out_dir / "table.md").write_text(
        "## U2A against uniform\n\n"
        + format_evidence(results["claim"], markdown=True)
        + "\n\n"
        + "\n".join(f"- {line}" for line in results["verdicts"])
        + "\n\n## Harm at equal utility\n\n"
        + format_frontier(results["frontier"], config.ppl_budgets, markdown=True)
        + "\n\n## Every run, by setting and learning rate\n\n"
        + format_table(results["summary"], markdown=True)
        + "\n"
    )
    if config.plots:
        results["plots"] = make_plots(results, out_dir)
    (out_dir / "results.json").write_text(json.dumps(jsonable(results), indent=1))
