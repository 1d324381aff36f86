"""The demo's task and start model: the seeded synthetic task, and the misaligned SFT start model, cached on disk."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from ..evaluation import batched_logps, encode
from ..synthetic import default_corpus, make_training_splits
from ..testing import build_tiny_model, build_tokenizer, cpu_training_args
from .common import StepBar, final_train_loss, jsonable, quiet, silence
from .config import DemoConfig


class MemorisedStartModelError(ValueError):
    """The start model fits its training data so well that influence scores would be noise."""


def load_task(seed: int, config: DemoConfig):
    """The synthetic task of `seed` (`make_training_splits`, negatives mixed by `config.negative_kinds()`), with
    `test_prompts` cut to `n_test_prompts` and the alignment pairs to a random `alignment_pairs` of them (seeded)."""
    with quiet():
        splits = make_training_splits(seed=seed, n_prompts=config.n_prompts, kinds=config.negative_kinds())
        if config.n_test_prompts is not None and config.n_test_prompts < len(splits["test_prompts"]):
            splits["test_prompts"] = splits["test_prompts"].select(range(config.n_test_prompts))
        if config.alignment_pairs is not None:
            available = len(splits["alignment"])
            if config.alignment_pairs > available:
                raise ValueError(
                    f"alignment_pairs={config.alignment_pairs} is more than the task's {available} alignment pairs; "
                    f"give at most {available} (or None for all of them)."
                )
            keep = sorted(random.Random(seed).sample(range(available), config.alignment_pairs))
            splits["alignment"] = splits["alignment"].select(keep)
    return splits


def _data_fingerprint(splits) -> str:
    digest = hashlib.sha256()
    for row in splits["original"]:
        digest.update(json.dumps([row["prompt"], row["completion"]]).encode())
    return digest.hexdigest()[:16]


@dataclass
class StartModel:
    """A trained start model on disk and what was measured on it."""

    path: str
    info: dict[str, Any]
    cached: bool


def default_cache_dir() -> str:
    """`$TRL_U2A_CACHE`, else `$XDG_CACHE_HOME/trl-u2a`, else `~/.cache/trl-u2a`."""
    if os.environ.get("TRL_U2A_CACHE"):
        return os.environ["TRL_U2A_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "trl-u2a")


def start_model(seed: int, config: DemoConfig, splits) -> StartModel:
    """Train (or load from the cache) the misaligned start model of `seed` and check that it is not memorised.

    The cache key hashes `config.start_model_settings(seed)` and the `original` split, so a change to either retrains.

    Raises:
        MemorisedStartModelError: the token-mean NLL of the SFT data is below `config.min_start_nll` (and
            `allow_memorised` is False).
    """
    settings = config.start_model_settings(seed)
    key_text = json.dumps({**settings, "data": _data_fingerprint(splits)}, sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    root = Path(config.cache_dir or default_cache_dir()) / "start-models"
    path = root / f"seed{seed}-{key}"
    info_file = path / "start_info.json"
    cached = info_file.is_file()
    if cached:
        info = json.loads(info_file.read_text())
    else:
        info = _train_start_model(seed, config, splits, path, settings)
        info_file.write_text(json.dumps(jsonable(info), indent=2))  # written last: marks the cache entry complete
    _check_not_memorised(info, config)
    return StartModel(str(path), info, cached)


def _check_not_memorised(info: dict[str, Any], config: DemoConfig) -> None:
    nll = info["train_nll"]
    info["memorised"] = bool(nll < config.min_start_nll)
    if not info["memorised"]:
        return
    message = (
        f"The start model's train NLL is {nll:.3f} nats/token, below min_start_nll={config.min_start_nll}: it has "
        "memorised its SFT data, so its gradients on the negatives are near zero and U2A's influence scores are "
        "noise. Train it less (sft_epochs, sft_learning_rate) or use a smaller model."
    )
    if not config.allow_memorised:
        raise MemorisedStartModelError(message)
    warnings.warn(message, stacklevel=3)


def _train_start_model(seed: int, config: DemoConfig, splits, path: Path, settings: dict) -> dict[str, Any]:
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    corpus = default_corpus(seed) + list(splits["original"]["completion"]) + list(splits["alignment"]["chosen"])
    tokenizer = build_tokenizer(corpus, vocab_size=config.vocab_size)
    model = build_tiny_model(
        tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads, seed=seed
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    args = cpu_training_args(
        SFTConfig,
        output_dir=str(tmp / "sft"),
        per_device_train_batch_size=config.sft_batch_size,
        num_train_epochs=config.sft_epochs,
        learning_rate=config.sft_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        max_length=config.max_length,
        logging_steps=10,
        seed=seed,
    )
    with quiet():
        trainer = SFTTrainer(
            model=str(tmp),
            args=args,
            train_dataset=splits["original"].select_columns(["prompt", "completion"]),
            processing_class=tokenizer,
        )
        silence(trainer)
        if config.progress:
            trainer.add_callback(StepBar(f"start model (seed {seed})"))
        trainer.train()
        trainer.model.save_pretrained(tmp)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [final_train_loss(trainer)]
    model = trainer.model.eval()
    del trainer
    shutil.rmtree(tmp / "sft", ignore_errors=True)

    with torch.no_grad():
        nll = {}
        for name in ("original", "forget", "retain"):
            rows = splits[name]
            nll[name] = _mean_nll(model, tokenizer, rows["prompt"], rows["completion"], config)
    info = {
        "settings": settings,
        "sft_seconds": time.perf_counter() - t0,
        "sft_final_loss": losses[-1] if losses else math.nan,
        "train_nll": nll["original"],
        "forget_nll": nll["forget"],
        "retain_nll": nll["retain"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return info


def _mean_nll(model, tokenizer, prompts, completions, config: DemoConfig) -> float:
    encoded = encode(tokenizer, prompts, completions)
    logps, lengths = batched_logps(model, encoded, tokenizer.pad_token_id, config.eval_batch_size, config.max_length)
    return float(-logps.sum() / lengths.sum())
