"""Alignment objectives `J(θ)`: the upper level of U2A (docs/method.md, "The alignment objective `J`").

An objective is pluggable, like kronfluence's `compute_measurement`: any callable `objective(model, batch)` that
returns a differentiable **per-pair** loss of shape `(P,)`; `J` is the mean over all pairs of the alignment set
(the influence engine sums the per-pair losses over batches and divides by the total pair count). Lower `J` means
better aligned.

Pair batches are right-padded dicts with `(B, T)` integer tensors `chosen_input_ids`, `chosen_attention_mask`,
`chosen_completion_mask`, `rejected_input_ids`, `rejected_attention_mask`, `rejected_completion_mask` and, for
objectives with a reference (DPO), float `(B,)` tensors `ref_chosen_logps`, `ref_rejected_logps` filled once by
`reference_logps`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from .losses import nll_loss
from .modeling import reference_values, sequence_logps, with_reference

PAIR_SIDES = ("chosen", "rejected")


class AlignmentObjective:
    """Base class of alignment objectives.

    Subclasses implement `__call__(model, batch) -> Tensor (P,)`, a differentiable per-pair loss (minimised).
    `needs_reference` says whether the batch must carry reference log-probs (see `reference_logps`).
    """

    needs_reference: bool = False

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError


def _side_logps(model, batch: dict, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    return sequence_logps(
        model, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_completion_mask"]
    )


def _pad_right(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=0)


def chosen_rejected_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(logps_chosen, lengths_chosen, logps_rejected, lengths_rejected)`, each `(P,)`, from ONE forward.

    Chosen and rejected rows are right-padded to a common length and concatenated (2P rows): one forward instead of
    two. Right padding cannot change the log-probs of the real tokens (causal attention, padding masked).
    """
    _check_keys(batch, [f"{s}_{k}" for s in PAIR_SIDES for k in ("input_ids", "attention_mask", "completion_mask")])
    n = batch["chosen_input_ids"].shape[0]
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    cat = {
        k: torch.cat([_pad_right(batch[f"chosen_{k}"], length), _pad_right(batch[f"rejected_{k}"], length)])
        for k in ("input_ids", "attention_mask", "completion_mask")
    }
    logps, lengths = sequence_logps(model, cat["input_ids"], cat["attention_mask"], cat["completion_mask"])
    return logps[:n], lengths[:n], logps[n:], lengths[n:]


def _check_keys(batch: dict, keys: Iterable[str], hint: str = "") -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"The pair batch lacks {missing}{hint}; it has {sorted(batch)}.")


class DPOObjective(AlignmentObjective):
    """DPO loss against the reference (start) model, per pair:
    `-log σ(β · [(log π_θ(y_w|x) − log π_0(y_w|x)) − (log π_θ(y_l|x) − log π_0(y_l|x))])`.

    Needs `ref_chosen_logps` and `ref_rejected_logps` (`(P,)`) in the batch: see `reference_logps`.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1):
        if beta <= 0:
            raise ValueError(f"DPOObjective needs beta > 0; got {beta}.")
        self.beta = beta

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        _check_keys(
            batch,
            ("ref_chosen_logps", "ref_rejected_logps"),
            " (reference log-probs: fill them once with `trl_u2a.core.objectives.reference_logps`)",
        )
        logps_w, _, logps_l, _ = chosen_rejected_logps(model, batch)
        ref_w = batch["ref_chosen_logps"].to(logps_w)
        ref_l = batch["ref_rejected_logps"].to(logps_l)
        margin = (logps_w - ref_w) - (logps_l - ref_l)
        return -F.logsigmoid(self.beta * margin)

    def __repr__(self) -> str:
        return f"DPOObjective(beta={self.beta})"


class NLLObjective(AlignmentObjective):
    """Token-mean negative log-likelihood of the chosen completion, per pair: `-log π_θ(y_w|x) / |y_w|`.

    Only the `chosen_*` keys are read (rejected completions and reference log-probs are not needed).
    """

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        _check_keys(batch, [f"chosen_{k}" for k in ("input_ids", "attention_mask", "completion_mask")])
        logps, lengths = _side_logps(model, batch, "chosen")
        return nll_loss(logps, lengths)

    def __repr__(self) -> str:
        return "NLLObjective()"


class CallableObjective(AlignmentObjective):
    """Wrap any callable `fn(model, batch) -> Tensor (P,)` (a differentiable per-pair loss) as an objective."""

    def __init__(self, fn: Callable[[torch.nn.Module, dict], torch.Tensor], needs_reference: bool = False):
        if not callable(fn):
            raise TypeError(f"CallableObjective needs a callable; got {type(fn).__name__}.")
        self.fn = fn
        self.needs_reference = needs_reference

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        losses = self.fn(model, batch)
        if not torch.is_tensor(losses) or losses.dim() != 1:
            shape = tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
            raise ValueError(
                f"The objective callable must return a 1-D per-pair loss tensor of shape (P,); got {shape}. "
                "Return the per-pair losses, not their mean: J is averaged over all pairs by the engine."
            )
        return losses

    def __repr__(self) -> str:
        return f"CallableObjective({getattr(self.fn, '__name__', repr(self.fn))})"


def as_objective(objective) -> AlignmentObjective:
    """`objective` itself if it is an `AlignmentObjective`, else a `CallableObjective` wrapping it."""
    return objective if isinstance(objective, AlignmentObjective) else CallableObjective(objective)


def reference_logps(
    model: torch.nn.Module,
    pair_batches: Iterable[dict],
    reference_context: Callable[[], AbstractContextManager] | None = None,
) -> list[dict]:
    """Copies of the pair batches with `ref_chosen_logps` and `ref_rejected_logps` (`(P,)` float32) filled.

    Computed once, under `torch.no_grad()` and in eval mode. Pass the start model, or the PEFT policy with
    `reference_context=peft_model.disable_adapter` (the base model with the adapter disabled is `θ_0`).
    `pair_reference_values` computes the same values without holding the batches.
    """
    pair_batches = list(pair_batches)
    if not pair_batches:
        raise ValueError("reference_logps got no pair batches.")
    return with_reference(model, pair_batches, _pair_logps, reference_context)


def pair_reference_values(
    model: torch.nn.Module,
    pair_batches: Iterable[dict],
    reference_context: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """`ref_chosen_logps` and `ref_rejected_logps` of every pair, `(P,)` float32 each on the CPU in batch order: the
    values `reference_logps` adds, computed one batch at a time (`modeling.reference_values`)."""
    values = reference_values(model, pair_batches, _pair_logps, reference_context)
    if not values:
        raise ValueError("pair_reference_values got no pair batches.")
    return values


def _pair_logps(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    # The same concatenated forward as `DPOObjective`, so that the DPO margin is exactly 0 at `θ_0`
    logps_w, _, logps_l, _ = chosen_rejected_logps(model, batch)
    return {"ref_chosen_logps": logps_w, "ref_rejected_logps": logps_l}
