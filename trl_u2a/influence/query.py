"""The query `v = P⁻¹∇J`: the gradient of the alignment objective `J` over the tracked parameters (all-reduced
under `torch.distributed`), then preconditioned (`preconditioners.py`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..core.modeling import PADDING, batch_size_of, slice_batch
from ..core.objectives import as_objective
from .preconditioners import PRECONDITIONERS, _precondition
from .sharded import ForwardParameters, all_reduce_sum, zeros_full
from .tracking import ParamVector, scoring_mode, tracked_parameters, unique_params, unwrap_model


class AlignmentGradient(dict):
    """`dict[param -> ∇J]` (fp32, shaped like each parameter), with extras as attributes:

    - `objective_value`: `J`, the mean per-pair loss (global under `torch.distributed`);
    - `num_pairs`: the (global) number of pairs;
    - `fisher`: `dict[param -> mean_p (∇ℓ_p)²]`, the diagonal empirical Fisher of the per-pair gradients, or None.
    """

    objective_value: float
    num_pairs: int
    fisher: dict | None = None


def alignment_gradient(
    model: nn.Module,
    objective,
    pair_batches: Iterable[dict],
    params: Sequence[nn.Parameter] | None = None,
    return_fisher: bool = False,
) -> AlignmentGradient:
    """`∇J` over `params`, `J` the mean of the per-pair objective over ALL pairs (sum of per-pair losses divided by
    the total pair count, not a mean of batch means).

    Args:
        model: the policy (unwrapped from DDP etc.; run in eval mode with gradient checkpointing off).
        objective: an `AlignmentObjective` or any `fn(model, batch) -> (P,)`.
        pair_batches: this rank's pair batches (with reference log-probs if the objective needs them). Under ZeRO-3
            or FSDP2 every rank must pass as many batches, of as many rows with `return_fisher`: pad with rows
            marked in a `PADDING` entry, which run but do not count.
        params: the parameters to differentiate (default `tracked_parameters(model)`).
        return_fisher: also compute the diagonal empirical Fisher `mean_p (∇ℓ_p)²`; this runs one forward+backward
            per pair (batch size 1) instead of one per batch.

    Under `torch.distributed` the summed gradient, the loss sum, the pair count (and the Fisher sum) are all-reduced
    (SUM) unconditionally, so every rank returns the global mean; a rank may hold no pair batch.

    Returns:
        `AlignmentGradient` (`dict[param -> fp32 tensor]`, plus `objective_value`, `num_pairs`, `fisher`).
    """
    objective = as_objective(objective)
    distributed = dist.is_available() and dist.is_initialized()
    base = unwrap_model(model)
    params = unique_params(tracked_parameters(base) if params is None else params)
    if not params:
        raise ValueError("alignment_gradient got no parameters to differentiate.")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(f"{len(frozen)} of the given parameters do not require grad.")

    device = params[0].device
    grad_sum = [zeros_full(p) for p in params]
    sq_sum = [zeros_full(p) for p in params] if return_fisher else []
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of per-pair losses, pair count]

    def accumulate(losses: torch.Tensor, squares: bool) -> None:
        grads = torch.autograd.grad(losses.sum(), forward.used, allow_unused=True)
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.to(torch.float32)
            grad_sum[i] += g
            if squares:
                sq_sum[i] += g * g
        totals[0] += losses.detach().sum().to(torch.float64)
        totals[1] += losses.shape[0]

    num_batches = 0
    # `pair_batches` is iterated once, each batch dropped after its backward: a generator keeps one batch in memory
    with scoring_mode(base), torch.enable_grad(), ForwardParameters(base, params) as forward:
        for batch in pair_batches:
            num_batches += 1
            if return_fisher:
                # The empirical Fisher needs each pair's own gradient: one pair at a time.
                for i in range(batch_size_of(batch)):
                    accumulate(_pair_losses(objective, base, slice_batch(batch, i)), True)
            else:
                accumulate(_pair_losses(objective, base, batch), False)
    if num_batches == 0 and not distributed:
        raise ValueError("alignment_gradient got no pair batches: the alignment set is empty.")

    if distributed:
        # Same tensors, same order on every rank: never skipped, whatever the local data.
        all_reduce_sum(grad_sum + sq_sum + [totals])
    count = round(totals[1].item())
    if count == 0:
        raise ValueError("alignment_gradient: the alignment set is empty (0 pairs in total).")
    out = AlignmentGradient({p: g / count for p, g in zip(params, grad_sum)})
    out.objective_value = totals[0].item() / count
    out.num_pairs = count
    out.fisher = {p: s / count for p, s in zip(params, sq_sum)} if return_fisher else None
    return out


def _pair_losses(objective, model, batch) -> torch.Tensor:
    """The per-pair losses of the batch's real rows (`PADDING` rows dropped, after their forward)."""
    losses = objective(model, batch)
    if not torch.is_tensor(losses) or losses.dim() != 1:
        raise ValueError("The alignment objective must return a 1-D per-pair loss tensor (P,).")
    padding = batch.get(PADDING)
    # Indexing keeps a padded row in the graph, with a zero gradient, so that the backward reaches every
    # parameter on every rank (FSDP2 and ZeRO-3 also run collectives in the backward)
    return losses if padding is None else losses[~padding.to(losses.device)]


class QueryVector(dict):
    """`dict[param -> v]` (fp32), with `objective_value` (J at the current parameters), `num_pairs`,
    `preconditioner` (the one applied: `"identity"` when `"adam"` fell back for lack of optimizer state,
    `"adam-estimated"` with estimated second moments) and `refresh`."""

    objective_value: float
    num_pairs: int
    preconditioner: str
    refresh: int | None = None  # the refresh that computed it (set by the refresh callback)


def compute_query(
    model: nn.Module,
    objective,
    pair_batches: Iterable[dict],
    preconditioner: str = "identity",
    damping: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    params: Sequence[nn.Parameter] | None = None,
    second_moments: ParamVector | None = None,
) -> QueryVector:
    """`v = P⁻¹ ∇J` over `params` (default `tracked_parameters(model)`, which warns once about excluded
    parameters): `alignment_gradient` then `precondition` (`second_moments`: Adam's, estimated, for before the
    optimizer's first step)."""
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r} is not supported; expected one of {PRECONDITIONERS}.")
    if params is None:
        params = tracked_parameters(model)
    grads = alignment_gradient(model, objective, pair_batches, params, return_fisher=preconditioner == "fisher")
    vector, applied = _precondition(grads, preconditioner, damping, optimizer, grads.fisher, second_moments)
    v = QueryVector(vector)
    v.objective_value = grads.objective_value
    v.num_pairs = grads.num_pairs
    v.preconditioner = applied
    return v
