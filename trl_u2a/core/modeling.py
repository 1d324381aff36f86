"""Sequence log-probabilities of completions under a causal LM, reference log-probs, and batch helpers.

The unlearning losses, the alignment objectives and the influence scores compute `log π(y|x)` through
`sequence_logps`, so that the influence engine differentiates exactly what they compute. (The trainer's training
forward goes through TRL's fused LM head instead, and takes the same completion log-probs from it.)

Batches are right-padded dicts of `(B, T)` integer tensors: `input_ids`, `attention_mask` and `completion_mask`
(1 on completion tokens only, 0 on prompt and padding tokens).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from .losses import completion_logps

# Optional bool `(B,)` entry of a batch: rows that a rank runs only so that every rank runs the same forwards
# (ZeRO-3 and FSDP2 gather the parameters in collectives inside each forward); their losses are dropped.
PADDING = "padding"


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion log-probabilities `log π(y_i|x_i)` and completion lengths `|y_i|`.

    A plain forward (`model(...).logits`), not TRL's fused linear-cross-entropy head: the influence engine hooks
    `nn.Linear` modules, so the `lm_head` module has to be *called* for its hooks to fire.

    Args:
        model: a causal LM returning `.logits` of shape `(B, T, V)` (a transformers model, a PEFT model, ...).
        input_ids: `(B, T)` token ids, right-padded.
        attention_mask: `(B, T)`, 1 on real tokens.
        completion_mask: `(B, T)`, 1 on completion tokens only.

    Returns:
        `(logps, lengths)`, both `(B,)` float32: the summed completion-token log-probs and the completion lengths.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # Next-token log-probs in fp32. `gather - logsumexp` equals `log_softmax(...).gather(...)` but autograd keeps
    # only the (already fp32 for fp32 models) logits instead of a second (B, T, V) log-softmax output.
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    per_token_logps = torch.gather(logits, -1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    # A completion token is also a real token: guard against a completion mask that covers padding.
    mask = completion_mask * attention_mask
    return completion_logps(per_token_logps, mask)


def _is_bnb_4bit(module: torch.nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # never import bitsandbytes just to check
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode (no dropout) inside the block; each submodule's own training flag is restored on exit.

    bitsandbytes 4-bit linears are left in training mode. On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a
    `Linear4bit` weight *in place* the first time the layer runs in eval mode on an input that does not require grad,
    and the repacked kernel (`gemv_4bit`) has no autograd formula: from then on every backward, training included,
    silently drops the gradient through that layer (PyTorch only warns "an autograd kernel was not registered").
    Their training flag changes nothing else (they have no dropout).
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in model.modules():
            if _is_bnb_4bit(m):
                m.training = True
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def batch_size_of(batch: dict) -> int:
    """Number of rows of a batch dict: the leading size of its first tensor with at least one dimension."""
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("The batch holds no tensor with a batch dimension.")


def slice_batch(batch: dict, index: int | slice) -> dict:
    """Rows `index` of a batch dict (every tensor whose leading size is the batch size is sliced; others are kept).

    An integer index keeps the batch dimension (rows `index:index+1`).
    """
    size = batch_size_of(batch)
    if isinstance(index, int):
        index = slice(index, index + 1)
    return {k: (v[index] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size else v) for k, v in batch.items()}


def move_batch(batch: dict, device: torch.device | str) -> dict:
    """The batch with every tensor moved to `device`."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def fill_reference_logps(
    model: torch.nn.Module,
    batches: Iterable[dict],
    prefixes: Iterable[str] = ("",),
    reference_context: Callable[[], AbstractContextManager] | None = None,
) -> list[dict]:
    """Copies of `batches` with the reference log-probs `log π_0` added, computed once under `torch.no_grad()`.

    For each prefix `p` the batch must hold `{p}input_ids`, `{p}attention_mask`, `{p}completion_mask`; the result
    gets `ref_logps` for `p=""` and `ref_{name}_logps` for `p="{name}_"` (e.g. `ref_chosen_logps`).

    Args:
        model: the reference model, or the policy when `reference_context` turns it into the reference.
        batches: batch dicts.
        prefixes: key prefixes of the sequences to score.
        reference_context: a zero-argument callable returning a context manager inside which `model` is the
            reference, e.g. `peft_model.disable_adapter` (the PEFT base model is the start model `θ_0`).

    Returns:
        A list of new batch dicts (inputs are not modified); the reference log-probs are float32 `(B,)` tensors.
    """

    def logps_of(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        new = {}
        for prefix in prefixes:
            logps, _ = sequence_logps(
                model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"]
            )
            new["ref_logps" if prefix == "" else f"ref_{prefix.rstrip('_')}_logps"] = logps
        return new

    return with_reference(model, batches, logps_of, reference_context)


def with_reference(
    model: torch.nn.Module,
    batches: Iterable[dict],
    logps_fn: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]],
    reference_context: Callable[[], AbstractContextManager] | None = None,
) -> list[dict]:
    """Copies of `batches` updated with `logps_fn(model, batch)` (new `(B,)` tensors by key), detached, computed once
    in eval mode under `torch.no_grad()` and `reference_context()`. Holds every batch: for a long pass, take
    `reference_values` and add their slices to the batches as they are built."""
    out = []
    with _reference_mode(model, reference_context):
        for batch in batches:
            out.append({**batch, **{k: v.detach() for k, v in logps_fn(model, batch).items()}})
    return out


def reference_values(
    model: torch.nn.Module,
    batches: Iterable[dict],
    logps_fn: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]],
    reference_context: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """`logps_fn(model, batch)` of every batch, concatenated by key in batch order (`(N,)` float32 each, on the CPU),
    computed as `with_reference` does. Each batch is dropped once its values are read, so a generator of batches
    keeps the pass at one batch of memory plus N floats per key."""
    parts: dict[str, GrowingTensor] = {}
    with _reference_mode(model, reference_context):
        for batch in batches:
            for k, v in logps_fn(model, batch).items():
                parts.setdefault(k, GrowingTensor()).extend(v.detach().float().cpu())
    return {k: v.values() for k, v in parts.items()}


@contextmanager
def _reference_mode(model: torch.nn.Module, reference_context: Callable[[], AbstractContextManager] | None):
    # eval: no dropout, the reference is a deterministic function of the start weights
    with eval_mode(model), torch.no_grad(), reference_context() if reference_context is not None else nullcontext():
        yield


class GrowingTensor:
    """A 1-D tensor appended to batch by batch, in one buffer that doubles when full.

    Not a list of per-batch tensors: thousands of small tensors alive between the large, short-lived activations of
    each forward keep glibc from reusing the freed memory, and the resident set of a CPU scoring pass grew by ~20 KB
    per negative at 64 tokens (benchmarks/bench_scale.py); one buffer keeps it flat.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.size = 0

    def extend(self, values: torch.Tensor) -> None:
        end = self.size + len(values)
        if self.buffer is None or end > len(self.buffer):
            like = values if self.buffer is None else self.buffer
            grown = torch.empty(max(2 * end, 1024), dtype=like.dtype, device=like.device)
            if self.buffer is not None:
                grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : end] = values
        self.size = end

    def values(self) -> torch.Tensor:
        """The values appended so far (a copy: the buffer's spare room is not kept); float32 zeros(0) if none."""
        if self.buffer is None:
            return torch.zeros(0, dtype=torch.float32)
        return self.buffer[: self.size].clone()
