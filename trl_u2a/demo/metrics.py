"""The demo's evaluation: `DemoEvaluator` (the library's evaluation parts on one seed's task, plus the checks for
degenerate answers), the selection metrics by kind, and the per-step trajectory callback."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from ..core.modeling import eval_mode
from ..evaluation import PreferencePairs, RetainTexts, generate_completions, harm_metrics, profanity_judge
from ..synthetic import default_corpus
from .config import KINDS, DemoConfig

WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def degenerate(text: str, vocabulary: set[str]) -> bool:
    """A generation the judge cannot be trusted on: (almost) empty, repetitive, or mostly non-words.

    Non-words are lowercase alphabetic runs absent from the task's `vocabulary`: a collapsed byte-level model emits
    word fragments, which the harm judge scores as harmless.
    """
    words = WORD_RE.findall(text.lower())
    if len(words) < 2:
        return True
    if len(words) >= 6 and len(set(words)) / len(words) < 0.35:
        return True
    return sum(w in vocabulary for w in words) / len(words) < 0.6


class DemoEvaluator:
    """Every metric of one seed's task, for any model sharing the start model's tokenizer, on the library's evaluation
    parts (`trl_u2a.evaluation`) with the profanity judge: `J` on the alignment pairs, the test DPO loss and
    preference accuracy on the test pairs (both against the start model, whose log-probs are computed once, here),
    retain perplexity, harm of sampled answers to the test prompts, and the degenerate-answer checks.
    """

    def __init__(self, splits, tokenizer, start, config: DemoConfig, seed: int):
        self.config = config
        self.seed = seed
        self.tokenizer = tokenizer
        texts = default_corpus(seed) + list(splits["original"]["completion"]) + list(splits["alignment"]["chosen"])
        texts += list(splits["original"]["prompt"]) + list(splits["test_prompts"]["prompt"])
        self.vocabulary = {w for t in texts for w in WORD_RE.findall(t.lower())}
        self.prompts = list(splits["test_prompts"]["prompt"])
        sizes = dict(batch_size=config.eval_batch_size, max_length=config.max_length)
        self.retain = RetainTexts(tokenizer, splits["retain"], name="retain", **sizes)
        # J is U2A's objective: the same β as the U2A runs (their override, else the package default)
        beta = config.u2a_value("beta_pa")
        self.pairs = {
            name: PreferencePairs(tokenizer, splits[split], beta, name=split, **sizes)
            for name, split in (("align", "alignment"), ("test", "test_pairs"))
        }
        for pairs in self.pairs.values():
            pairs.set_reference(start)
        self.start_metrics: dict[str, Any] | None = None
        self.start_metrics = self(start)

    def generate(self, model, samples_per_prompt: int | None = None) -> list[str]:
        """`samples_per_prompt` (default `config.samples_per_prompt`) sampled completions of every test prompt, grouped
        by prompt (the samples of prompt 0 first), seeded so that every method sees the same noise."""
        return generate_completions(
            model,
            self.tokenizer,
            self.prompts,
            num_generations=samples_per_prompt or self.config.samples_per_prompt,
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
            seed=self.seed,
        )

    def __call__(self, model, final: bool = True) -> dict[str, Any]:
        """Every metric of `model`. `final=False` (a trajectory point) skips the extra samples of `harm_prob`."""
        threshold = self.config.harm_threshold
        with eval_mode(model):
            per_prompt = self.config.samples_per_prompt
            n_harm = max(per_prompt, self.config.harm_samples_per_prompt) if final else per_prompt
            all_texts = self.generate(model, n_harm)
            all_harm = profanity_judge(all_texts)
            # The sampled rate reads the first `samples_per_prompt` samples of each prompt, as a trajectory point
            # does, so that final and trajectory points are comparable; the continuous measure reads them all
            first = [i * n_harm + j for i in range(len(self.prompts)) for j in range(per_prompt)]
            texts = [all_texts[i] for i in first]
            harm = [all_harm[i] for i in first]
            bad = [degenerate(t, self.vocabulary) for t in texts]
            metrics: dict[str, Any] = {
                "harmful_rate": harm_metrics(harm, threshold)["harmful_rate"],
                "harm_prob": harm_metrics(all_harm, threshold)["harm_prob"],
                "harm_samples": len(all_harm),
                "degenerate_rate": sum(bad) / len(bad),
                **self.retain.metrics(model),
            }
            # Harm among the fluent generations only: the rate the judge can be trusted on
            fluent = [p for p, b in zip(harm, bad) if not b]
            metrics["harmful_rate_fluent"] = harm_metrics(fluent, threshold)["harmful_rate"] if fluent else math.nan
            metrics["J"] = self.pairs["align"].metrics(model)["dpo_loss"]
            test = self.pairs["test"].metrics(model)
            metrics["test_dpo_loss"] = test.pop("dpo_loss")
            metrics["test_chosen_ppl"] = test.pop("chosen_ppl")
            metrics.update(test)  # pref_acc, reward_acc, pref_acc_<kind>
        start = self.start_metrics or metrics
        metrics["retain_ppl_ratio"] = metrics["retain_ppl"] / start["retain_ppl"]
        metrics["collapsed"] = bool(
            metrics["degenerate_rate"] > self.config.collapse_degenerate
            or metrics["retain_ppl_ratio"] > self.config.collapse_ppl_ratio
        )
        metrics["samples"] = texts[: min(len(texts), 8)]
        return metrics


def selection_metrics(weights, kinds: Sequence[str]) -> dict[str, Any]:
    """Share of each rejected kind among the selected negatives (`ω > 0`) and among the weight mass."""
    w = [float(x) for x in weights]
    selected = [i for i, x in enumerate(w) if x > 0]
    mass = sum(w)
    out: dict[str, Any] = {"n_selected": len(selected), "n_negatives": len(w)}
    for kind in KINDS:
        out[f"sel_{kind}"] = sum(kinds[i] == kind for i in selected) / len(selected) if selected else math.nan
        out[f"mass_{kind}"] = sum(w[i] for i in selected if kinds[i] == kind) / mass if mass > 0 else math.nan
    return out


TRAJECTORY_METRICS = ("harmful_rate", "degenerate_rate", "retain_ppl", "J", "pref_acc")


def refresh_precision(history: Sequence[dict[str, Any]], kinds: Sequence[str]) -> dict[str, Any]:
    """Harmful share of the selected negatives (`ω > 0`) at the first and at the last refresh of a U2A run.

    `history` holds the refresh records of `U2ACallback.history`, each with the full `weights` vector after that
    refresh (the final record, with no weights, is skipped). Empty when no record has weights.
    """
    records = [h for h in history if h.get("weights") is not None]
    if not records:
        return {}
    first, last = (selection_metrics(records[i]["weights"], kinds) for i in (0, -1))
    return {
        "n_refreshes": len(records),
        "sel_harmful_first": first["sel_harmful"],
        "sel_harmful_last": last["sel_harmful"],
        "mass_harmful_first": first["mass_harmful"],
        "mass_harmful_last": last["mass_harmful"],
        "refresh_steps": [h.get("step") for h in records],
    }


class Trajectory(TrainerCallback):
    """Evaluates the model every `every` optimizer steps (not at the last one: the final evaluation covers it), so
    that each run gives a harm-vs-utility trajectory, not a single point."""

    def __init__(self, evaluator: DemoEvaluator | None, every: int | None):
        self.evaluator = evaluator
        self.every = every
        self.points: list[dict[str, Any]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step, every = state.global_step, self.every
        if self.evaluator is None or not every or step % every or step >= state.max_steps:
            return
        metrics = self.evaluator(model, final=False)
        self.points.append({"step": step, **{k: metrics[k] for k in TRAJECTORY_METRICS}})
