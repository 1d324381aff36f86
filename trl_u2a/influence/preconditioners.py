"""Diagonal preconditioners `P` of the query `v = P⁻¹∇J`: identity, Adam's second moments (from the optimizer, or
estimated before its first step) and the empirical Fisher of the alignment pairs."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..core.modeling import PADDING, batch_size_of
from .scores import checked_losses
from .sharded import (
    ForwardParameters,
    all_reduce_sum,
    deepspeed_second_moments,
    deepspeed_zero_optimizer,
    second_moment_key,
    zeros_full,
)
from .tracking import LossFn, ParamVector, scoring_mode, tracked_parameters, unique_params, unwrap_model

PRECONDITIONERS = ("identity", "adam", "fisher")


def gradient_second_moments(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[dict], params: Sequence[nn.Parameter] | None = None
) -> dict:
    """Adam's second moments estimated without an optimizer step: `mean_b (∇ L_b)²`, `L_b` the mean unlearning loss
    of batch `b` (what Adam squares is a mini-batch gradient, not a per-example one).

    Args:
        model: the policy (unwrapped; run in eval mode with gradient checkpointing off).
        loss_fn: `loss_fn(model, batch) -> (B,)` per-example unlearning loss.
        batches: this rank's share of each training-size batch, `PADDING` rows marked. Under `torch.distributed` the
            gradient of each batch is the global mean over the ranks' rows (one SUM all-reduce per batch), so every
            rank gets what one process with the whole batch gets; every rank must pass as many batches.
        params: the parameters (default `tracked_parameters(model)`).

    Returns:
        `dict[param -> fp32 tensor]` shaped like each parameter's gradient; `v̂` for `precondition(...,
        second_moments=...)`.
    """
    batches = list(batches)
    distributed = dist.is_available() and dist.is_initialized()
    if not batches:
        raise ValueError("gradient_second_moments got no batches.")
    base = unwrap_model(model)
    params = unique_params(tracked_parameters(base, warn=False) if params is None else params)
    squares = [zeros_full(p) for p in params]
    with scoring_mode(base), torch.enable_grad(), ForwardParameters(base, params) as forward:
        for batch in batches:
            losses = checked_losses(loss_fn(base, batch), batch_size_of(batch), "loss_fn")
            padding = batch.get(PADDING)
            if padding is not None:
                losses = losses[~padding.to(losses.device)]
            grads = torch.autograd.grad(losses.sum(), forward.used, allow_unused=True)
            grads = [zeros_full(p) if g is None else g.to(torch.float32) for p, g in zip(params, grads)]
            count = torch.tensor([float(losses.shape[0])], dtype=torch.float32, device=grads[0].device)
            if distributed:
                all_reduce_sum([*grads, count])
            for square, g in zip(squares, grads):
                square += (g / count.clamp(min=1)) ** 2
    return {p: square / len(batches) for p, square in zip(params, squares)}


def precondition(
    grads: ParamVector,
    preconditioner: str = "identity",
    damping: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    fisher: ParamVector | None = None,
    second_moments: ParamVector | None = None,
) -> dict:
    """`v = P⁻¹ g` for a positive diagonal `P ≈ H` (elementwise; returns `dict[param -> fp32 tensor]`).

    - `"identity"`: `P = (1 + λ) I` (`v = g / (1 + damping)`; `λ = 0`: `v = g`). What the paper's code uses (TracIn);
      the scale does not change rankings. The only choice at step 0, before the optimizer has state.
    - `"adam"`: `P = sqrt(v̂) + ε + λ` with `v̂ = exp_avg_sq / (1 − β₂^step)` from `optimizer.state[p]` (AMSGrad:
      `max_exp_avg_sq`) and `ε`, `β₂` from the parameter's group. This is the geometry of the update the optimizer
      actually takes, so `s_i` predicts the change of `J` under an Adam step on example `i`; it costs nothing on one
      process. FSDP2's sharded states and DeepSpeed ZeRO-1/2/3's flat fp32 partitions are gathered to full shape (a
      collective per parameter; under DeepSpeed `step`, `ε` and `β₂` come from the wrapped optimizer). Without
      optimizer state for every parameter (before the first step, or a quantised or factored state), falls back to
      identity and logs it, unless `second_moments` (`gradient_second_moments`) stands in for `v̂`: then
      `P = sqrt(v̂) + ε + λ` with `ε` from the optimizer's first group (applied as `"adam-estimated"`).
    - `"fisher"`: `P = F + λ` with `F` the diagonal empirical Fisher of the per-pair alignment gradients
      (`alignment_gradient(..., return_fisher=True).fisher`); costs one forward+backward per alignment pair.
      Entries with `P = 0` (no pair moves that weight, so `g = 0` there too) get `v = 0`; use `damping > 0` to
      keep tiny-variance entries from dominating.

    Damping `λ ≥ 0` is added to every diagonal.
    """
    return _precondition(grads, preconditioner, damping, optimizer, fisher, second_moments)[0]


def _precondition(grads, preconditioner, damping, optimizer, fisher, second_moments=None) -> tuple[dict, str]:
    """`precondition`, also returning the preconditioner actually applied (`"identity"` after an adam fallback)."""
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r} is not supported; expected one of {PRECONDITIONERS}.")
    if damping < 0:
        raise ValueError(f"damping must be >= 0; got {damping}.")
    if not grads:
        raise ValueError("precondition got no gradients.")
    grads = {p: g.to(torch.float32) for p, g in grads.items()}

    if preconditioner == "adam":
        if optimizer is None:
            raise ValueError("preconditioner='adam' needs the optimizer (its exp_avg_sq state).")
        denoms = _adam_denominators(grads, optimizer, damping)
        if denoms is None and second_moments is not None:
            eps = optimizer.param_groups[0].get("eps", 1e-8) if optimizer.param_groups else 1e-8
            return {p: g / (second_moments[p].to(g).sqrt() + eps + damping) for p, g in grads.items()}, "adam-estimated"
        if denoms is None:
            message = (
                "preconditioner='adam': the optimizer has no second-moment state (exp_avg_sq and step) for every "
                "scored parameter yet (before the first step?); using the identity preconditioner."
            )
            # A warning, shown once per call site by Python's default filter: every refresh before the first step
            # would repeat it
            warnings.warn(message, stacklevel=3)
            preconditioner = "identity"
        else:
            return {p: g / denoms[p] for p, g in grads.items()}, "adam"

    if preconditioner == "identity":
        return {p: g / (1.0 + damping) for p, g in grads.items()}, "identity"

    # fisher
    if fisher is None:
        raise ValueError(
            "preconditioner='fisher' needs the diagonal Fisher: alignment_gradient(..., return_fisher=True).fisher."
        )
    out = {}
    for p, g in grads.items():
        if p not in fisher:
            raise ValueError("The Fisher diagonal lacks a parameter of the gradient.")
        denom = fisher[p].to(g) + damping
        out[p] = torch.where(denom > 0, g / denom.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(g))
    return out, "fisher"


def _adam_denominator(exp_avg_sq: torch.Tensor, step: float, group: dict, damping: float) -> torch.Tensor:
    """`sqrt(v̂) + ε + λ` with `v̂ = exp_avg_sq / (1 − β₂^step)`: the bias correction torch's Adam applies, `β₂` and `ε`
    from the parameter's group."""
    beta2 = group.get("betas", (0.9, 0.999))[1]
    eps = group.get("eps", 1e-8)
    v_hat = exp_avg_sq.to(torch.float32) / (1.0 - beta2**step)
    return v_hat.sqrt() + eps + damping


def _adam_denominators(grads: ParamVector, optimizer, damping: float) -> dict | None:
    zero = deepspeed_zero_optimizer(optimizer)
    if zero is not None:
        moments = deepspeed_second_moments(grads, zero)
        if moments is None:
            return None
        return {
            p: _adam_denominator(exp_avg_sq.to(g.device).reshape(g.shape), step, group, damping)
            for (p, g), (exp_avg_sq, step, group) in zip(grads.items(), moments)
        }
    groups = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            groups[id(p)] = group
    denoms = {}
    for p in grads:
        state = optimizer.state.get(p) if hasattr(optimizer.state, "get") else None
        group = groups.get(id(p))
        if not state or group is None or "step" not in state:
            return None
        exp_avg_sq = state.get(second_moment_key(group, state))
        if exp_avg_sq is None or exp_avg_sq.shape != p.shape:
            return None
        if hasattr(exp_avg_sq, "full_tensor"):
            # FSDP2: the state is a DTensor sharded like its parameter, `g` the full plain gradient. `full_tensor` is
            # a collective; every rank walks the same parameters and the same (step-synchronous) states
            exp_avg_sq = exp_avg_sq.full_tensor()
        step = float(state["step"])
        if step <= 0:
            return None
        denoms[p] = _adam_denominator(exp_avg_sq, step, group, damping)
    return denoms
