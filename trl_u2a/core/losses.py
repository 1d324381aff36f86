"""Per-example unlearning losses, as pure functions of sequence log-probabilities.

Notation (docs/method.md, "Unlearning losses"): `logps[i] = log π_θ(y_i | x_i)`, the sum of the completion-token
log-probs (prompt and padding masked); `lengths[i] = |y_i|`, the number of completion tokens;
`ref_logps[i] = log π_0(y_i | x_i)`. Every loss here is *minimised*, returns one value per example (shape
`(B,)`), and knows nothing about models or TRL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("ga", "graddiff", "npo", "simnpo")
# `beta` of each loss when none is given: NPO's inverse temperature, SimNPO's (docs/method.md); ga/graddiff ignore it
DEFAULT_BETA = {"ga": 0.1, "graddiff": 0.1, "npo": 0.1, "simnpo": 4.5}


def completion_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum next-token log-probs over completion tokens.

    Args:
        per_token_logps: `(B, T-1)`, the log-prob of token `t+1` given tokens `≤ t`.
        completion_mask: `(B, T)`, 1 on completion tokens, 0 on prompt and padding tokens.

    Returns:
        `(logps, lengths)`, both `(B,)`: the completion log-prob and the number of completion tokens.
    """
    mask = completion_mask[:, 1:].to(per_token_logps.dtype)
    return (per_token_logps * mask).sum(-1), mask.sum(-1)


def ga_loss(logps: torch.Tensor, lengths: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Gradient ascent: `ℓ_i = log π_θ(y_i|x_i) / |y_i|` (`reduction="sum"`: without `/|y_i|`). Shape `(B,)`."""
    if reduction == "sum":
        return logps
    return logps / lengths.clamp(min=1)


def npo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: `ℓ_i = (2/β) log(1 + (π_θ/π_0)^β) = (2/β) softplus(β (log π_θ − log π_0))`. Shape `(B,)`."""
    return (2.0 / beta) * F.softplus(beta * (logps - ref_logps))


def simnpo_loss(logps: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO: `ℓ_i = −(2/β) log σ(−(β/|y_i|) log π_θ(y_i|x_i) − γ)`. Shape `(B,)`."""
    return -(2.0 / beta) * F.logsigmoid(-(beta / lengths.clamp(min=1)) * logps - gamma)


def nll_loss(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of each completion, the retain term. Shape `(B,)`."""
    return -logps / lengths.clamp(min=1)


def unlearning_loss(
    loss_type: str,
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    gamma: float = 0.0,
    ga_reduction: str = "mean",
) -> torch.Tensor:
    """Per-example unlearning loss `ℓ_i` of the negatives for `loss_type` (`graddiff` uses the `ga` term). `(B,)`."""
    if loss_type in ("ga", "graddiff"):
        return ga_loss(logps, lengths, ga_reduction)
    if loss_type == "npo":
        if ref_logps is None:
            raise ValueError("loss_type='npo' needs the reference log-probs `ref_logps`; got None.")
        return npo_loss(logps, ref_logps, beta)
    if loss_type == "simnpo":
        return simnpo_loss(logps, lengths, beta, gamma)
    raise ValueError(f"loss_type={loss_type!r} is not supported; expected one of {LOSS_TYPES}.")


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Token-mean `KL(π_θ ‖ π_0)` over each example's completion positions, the KL retain term.

    Args:
        logits: `(B, T, V)` next-token logits of the policy.
        ref_logits: `(B, T, V)` next-token logits of the reference.
        completion_mask: `(B, T)`.

    Returns:
        `(B,)`.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    per_token = (logp.exp() * (logp - ref_logp)).sum(-1)
    mask = completion_mask[:, 1:].to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def weight_coefficients(weights: torch.Tensor, normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's coefficient `ω_i / Σ_j ω_j` in `weighted_mean` (`(B,)`), or `ω_i / normalizer` when given (e.g. the
    all-reduced weight sum of a global batch, so that data-parallel ranks together compute the global weighted
    mean). Zeros when no weight is positive."""
    total = weights.sum() if normalizer is None else normalizer
    return weights / total.clamp(min=torch.finfo(weights.dtype).tiny)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor, normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """`Σ_i ω_i ℓ_i / Σ_i ω_i` (see `weight_coefficients` for `normalizer`). A row of weight 0 adds nothing, even
    when its loss is infinite or NaN (a row that is not a negative, or an unselected one)."""
    coefficients = weight_coefficients(weights.to(losses.dtype), normalizer)
    return torch.where(coefficients > 0, coefficients * losses, 0.0).sum()
