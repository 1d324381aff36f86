"""Scores `s_i = ⟨v, ∇ℓ_i⟩` of negatives: the per-example unlearning loss, ghost scoring of a batch or a dataset, and
the brute-force oracle (one `torch.autograd.grad` per example) that the tests check the ghost path against.

`s_i > 0` means unlearning example `i` is predicted to lower `J`: a step of size `η` along `−P⁻¹∇ℓ_i` changes `J` by
about `−η s_i` (docs/method.md, "The influence score and its sign").
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..core.losses import DEFAULT_BETA, LOSS_TYPES, unlearning_loss
from ..core.modeling import GrowingTensor, batch_size_of, model_device, move_batch, sequence_logps, slice_batch
from .ghost import GhostDotProduct
from .sharded import ForwardParameters, on_other_rank
from .tracking import LossFn, ParamVector, resolve_tracking, scoring_mode, unwrap_model


def make_unlearning_loss_fn(
    loss_type: str = "ga", beta: float | None = None, gamma: float = 0.0, ga_reduction: str = "mean"
) -> LossFn:
    """`loss_fn(model, batch) -> (B,)`, the per-example unlearning loss `ℓ_i` of a batch of negatives.

    The batch holds `input_ids`, `attention_mask`, `completion_mask` (`(B, T)`) and, for `npo`, the reference
    log-probs `ref_logps` (`(B,)`, see `modeling.fill_reference_logps`). `beta` defaults to 0.1 (npo) / 4.5
    (simnpo). `graddiff` scores its `ga` term: the retain term is not per negative.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; expected one of {LOSS_TYPES}.")
    if ga_reduction not in ("mean", "sum"):
        raise ValueError(f"ga_reduction={ga_reduction!r}; expected 'mean' or 'sum'.")
    beta = DEFAULT_BETA[loss_type] if beta is None else beta

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref = batch.get("ref_logps")
        if ref is not None:
            ref = ref.to(logps)
        return unlearning_loss(loss_type, logps, lengths, ref, beta=beta, gamma=gamma, ga_reduction=ga_reduction)

    loss_fn.loss_type = loss_type
    return loss_fn


