"""One training run of each compared method: U2A and its variants, weighted unlearning (uniform, random subset,
oracle) and TRL's DPO on positive data, each for the same steps from the same start model; and the run plan."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from .. import U2AConfig, U2ATrainer
from ..core.weighting import budget_size
from .common import final_train_loss, jsonable, quiet, silence, unlearning_run_args
from .config import BASELINES, DPO_METHODS, DemoConfig
from .metrics import DemoEvaluator, Trajectory, refresh_precision


def dpo_pairs(splits):
    """Positive-data pairs for the DPO baseline: the alignment pairs, plus every `forget` answer of a train prompt
    paired with a chosen (`retain`) answer of the same prompt (cycling when the prompt has fewer chosen answers)."""
    chosen_by_prompt: dict[int, list[str]] = {}
    for row in splits["retain"]:
        chosen_by_prompt.setdefault(row["prompt_id"], []).append(row["completion"])
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in splits["alignment"]]
    used: dict[int, int] = {}
    for row in splits["forget"]:
        options = chosen_by_prompt.get(row["prompt_id"])
        if not options:
            continue
        i = used.get(row["prompt_id"], 0)
        used[row["prompt_id"]] = i + 1
        rows.append({"prompt": row["prompt"], "chosen": options[i % len(options)], "rejected": row["completion"]})
    return Dataset.from_list(rows)


@dataclass
class RunOutput:
    """A trained model and what its trainer left behind."""

    model: Any
    weights: list[float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    trace: str | None = None
    train_loss: float = math.nan
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    precision: dict[str, Any] = field(default_factory=dict)  # `refresh_precision` of a U2A run


def _train(trainer, evaluator: DemoEvaluator | None, config: DemoConfig):
    """Train quietly, evaluating every `config.eval_steps`; returns the trajectory points."""
    silence(trainer)
    trajectory = Trajectory(evaluator, config.eval_steps)
    trainer.add_callback(trajectory)
    trainer.train()
    return trajectory.points


def u2a_args(config: DemoConfig, output_dir: str, seed: int, loss_type: str, learning_rate: float, **overrides):
    """U2AConfig of one run: the package defaults, then `config.u2a_overrides`, then the variant's `overrides`.

    Only `save_refresh_plots` is switched off (about 2 s a run; the demo draws its own plots)."""
    knobs = {"save_refresh_plots": False, **config.u2a_overrides, **overrides}
    return unlearning_run_args(U2AConfig, config, output_dir, learning_rate, seed, loss_type=loss_type, **knobs)


def lora_config(config: DemoConfig):
    """The LoRA adapter of the "lora" setting: rank `lora_r`, `lora_alpha`, every linear layer but the head."""
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")


def _peft_config(config: DemoConfig, setting: str):
    return lora_config(config) if setting == "lora" else None


def _train_columns(splits, weights: Sequence[float] | None):
    """The unpaired training set (negatives first, so negative i = forget row i), with an optional weight column."""
    dataset = splits["train"].select_columns(["prompt", "completion", "label"])
    if weights is not None:
        n = len(splits["forget"])
        dataset = dataset.add_column("weight", [float(w) for w in weights] + [1.0] * (len(dataset) - n))
    return dataset


def run_unlearning(
    model_path: str,
    splits,
    config: DemoConfig,
    *,
    seed: int,
    setting: str = "full",
    loss_type: str,
    learning_rate: float,
    output_dir: str,
    weights: Sequence[float] | None = None,
    evaluator: DemoEvaluator | None = None,
) -> RunOutput:
    """Plain weighted unlearning with `U2ATrainer` and no alignment set: `weights=None` is uniform over all negatives;
    a 0/1 vector unlearns a fixed subset (random, oracle). `setting="lora"` trains a LoRA adapter."""
    args = u2a_args(config, output_dir, seed, loss_type, learning_rate)
    with quiet():
        trainer = U2ATrainer(
            model=model_path,
            args=args,
            train_dataset=_train_columns(splits, weights),
            peft_config=_peft_config(config, setting),
        )
        points = _train(trainer, evaluator, config)
    weights = trainer.weight_state.weights.tolist()
    return RunOutput(trainer.model, weights, train_loss=final_train_loss(trainer), trajectory=points)


def run_u2a(
    model_path: str,
    splits,
    config: DemoConfig,
    *,
    seed: int,
    setting: str = "full",
    loss_type: str,
    learning_rate: float,
    output_dir: str,
    evaluator: DemoEvaluator | None = None,
    **overrides,
) -> RunOutput:
    """U2A: `U2ATrainer` with the alignment set, so that the refresh callback selects and reweights the negatives.

    `overrides` are U2AConfig fields of the variant (`weight_lr`, `score_clip`, `max_weight`, `budget`, ...);
    every other field keeps the package default (or `config.u2a_overrides`). `setting="lora"` trains a LoRA adapter.
    """
    args = u2a_args(config, output_dir, seed, loss_type, learning_rate, **overrides)
    alignment = splits["alignment"].select_columns(["prompt", "chosen", "rejected"])
    with quiet():
        trainer = U2ATrainer(
            model=model_path,
            args=args,
            train_dataset=_train_columns(splits, None),
            alignment_dataset=alignment,
            peft_config=_peft_config(config, setting),
        )
        points = _train(trainer, evaluator, config)
    history = list(getattr(trainer.refresh_callback, "history", None) or [])
    trace = os.path.join(output_dir, "u2a_trace.jsonl")
    precision = refresh_precision(history, list(splits["forget"]["kind"]))
    return RunOutput(
        trainer.model,
        trainer.weight_state.weights.tolist(),
        # The records also hold every weight and score of their refresh: the trace file has those
        history=[jsonable({k: v for k, v in h.items() if k not in ("weights", "last_scores")}) for h in history],
        trace=trace if os.path.isfile(trace) else None,
        train_loss=final_train_loss(trainer),
        trajectory=points,
        precision=precision,
    )


def run_dpo(
    model_path: str,
    splits,
    config: DemoConfig,
    *,
    seed: int,
    setting: str = "full",
    learning_rate: float,
    output_dir: str,
    evaluator: DemoEvaluator | None = None,
    pairs_only: bool = False,
) -> RunOutput:
    """TRL's `DPOTrainer` on positive data (`dpo_pairs`), or with `pairs_only` on the alignment pairs alone (the
    supervision U2A gets, without its negatives); reference = the start model (the disabled adapter in the "lora"
    setting)."""
    args = unlearning_run_args(
        DPOConfig, config, output_dir, learning_rate, seed, beta=config.dpo_beta, precompute_ref_log_probs=True
    )
    if pairs_only:
        pairs = splits["alignment"].select_columns(["prompt", "chosen", "rejected"])
    else:
        pairs = dpo_pairs(splits)
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        trainer = DPOTrainer(
            model=model_path,
            args=args,
            train_dataset=pairs,
            processing_class=tokenizer,
            peft_config=_peft_config(config, setting),
        )
        points = _train(trainer, evaluator, config)
    return RunOutput(trainer.model, train_loss=final_train_loss(trainer), trajectory=points)


def random_subset(n: int, budget: float, seed: int) -> list[float]:
    """A 0/1 weight vector selecting `budget_size(budget, n)` negatives at random (seeded)."""
    k = budget_size(budget, n)
    chosen = set(random.Random(seed).sample(range(n), k))
    return [1.0 if i in chosen else 0.0 for i in range(n)]


def oracle_weights(kinds: Sequence[str]) -> list[float]:
    """1 on the truly harmful negatives, 0 elsewhere: uses the labels, so an upper reference."""
    return [1.0 if kind == "harmful" else 0.0 for kind in kinds]


def plan_runs(config: DemoConfig) -> list[dict[str, Any]]:
    """Every (seed, setting, learning rate, loss, method) to run, in the order they run."""
    runs = []

    def add(seed, setting, lr, loss, method, overrides):
        runs.append(
            {"seed": seed, "setting": setting, "lr": lr, "loss": loss, "method": method, "overrides": overrides}
        )

    for seed in config.seeds:
        for setting in config.settings:
            for lr in config.setting_learning_rates(setting):
                for loss in config.losses:
                    for method in BASELINES:
                        if method in config.methods:
                            add(seed, setting, lr, loss, method, {})
                    for method, overrides in config.u2a_variants(loss).items():
                        add(seed, setting, lr, loss, method, overrides)
                for method in DPO_METHODS:
                    if method in config.methods:
                        add(seed, setting, lr, "dpo", method, {})
    return runs


RUN_KEYS = ("seed", "setting", "lr", "loss", "method")


def run_name(run: dict[str, Any]) -> str:
    return f"s{run['seed']}-{run.get('setting', 'full')}-lr{run['lr']:g}-{run['loss']}-{run['method']}"
