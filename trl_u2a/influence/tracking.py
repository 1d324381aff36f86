"""What the ghost scorer can see: the tracked modules and parameters of a model, and the scoring mode.

`v` and the scores live on the *covered* parameters: trainable parameters every use of which goes through a tracked
module (`nn.Linear`, `nn.Embedding`, PEFT LoRA layers). Others are excluded with one warning naming them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.modeling import eval_mode
from .sharded import on_other_rank, reshard_fsdp2

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict], torch.Tensor]
ParamVector = dict  # dict[nn.Parameter, torch.Tensor], keyed by parameter identity


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under data-parallel / compile wrappers (DDP, DataParallel, DeepSpeed engine, `torch.compile`).

    Scoring runs on the unwrapped module: a forward through DDP arms its reducer for a backward that
    `torch.autograd.grad` never delivers to the parameters.
    """
    while True:
        is_deepspeed = type(model).__name__ == "DeepSpeedEngine"
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            is_deepspeed and isinstance(getattr(model, "module", None), nn.Module)
        ):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _is_supported_module(module: nn.Module) -> bool:
    """Modules whose weight enters the forward only through their own `forward`, with the math the hooks assume.

    Subclasses that override `forward` (bitsandbytes `Linear4bit`, ...) compute something else; embeddings with
    `max_norm` (renormalises weights in place) or `scale_grad_by_freq` (batch-dependent gradient) have no
    per-example gradient of the plain form.
    """
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Embedding):
        return (
            type(module).forward is nn.Embedding.forward and module.max_norm is None and not module.scale_grad_by_freq
        )
    return False


def _lora_variant_modules(model: nn.Module) -> set[int]:
    """ids of PEFT `lora_A`/`lora_B` submodules of adapters with a LoRA variant (DoRA, ...).

    A variant also uses `lora_A.weight`/`lora_B.weight` outside the submodule calls (DoRA normalises the merged
    weight), so module-boundary gradients miss part of their gradient: they must not count as covered.
    """
    ids = set()
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(variants, dict) or not variants:
            continue
        for adapter in variants:
            for holder in ("lora_A", "lora_B"):
                sub = getattr(module, holder, None)
                if isinstance(sub, nn.ModuleDict) and adapter in sub:
                    ids.add(id(sub[adapter]))
    return ids


