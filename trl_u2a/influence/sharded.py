"""What sharded training (FSDP2, DeepSpeed ZeRO) and several processes change for the influence engine: parameters
swapped in during the forward, full-shape gradients of empty shards, bucketed all-reduces, and Adam's state held in
DeepSpeed's flat fp32 partitions. Nothing here imports DeepSpeed or FSDP unless the run uses them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import nn


def on_other_rank() -> bool:
    """Whether this process is a rank other than 0 of a `torch.distributed` run: every rank computes the same thing,
    and rank 0 alone says so (warnings, progress bars)."""
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def reshard_fsdp2(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back on its sharded DTensor parameters.

    The parameters are keys (of `v`, of the gradients), so they must be the same objects whenever they are read. A
    module that FSDP2 does not reshard after its forward (the root, and accelerate's group of the final norm and
    `lm_head`, until a backward ends) exposes its unsharded tensors after a forward without a backward, e.g. a
    reference or retain-NLL pass. No-op without FSDP2.
    """
    # Not imported: then no module is an FSDPModule. Importing FSDP2 here instead made a gloo test process that never
    # used it abort at exit now and then ("terminate called without an active exception", 3 runs in 37).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def all_reduce_sum(tensors: list[torch.Tensor], bucket_numel: int = 1 << 24) -> None:
    """In-place SUM all-reduce of a fixed, rank-independent list of tensors, in flat buckets (few collectives)."""
    bucket: list[torch.Tensor] = []
    numel = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket.clear()

    for t in tensors:
        bucket.append(t)
        numel += t.numel()
        if numel >= bucket_numel:
            flush()
            numel = 0
    flush()


def zeros_full(p: torch.Tensor) -> torch.Tensor:
    """fp32 zeros of `p`'s full shape, a plain tensor. Under ZeRO-3 a parameter outside its forward is an empty shard
    (`p.shape` is `(0,)`) while autograd returns the gradient of the gathered, full-shape tensor: `ds_shape` is that
    shape. Under FSDP2 `p` is a sharded DTensor whose `shape` is already the global one, and the gradient is that of
    the unsharded plain tensor (`ForwardParameters`)."""
    return torch.zeros(getattr(p, "ds_shape", p.shape), dtype=torch.float32, device=p.device)


class ForwardParameters:
    """The tensors that stand for `params` in the forwards run while attached: what `torch.autograd.grad` must be
    asked for to get their gradients.

    FSDP2 holds a parameter as a sharded DTensor outside the forward and swaps in an all-gathered, unsharded plain
    tensor for it while its FSDP module runs; the sharded DTensor is not in the autograd graph (its gradient would be
    None). A forward pre-hook on each module that owns one of `params` reads the attribute as the forward sees it
    (FSDP2's own pre-hook, on the module or an ancestor, has run by then), so `used[i]` is the unsharded tensor,
    whose gradient is the full one. Everywhere else (plain, DDP, ZeRO-3, which gathers in place) it is the parameter
    itself, which `used` starts as.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]):
        self.used = list(params)
        index = {id(p): i for i, p in enumerate(params)}
        reshard_fsdp2(model)  # so that the modules hold `params` (sharded) whatever ran before
        self._handles = []
        for module in model.modules():
            owned = [(name, index[id(p)]) for name, p in module.named_parameters(recurse=False) if id(p) in index]
            if owned:
                self._handles.append(module.register_forward_pre_hook(partial(self._capture, owned=owned)))

    def _capture(self, module, args, owned):
        for name, i in owned:
            self.used[i] = getattr(module, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def second_moment_key(group: dict, state: dict) -> str:
    return "max_exp_avg_sq" if group.get("amsgrad", False) and "max_exp_avg_sq" in state else "exp_avg_sq"


def deepspeed_zero_optimizer(optimizer):
    """DeepSpeed's ZeRO-1/2 (`DeepSpeedZeroOptimizer`) or ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`) optimizer under
    `optimizer` (accelerate's `DeepSpeedOptimizerWrapper` holds it as `.optimizer`), or None."""
    while optimizer is not None:
        if hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_partitioned_groups_flat"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _deepspeed_partitions(zero) -> dict[int, tuple[dict, dict]]:
    """`id(param) -> (state, param group)` in the wrapped (torch) optimizer, for each parameter ZeRO optimizes. The
    wrapped optimizer steps this rank's flat fp32 partitions, so its state (`step`, and the slices of `exp_avg_sq`
    this rank owns) is keyed by them, not by the parameters; `state` is `{}` before the first step."""
    base = zero.optimizer
    out = {}
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: one flat partition per sub-group
        for i, params in enumerate(zero.fp16_groups):
            entry = (
                base.state.get(zero.fp32_partitioned_groups_flat[i], {}),
                base.param_groups[zero.sub_group_to_group_id[i]],
            )
            out.update((id(p), entry) for p in params)
    else:  # ZeRO-1/2: one flat partition per param group
        for i, params in enumerate(zero.bit16_groups):
            entry = (base.state.get(zero.single_partition_of_fp32_groups[i], {}), base.param_groups[i])
            out.update((id(p), entry) for p in params)
    return out


def _deepspeed_adam_step(entry: tuple[dict, dict] | None) -> tuple[str, float, dict] | None:
    """`(state key, step, param group)` of a parameter's flat partition (`_deepspeed_partitions`), or None before
    its first step or without Adam's second moment. Local: no collective. torch's and DeepSpeed's Adams keep `step` in
    the state; the param group's `step` is what DeepSpeed's FusedAdam reads from older checkpoints."""
    if entry is None:
        return None
    state, group = entry
    step = state.get("step", group.get("step"))
    key = second_moment_key(group, state)
    if step is None or float(step) <= 0 or key not in state:
        return None
    return key, float(step), group


def deepspeed_second_moments(grads: dict, zero) -> list[tuple[torch.Tensor, float, dict]] | None:
    """Adam's second moments of the parameters of `grads` under DeepSpeed ZeRO-1/2/3, gathered to full shape: one
    `(exp_avg_sq, step, param group)` per parameter in the order of `grads`, or None before every one has a state.

    `deepspeed.utils.safe_get_full_optimizer_state` is a collective (ZeRO-1/2: an all-reduce of the parameter-sized
    buffer into which each rank copies the slice it owns; ZeRO-3: an all-gather of the partitions) over the
    data-parallel group, so every rank must call it for the same parameters, in the same order. The parameters are
    the same on every rank (the keys of `grads`); whether every one has a state is agreed on first (MIN all-reduce),
    so that no rank skips the collectives that another runs. Under ZeRO-3 the full state has `ds_shape`, the shape of
    the gradient.
    """
    partitions = _deepspeed_partitions(zero)
    steps = [_deepspeed_adam_step(partitions.get(id(p))) for p in grads]
    device = next(iter(grads.values())).device
    ready = torch.tensor([int(all(s is not None for s in steps))], dtype=torch.int32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ready, op=dist.ReduceOp.MIN)
    if not ready.item():
        return None
    from deepspeed.utils import safe_get_full_optimizer_state

    moments = []
    for p, (key, step, group) in zip(grads, steps):
        exp_avg_sq = safe_get_full_optimizer_state(p, key)
        if exp_avg_sq is None:  # the same on every rank: whether `p` is a ZeRO parameter that requires grad
            return None
        moments.append((exp_avg_sq, step, group))
    return moments
