"""Helpers every part of the demo shares: quiet trainers, the arguments of a benchmark run, JSON and mean ± std."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import datasets
import transformers
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..testing import cpu_training_args


def quiet() -> contextlib.AbstractContextManager:
    """Silence the per-run chatter of transformers/TRL/datasets (the pipeline shows its own progress bar)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    levels = (transformers.logging.get_verbosity(), datasets.logging.get_verbosity())
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    stack.enter_context(env_vars(TQDM_DISABLE="1"))  # TRL's reference-logps pass and weight loading draw their own bars
    transformers.utils.logging.disable_progress_bar()
    stack.callback(transformers.utils.logging.enable_progress_bar)
    loggers = [logging.getLogger(name) for name in ("trl_u2a", "accelerate", "trl")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)

    def restore():
        transformers.logging.set_verbosity(levels[0])
        datasets.logging.set_verbosity(levels[1])
        if bars:
            datasets.enable_progress_bars()
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)

    stack.callback(restore)
    return stack


@contextlib.contextmanager
def env_vars(**values: str):
    """Set environment variables inside the block; restore (or remove) them on exit."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def silence(trainer) -> None:
    """Drop the callbacks that print every log dict (the demo prints one table at the end)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def unlearning_run_args(cls, config, output_dir, learning_rate, seed, **kwargs):
    """Arguments shared by every method compared in the benchmark: same steps, batch, schedule, length and seeds, on
    the CPU (`testing.cpu_training_args`)."""
    return cpu_training_args(
        cls,
        output_dir=output_dir,
        per_device_train_batch_size=config.batch_size,
        max_steps=config.steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(1, config.steps // 5),
        max_length=config.max_length,
        seed=seed,
        data_seed=seed,
        **kwargs,
    )


class StepBar(TrainerCallback):
    """One tqdm bar over the optimizer steps (the Trainer's own bar prints every log)."""

    def __init__(self, desc: str):
        self.desc = desc

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", leave=False, disable=False)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def final_train_loss(trainer) -> float:
    """The `train_loss` the Trainer logs at the end of training (NaN when it logged none)."""
    for entry in reversed(trainer.state.log_history):
        if "train_loss" in entry:
            return float(entry["train_loss"])
    return math.nan


def jsonable(value: Any) -> Any:
    """Tensors, numpy values and tuples to plain JSON values; non-finite floats to None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN when there is none; std 0 for one)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std