def tracked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of every module the ghost path hooks: each `nn.Linear` / `nn.Embedding` with a direct
    parameter that requires grad.

    This includes PEFT LoRA's `lora_A[name]` / `lora_B[name]` (plain `nn.Linear`; PEFT applies `scaling` outside
    `lora_B`, so module-boundary gradients are exact, rsLoRA included) and `modules_to_save` copies. Frozen modules,
    e.g. bitsandbytes `Linear4bit` base layers, are skipped. The model is unwrapped first (`unwrap_model`).
    """
    model = unwrap_model(model)
    excluded = _lora_variant_modules(model)
    return [
        (name, module)
        for name, module in model.named_modules()
        if id(module) not in excluded
        and _is_supported_module(module)
        and any(p.requires_grad for p in module.parameters(recurse=False))
    ]


@dataclass
class Tracking:
    """What the ghost path can score on a model.

    Attributes:
        modules: the tracked `(name, module)` pairs.
        params: trainable parameters every use of which goes through a tracked module ("covered"); `v` and the
            scores live on these.
        names: a name for each covered parameter (`id(param) -> name`).
        excluded: names of trainable parameters that are not covered (e.g. RMSNorm weights in full fine-tuning).
        excluded_share: their share of the trainable parameter count (0..1).
    """

    modules: list[tuple[str, nn.Module]]
    params: list[nn.Parameter]
    names: dict[int, str] = field(repr=False)
    excluded: list[str]
    excluded_share: float

    def covers(self, v: ParamVector) -> bool:
        ids = {id(p) for p in self.params}
        return all(id(p) in ids for p in v)


def resolve_tracking(model: nn.Module) -> Tracking:
    """Split the trainable parameters of `model` into covered (scored by ghost dot products) and excluded.

    A parameter is covered when every module that owns it is tracked: a weight tied between the input embedding
    and `lm_head` is owned by both, and covered because both are tracked (their contributions add). Under FSDP2 the
    parameters are the sharded DTensors (`reshard_fsdp2`).
    """
    model = unwrap_model(model)
    reshard_fsdp2(model)
    modules = tracked_modules(model)
    tracked_ids = {id(m) for _, m in modules}
    owners: dict[int, list[nn.Module]] = {}
    params: dict[int, tuple[str, nn.Parameter]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            owners.setdefault(id(p), []).append(module)
            params.setdefault(id(p), (f"{mod_name}.{p_name}" if mod_name else p_name, p))
    covered, names, excluded, excluded_numel, total = [], {}, [], 0, 0
    for pid, (name, p) in params.items():
        total += p.numel()
        if all(id(m) in tracked_ids for m in owners[pid]):
            covered.append(p)
            names[pid] = name
        else:
            excluded.append(name)
            excluded_numel += p.numel()
    return Tracking(modules, covered, names, excluded, excluded_numel / total if total else 0.0)


def describe_names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def tracked_parameters(model: nn.Module, warn: bool = True) -> list[nn.Parameter]:
    """The trainable parameters that `v` and the scores are computed over.

    Normally the covered parameters (`resolve_tracking`); trainable parameters outside them are excluded from `v`
    and from every score, with ONE warning (on rank 0) naming them and their share. If no trainable parameter is
    covered, all trainable parameters are returned and scoring falls back to the slow brute-force path (warned).
    """
    tracking = resolve_tracking(model)
    # Every rank holds the same parameters: one rank says it
    warn = warn and not on_other_rank()
    if not tracking.params:
        trainable = unique_params([p for p in unwrap_model(model).parameters() if p.requires_grad])
        if not trainable:
            raise ValueError("The model has no trainable parameter (nothing requires grad): there is nothing to score.")
        if warn:
            warnings.warn(
                "No trainable parameter sits in a module the ghost scorer can hook (nn.Linear / nn.Embedding); "
                "influence scores fall back to per-example gradients (brute force, much slower): "
                f"{describe_names(tracking.excluded)}.",
                stacklevel=2,
            )
        return trainable
    if tracking.excluded and warn:
        warnings.warn(
            f"{len(tracking.excluded)} trainable parameter tensor(s) ({100 * tracking.excluded_share:.2f}% of the "
            "trainable parameters) are not inside a module the ghost scorer can hook and are excluded from the "
            f"alignment gradient and from the influence scores: {describe_names(tracking.excluded)}.",
            stacklevel=2,
        )
    return tracking.params


def unique_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@contextmanager
def scoring_mode(model: nn.Module):
    """Eval mode (no dropout: deterministic scores; `modeling.eval_mode`) and gradient checkpointing off, both
    restored on exit.

    Reentrant checkpointing breaks `torch.autograd.grad`. Checkpointing is switched off through the per-module
    `gradient_checkpointing` flags that transformers' layers read, and those flags are restored as they were, so the
    user's checkpointing function and its kwargs (`use_reentrant`, ...) are untouched; the public
    `gradient_checkpointing_disable()/enable()` pair would lose those kwargs. Each module's own training flag is
    restored (not a blanket `model.train()`), so deliberately frozen-in-eval submodules stay in eval.
    """
    model = unwrap_model(model)
    flags = [
        (m, m.gradient_checkpointing)
        for m in model.modules()
        if isinstance(getattr(m, "gradient_checkpointing", None), bool)
    ]
    _warn_if_bnb_repacked(model)
    try:
        for m, _ in flags:
            m.gradient_checkpointing = False
        with eval_mode(model):
            yield model
    finally:
        for m, flag in flags:
            m.gradient_checkpointing = flag


def _warn_if_bnb_repacked(model: nn.Module) -> None:
    """Warn when a bitsandbytes 4-bit layer was already repacked for CPU inference (see `modeling.eval_mode`):
    gradients through it are silently dropped, so scores and training are wrong."""
    repacked = [
        name
        for name, m in model.named_modules()
        if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]
    if repacked:
        warnings.warn(
            f"{len(repacked)} bitsandbytes 4-bit layer(s) were repacked for CPU inference (the model ran in eval mode "
            "outside trl_u2a); bitsandbytes drops the gradient through them, so gradients and influence scores are "
            f"wrong: {describe_names(repacked)}. Keep 4-bit layers in training mode on CPU "
            "(trl_u2a.core.modeling.eval_mode).",
            stacklevel=3,
        )