def checked_losses(losses: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    if not torch.is_tensor(losses) or losses.shape != (batch_size,):
        shape = tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
        raise ValueError(f"{what} must return one loss per example, shape ({batch_size},); got {shape}.")
    return losses


def score_negatives_batch(model: nn.Module, batch: dict, loss_fn: LossFn, v: ParamVector) -> torch.Tensor:
    """Scores `s_i = ⟨v, ∇ℓ_i⟩` of one batch of negatives in ONE forward and ONE backward.

    Args:
        model: the policy (PEFT, QLoRA and DDP-wrapped models work; the unwrapped module is used).
        batch: right-padded negatives, `(B, T)` tensors (whatever `loss_fn` reads).
        loss_fn: `loss_fn(model, batch) -> (B,)` per-example unlearning loss, one forward with one row per
            example (e.g. `make_unlearning_loss_fn("npo")`).
        v: the query `dict[param -> tensor]` (`compute_query`).

    Returns:
        `(B,)` float32 scores. Runs in eval mode with gradient checkpointing off (both restored). If `v` holds
        parameters the ghost path cannot see, falls back to `brute_force_scores` with a warning.
    """
    base = unwrap_model(model)
    if not v:
        raise ValueError("v is empty: compute it with `compute_query` over `tracked_parameters(model)`.")
    if not resolve_tracking(base).covers(v):
        warnings.warn(
            "v holds parameters outside the modules the ghost scorer hooks; scoring with per-example gradients "
            "(brute force, much slower).",
            stacklevel=2,
        )
        return brute_force_scores(base, batch, loss_fn, v)
    return _ghost_scores(base, batch, loss_fn, v)


def _ghost_scores(base: nn.Module, batch: dict, loss_fn: LossFn, v: ParamVector) -> torch.Tensor:
    with scoring_mode(base), GhostDotProduct(base, v) as ghost:
        return _ghost_batch(base, ghost, batch, loss_fn)


def _ghost_batch(base: nn.Module, ghost: GhostDotProduct, batch: dict, loss_fn: LossFn) -> torch.Tensor:
    """Scores of one batch with `ghost` attached, inside `scoring_mode` (entered once for many batches: both walk
    every module of the model)."""
    batch_size = batch_size_of(batch)
    with torch.enable_grad(), ghost.output_edges() as edges:
        losses = checked_losses(loss_fn(base, batch), batch_size, "loss_fn")
        if edges:
            # The module outputs only: the tensor hooks see every `b`, and no weight gradient is ever computed
            torch.autograd.grad(losses.sum(), edges, allow_unused=True)
    return ghost.scores(batch_size).to(losses.device)


def brute_force_scores(model: nn.Module, batch: dict, loss_fn: LossFn, v: ParamVector) -> torch.Tensor:
    """Reference scores: for each example alone (batch size 1), `torch.autograd.grad` of its loss over the keys of
    `v` and the dot product with `v`. Same modes as `score_negatives_batch`. Returns `(B,)` float32.

    One forward+backward per example: the correctness oracle of the tests and the fallback for parameters the ghost
    path cannot see.
    """
    base = unwrap_model(model)
    params = list(v)
    if not params:
        raise ValueError("v is empty.")
    batch_size = batch_size_of(batch)
    scores = torch.zeros(batch_size, dtype=torch.float32, device=params[0].device)
    with scoring_mode(base), torch.enable_grad(), ForwardParameters(base, params) as forward:
        for i in range(batch_size):
            loss = checked_losses(loss_fn(base, slice_batch(batch, i)), 1, "loss_fn")
            grads = torch.autograd.grad(loss.sum(), forward.used, allow_unused=True)
            total = torch.zeros((), dtype=torch.float32, device=scores.device)
            for p, g in zip(params, grads):
                if g is not None:
                    total += (g.to(torch.float32) * v[p].to(g.device, torch.float32)).sum().to(scores.device)
            scores[i] = total
    return scores


def _progress_disabled() -> bool:
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return True
    return on_other_rank()


def score_dataset(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: LossFn,
    v: ParamVector,
    desc: str = "U2A scoring",
    method: str = "auto",
    disable_progress: bool = False,
    total: int | None = None,
) -> torch.Tensor:
    """Scores of many batches of negatives, concatenated: `(N,)` float32, in batch order.

    `batches` is iterated once and each batch is dropped once scored: pass a generator that builds each batch when
    asked, and the pass holds one batch at a time whatever N (`total`: its number of batches, for the progress bar).

    `method`: `"ghost"`, `"brute_force"` or `"auto"` (ghost when `v` is covered, else brute force with one
    warning). Shows a tqdm progress bar, disabled by `disable_progress` (the trainer passes `disable_tqdm`), when the
    `TQDM_DISABLE` environment variable is set, and on non-zero ranks.
    """
    from tqdm.auto import tqdm

    if method not in ("auto", "ghost", "brute_force"):
        raise ValueError(f"method={method!r}; expected 'auto', 'ghost' or 'brute_force'.")
    base = unwrap_model(model)
    if not v:
        raise ValueError("v is empty: compute it with `compute_query` over `tracked_parameters(model)`.")
    covered = resolve_tracking(base).covers(v)
    if method == "ghost" and not covered:
        raise ValueError("method='ghost' but v holds parameters the ghost scorer cannot see.")
    if method == "auto" and not covered:
        warnings.warn(
            "v holds parameters outside the modules the ghost scorer hooks; scoring with per-example gradients "
            "(brute force, much slower).",
            stacklevel=2,
        )
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    progress = tqdm(batches, desc=desc, total=total, disable=disable_progress or _progress_disabled(), unit="batch")
    device = model_device(base)
    scores = GrowingTensor()
    if covered and method != "brute_force":
        # One scoring mode and one set of hooks for all batches; batches move to the device one at a time
        with scoring_mode(base), GhostDotProduct(base, v) as ghost:
            for batch in progress:
                scores.extend(_ghost_batch(base, ghost, move_batch(batch, device), loss_fn).detach())
    else:
        for batch in progress:
            scores.extend(brute_force_scores(base, move_batch(batch, device), loss_fn, v).detach())
    return scores.values()
