"""The influence engine: `v = P⁻¹∇J` and batched per-example scores `s_i = ⟨v, ∇ℓ_i⟩` by ghost dot products.

Definitions (METHOD.md, "Influence score of one negative"):

- `J(θ)`: the alignment objective, the mean of a per-pair loss over the alignment set (`objectives.py`).
- `ℓ_i(θ)`: the unlearning loss of negative `i` (`losses.py`), minimised by the lower level.
- `v = P⁻¹ ∇J`, over the *tracked* trainable parameters (see `tracked_modules`), with `P` a positive diagonal
  preconditioner (`precondition`).
- `s_i = ⟨v, ∇ℓ_i⟩`. **`s_i > 0` means unlearning example `i` is predicted to lower `J`** (improve alignment): a
  step of size `η` along `−P⁻¹∇ℓ_i` changes `J` by about `−η s_i`.

Ghost dot products. For a linear module `y_t = W a_t + c` applied at positions `t` of example `i`,
`∇_W ℓ_i = Σ_t b_t a_tᵀ` and `∇_c ℓ_i = Σ_t b_t` with `b_t = ∂ℓ_i/∂y_t`, hence
`⟨V_W, ∇_W ℓ_i⟩ + ⟨v_c, ∇_c ℓ_i⟩ = Σ_t b_tᵀ V_W a_t + b_t·v_c`; for an embedding `y_t = E[id_t]`,
`⟨V_E, ∇_E ℓ_i⟩ = Σ_t ⟨V_E[id_t], b_t⟩`. A module called several times (or one weight seen through two modules, as
with tied embeddings) contributes one such sum per call. The output gradients `b` of a whole batch come from ONE
backward of `Σ_i ℓ_i`: examples are independent rows, so row `i` of `∂(Σ_j ℓ_j)/∂y` is `∂ℓ_i/∂y`. No per-example
gradient is ever built, and autograd is asked for the module outputs only, so no weight-gradient matmul runs
either: scoring a batch costs about one training forward+backward (see docs/benchmarks.md).

Entry points:

- `tracked_modules`, `tracked_parameters`, `resolve_tracking`: what the ghost path can see.
- `alignment_gradient`, `precondition`, `compute_query`: `∇J` (all-reduced under `torch.distributed`) and `v`.
- `score_negatives_batch`, `score_dataset`, `brute_force_scores`: scores of negatives.
- `GhostDotProduct`: attach to a model to get per-row `⟨v, ∇_row L⟩` from any ordinary `loss.backward()`.
- `make_unlearning_loss_fn`: the per-example unlearning loss `loss_fn(model, batch) -> (B,)`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .losses import LOSS_TYPES, unlearning_loss
from .modeling import batch_size_of, eval_mode, model_device, move_batch, sequence_logps, slice_batch
from .objectives import as_objective

logger = logging.getLogger(__name__)

PRECONDITIONERS = ("identity", "adam", "fisher")
DEFAULT_BETAS = {"npo": 0.1, "simnpo": 4.5}

LossFn = Callable[[nn.Module, dict], torch.Tensor]
# Optional bool `(P,)` entry of a pair batch: rows that a rank runs only so that every rank runs the same forwards
# (ZeRO-3 and FSDP2 gather the parameters in collectives inside each forward); their losses are dropped.
PADDING = "padding"
ParamVector = dict  # dict[nn.Parameter, torch.Tensor], keyed by parameter identity


# ----------------------------------------------------------------------------------------------------------------
# Which parameters the ghost path can see
# ----------------------------------------------------------------------------------------------------------------


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


def _reshard_fsdp2(model: nn.Module) -> None:
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
    for module in unwrap_model(model).modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def resolve_tracking(model: nn.Module) -> Tracking:
    """Split the trainable parameters of `model` into covered (scored by ghost dot products) and excluded.

    A parameter is covered when every module that owns it is tracked: a weight tied between the input embedding
    and `lm_head` is owned by both, and covered because both are tracked (their contributions add). Under FSDP2 the
    parameters are the sharded DTensors (`_reshard_fsdp2`).
    """
    model = unwrap_model(model)
    _reshard_fsdp2(model)
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


def _describe(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def tracked_parameters(model: nn.Module, warn: bool = True) -> list[nn.Parameter]:
    """The trainable parameters that `v` and the scores are computed over.

    Normally the covered parameters (`resolve_tracking`); trainable parameters outside them are excluded from `v`
    and from every score, with ONE warning naming them and their share. If no trainable parameter is covered,
    all trainable parameters are returned and scoring falls back to the (slow) brute-force path, with a warning.
    """
    tracking = resolve_tracking(model)
    if not tracking.params:
        trainable = _unique([p for p in unwrap_model(model).parameters() if p.requires_grad])
        if not trainable:
            raise ValueError("The model has no trainable parameter (nothing requires grad): there is nothing to score.")
        if warn:
            warnings.warn(
                "No trainable parameter sits in a module the ghost scorer can hook (nn.Linear / nn.Embedding); "
                "influence scores fall back to per-example gradients (brute force, much slower): "
                f"{_describe(tracking.excluded)}.",
                stacklevel=2,
            )
        return trainable
    if tracking.excluded and warn:
        warnings.warn(
            f"{len(tracking.excluded)} trainable parameter tensor(s) ({100 * tracking.excluded_share:.2f}% of the "
            "trainable parameters) are not inside a module the ghost scorer can hook and are excluded from the "
            f"alignment gradient and from the influence scores: {_describe(tracking.excluded)}.",
            stacklevel=2,
        )
    return tracking.params


def _unique(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scoring mode: eval, no gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------


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
            f"wrong: {_describe(repacked)}. Keep 4-bit layers in training mode on CPU (trl_u2a.modeling.eval_mode).",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------------------
# Ghost dot products
# ----------------------------------------------------------------------------------------------------------------


class GhostDotProduct:
    """Per-row `⟨v, ∇_row L⟩` of whatever loss `L` is backpropagated through the model while attached.

    Forward hooks on the tracked modules keep, for each call, what the backward contraction needs; a tensor hook on
    the call's output (`output.register_hook`) receives `b = ∂L/∂output` during any ordinary `loss.backward()` (or
    `torch.autograd.grad`) and adds `Σ_t b_tᵀ V a_t (+ b_t·v_bias)` to a `(B,)` fp32 accumulator. Retrieve it with
    `scores()` after the backward. Backpropagating `Σ_i c_i ℓ_i` records `c_i · s_i` for row `i`, so a trainer gets
    its examples' scores (scaled by their loss weights) from the training backward itself.

    What each call keeps (the smaller side, fp32 accumulation): a linear with fewer outputs than inputs (e.g.
    `lora_A`: d → r) stores `p = a Vᵀ`, `(B, T, out)`, computed in the forward hook, and drops its input; otherwise
    (e.g. `lora_B`: r → d) it keeps the input `a`, `(B, T, in)`, an alias of what autograd saves anyway (under
    gradient checkpointing it is held until the backward: small for LoRA, one input per linear in full fine-tuning).
    An embedding keeps its `(B, T)` ids. The stored state lives in the closure of the call's own tensor hook, so it
    is freed as soon as that hook fires and it pairs correctly under gradient checkpointing: with reentrant
    checkpointing the no-grad first pass records nothing and the recomputation records what the inner backward
    uses; with non-reentrant checkpointing the recomputed outputs never receive a gradient, so their state is dropped.

    Rows are the leading dimension of the module inputs: a loss must run each forward with one row per example.
    Calls with different batch sizes in one recording raise. Scores accumulate over backwards until `scores()`
    (with `reset=True`, the default) or `reset()` is called.

    Args:
        model: the model (DDP and other wrappers are unwrapped; hooks go on the inner modules).
        v: `dict[param -> tensor]`, the query vector; every key must be a covered parameter (`resolve_tracking`).
        active: record from the start; toggle with `active`, `recording()` or `paused()` (e.g. record only the
            forward of the negatives, not that of the retain examples).
    """

    def __init__(self, model: nn.Module, v: ParamVector, active: bool = True):
        self.model = unwrap_model(model)
        tracking = resolve_tracking(self.model)
        if not tracking.covers(v):
            unknown = [p for p in v if id(p) not in {id(q) for q in tracking.params}]
            raise ValueError(
                f"v holds {len(unknown)} parameter(s) that the ghost scorer cannot see (not trainable, or used "
                "outside nn.Linear/nn.Embedding calls); build v over `tracked_parameters(model)` or score with "
                "`brute_force_scores`."
            )
        self.active = active
        self._scores: torch.Tensor | None = None
        self._handles = []
        self._edges: list | None = None
        self._attach(tracking, v)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def _attach(self, tracking: Tracking, v: ParamVector) -> None:
        for _, module in tracking.modules:
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            vw = v.get(weight) if weight is not None else None
            vb = v.get(bias) if bias is not None else None
            if vw is None and vb is None:
                continue
            # The query lives in fp32 on the parameter's device: accumulation is fp32 even for bf16 models.
            vw = vw.detach().to(device=weight.device, dtype=torch.float32) if vw is not None else None
            vb = vb.detach().to(device=bias.device, dtype=torch.float32) if vb is not None else None
            if isinstance(module, nn.Embedding):
                hook = partial(self._embedding_hook, vw=vw)
            else:
                hook = partial(self._linear_hook, vw=vw, vb=vb)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook (recorded scores stay readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextmanager
    def recording(self):
        """Record only inside this block."""
        previous, self.active = self.active, True
        try:
            yield self
        finally:
            self.active = previous

    @contextmanager
    def paused(self):
        """Do not record inside this block."""
        previous, self.active = self.active, False
        try:
            yield self
        finally:
            self.active = previous

    def reset(self) -> None:
        self._scores = None

    def scores(self, batch_size: int | None = None, reset: bool = True) -> torch.Tensor:
        """The recorded `(B,)` fp32 scores. Zeros of `batch_size` if nothing reached a tracked module."""
        scores = self._scores
        if scores is None:
            if batch_size is None:
                raise RuntimeError("No score was recorded; pass batch_size to get zeros.")
            scores = torch.zeros(batch_size, dtype=torch.float32)
        elif batch_size is not None and scores.shape[0] != batch_size:
            raise RuntimeError(f"Recorded scores for {scores.shape[0]} rows, expected {batch_size}.")
        if reset:
            self._scores = None
        return scores

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _add(self, contribution: torch.Tensor) -> None:
        if self._scores is None:
            self._scores = contribution.detach().to(torch.float32).clone()
            return
        if self._scores.shape != contribution.shape:
            raise RuntimeError(
                f"A tracked module saw {contribution.shape[0]} rows but earlier ones saw {self._scores.shape[0]}: "
                "rows must be examples, with the same batch size for every forward of a recording."
            )
        self._scores += contribution.to(self._scores.device, torch.float32)

    def _should_record(self, output) -> bool:
        return self.active and torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad

    def _register(self, output: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        def tensor_hook(grad):
            fn(grad)
            # returning None leaves the gradient unchanged

        output.register_hook(tensor_hook)
        if self._edges is not None:
            self._edges.append(torch.autograd.graph.get_gradient_edge(output))

    def _linear_hook(self, module, args, kwargs, output, vw, vb):
        if not self._should_record(output):
            return
        a = (args[0] if args else kwargs["input"]).detach()
        if vw is None:
            a = p = None  # bias only: the output gradient suffices
        elif vw.shape[0] < vw.shape[1]:
            # Fewer outputs than inputs (lora_A): precompute p = a Vᵀ, (B, T, out); the input is not kept.
            with torch.no_grad():
                p = a.to(torch.float32) @ vw.T
            a = None
        else:
            p = None

        def contribution(grad):
            g = grad.to(torch.float32)
            g = g.reshape(g.shape[0], -1, g.shape[-1])  # (B, T, out); T = 1 for 2-D inputs
            total = None
            if vw is not None:
                if p is not None:
                    total = (g * p.reshape(g.shape)).sum((1, 2))
                else:
                    x = a.reshape(g.shape[0], -1, a.shape[-1]).to(torch.float32)  # (B, T, in)
                    total = ((g @ vw) * x).sum((1, 2))
            if vb is not None:
                bias_term = g.sum(1) @ vb
                total = bias_term if total is None else total + bias_term
            self._add(total)

        self._register(output, contribution)

    def _embedding_hook(self, module, args, kwargs, output, vw):
        if not self._should_record(output):
            return
        ids = (args[0] if args else kwargs["input"]).detach()
        padding_idx = module.padding_idx

        def contribution(grad):
            g = grad.to(torch.float32)
            terms = (F.embedding(ids, vw) * g).sum(-1)  # (B, T): ⟨V[id_t], b_t⟩
            if padding_idx is not None:  # nn.Embedding never sends gradient to the padding row
                terms = terms.masked_fill(ids == padding_idx, 0.0)
            self._add(terms.reshape(terms.shape[0], -1).sum(1))

        self._register(output, contribution)


# ----------------------------------------------------------------------------------------------------------------
# Unlearning loss of the negatives
# ----------------------------------------------------------------------------------------------------------------


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
    beta = DEFAULT_BETAS.get(loss_type, 0.1) if beta is None else beta

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref = batch.get("ref_logps")
        if ref is not None:
            ref = ref.to(logps)
        return unlearning_loss(loss_type, logps, lengths, ref, beta=beta, gamma=gamma, ga_reduction=ga_reduction)

    loss_fn.loss_type = loss_type
    return loss_fn


def _checked_losses(losses: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    if not torch.is_tensor(losses) or losses.shape != (batch_size,):
        shape = tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
        raise ValueError(f"{what} must return one loss per example, shape ({batch_size},); got {shape}.")
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------


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
    with torch.enable_grad():
        ghost._edges = []
        try:
            losses = _checked_losses(loss_fn(base, batch), batch_size, "loss_fn")
            if ghost._edges:
                # Ask autograd for the module outputs only: the tensor hooks see every `b` and no weight gradient is
                # ever computed. GradientEdges, not the output tensors, so that outputs no backward needs (lora_B's)
                # are not kept alive through the forward.
                torch.autograd.grad(losses.sum(), ghost._edges, allow_unused=True)
        finally:
            ghost._edges = None
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
    with scoring_mode(base), torch.enable_grad(), _ForwardParameters(base, params) as forward:
        for i in range(batch_size):
            loss = _checked_losses(loss_fn(base, slice_batch(batch, i)), 1, "loss_fn")
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
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def score_dataset(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: LossFn,
    v: ParamVector,
    desc: str = "U2A scoring",
    method: str = "auto",
    disable_progress: bool = False,
) -> torch.Tensor:
    """Scores of many batches of negatives, concatenated: `(N,)` float32, in batch order.

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
    total = len(batches) if hasattr(batches, "__len__") else None
    progress = tqdm(batches, desc=desc, total=total, disable=disable_progress or _progress_disabled(), unit="batch")
    device = model_device(base)
    out = []
    if covered and method != "brute_force":
        # One scoring mode and one set of hooks for all batches; batches move to the device one at a time
        with scoring_mode(base), GhostDotProduct(base, v) as ghost:
            for batch in progress:
                out.append(_ghost_batch(base, ghost, move_batch(batch, device), loss_fn).detach())
    else:
        for batch in progress:
            out.append(brute_force_scores(base, move_batch(batch, device), loss_fn, v).detach())
    if not out:
        return torch.zeros(0, dtype=torch.float32)
    device = out[0].device
    return torch.cat([s.to(device) for s in out])


# ----------------------------------------------------------------------------------------------------------------
# The query: v = P⁻¹ ∇J
# ----------------------------------------------------------------------------------------------------------------


class AlignmentGradient(dict):
    """`dict[param -> ∇J]` (fp32, shaped like each parameter), with extras as attributes:

    - `objective_value`: `J`, the mean per-pair loss (global under `torch.distributed`);
    - `num_pairs`: the (global) number of pairs;
    - `fisher`: `dict[param -> mean_p (∇ℓ_p)²]`, the diagonal empirical Fisher of the per-pair gradients, or None.
    """

    objective_value: float
    num_pairs: int
    fisher: dict | None = None


def _all_reduce_sum(tensors: list[torch.Tensor], bucket_numel: int = 1 << 24) -> None:
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


def _zeros_full(p: torch.Tensor) -> torch.Tensor:
    """fp32 zeros of `p`'s full shape, a plain tensor. Under ZeRO-3 a parameter outside its forward is an empty shard
    (`p.shape` is `(0,)`) while autograd returns the gradient of the gathered, full-shape tensor: `ds_shape` is that
    shape. Under FSDP2 `p` is a sharded DTensor whose `shape` is already the global one, and the gradient is that of
    the unsharded plain tensor (`_ForwardParameters`)."""
    return torch.zeros(getattr(p, "ds_shape", p.shape), dtype=torch.float32, device=p.device)


class _ForwardParameters:
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
        _reshard_fsdp2(model)  # so that the modules hold `params` (sharded) whatever ran before
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
    pair_batches = list(pair_batches)
    distributed = dist.is_available() and dist.is_initialized()
    if not pair_batches and not distributed:
        raise ValueError("alignment_gradient got no pair batches: the alignment set is empty.")
    base = unwrap_model(model)
    params = _unique(tracked_parameters(base) if params is None else params)
    if not params:
        raise ValueError("alignment_gradient got no parameters to differentiate.")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(f"{len(frozen)} of the given parameters do not require grad.")

    device = params[0].device
    grad_sum = [_zeros_full(p) for p in params]
    sq_sum = [_zeros_full(p) for p in params] if return_fisher else []
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

    with scoring_mode(base), torch.enable_grad(), _ForwardParameters(base, params) as forward:
        for batch in pair_batches:
            if return_fisher:
                # The empirical Fisher needs each pair's own gradient: one pair at a time.
                for i in range(batch_size_of(batch)):
                    accumulate(_pair_losses(objective, base, slice_batch(batch, i)), True)
            else:
                accumulate(_pair_losses(objective, base, batch), False)

    if distributed:
        # Same tensors, same order on every rank: never skipped, whatever the local data.
        _all_reduce_sum(grad_sum + sq_sum + [totals])
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
    params = _unique(tracked_parameters(base, warn=False) if params is None else params)
    squares = [_zeros_full(p) for p in params]
    with scoring_mode(base), torch.enable_grad(), _ForwardParameters(base, params) as forward:
        for batch in batches:
            losses = _checked_losses(loss_fn(base, batch), batch_size_of(batch), "loss_fn")
            padding = batch.get(PADDING)
            if padding is not None:
                losses = losses[~padding.to(losses.device)]
            grads = torch.autograd.grad(losses.sum(), forward.used, allow_unused=True)
            grads = [_zeros_full(p) if g is None else g.to(torch.float32) for p, g in zip(params, grads)]
            count = torch.tensor([float(losses.shape[0])], dtype=torch.float32, device=grads[0].device)
            if distributed:
                _all_reduce_sum([*grads, count])
            for square, g in zip(squares, grads):
                square += (g / count.clamp(min=1)) ** 2
    return {p: square / len(batches) for p, square in zip(params, squares)}


_ADAM_FALLBACK_LOGGED = False


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
    global _ADAM_FALLBACK_LOGGED
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
            # Every refresh before the first step would repeat it: warn once per process, then log at INFO.
            logger.log(logging.INFO if _ADAM_FALLBACK_LOGGED else logging.WARNING, message)
            _ADAM_FALLBACK_LOGGED = True
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


def _second_moment_key(group: dict, state: dict) -> str:
    return "max_exp_avg_sq" if group.get("amsgrad", False) and "max_exp_avg_sq" in state else "exp_avg_sq"


def _adam_denominators(grads: ParamVector, optimizer, damping: float) -> dict | None:
    zero = _deepspeed_zero_optimizer(optimizer)
    if zero is not None:
        return _deepspeed_adam_denominators(grads, zero, damping)
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
        exp_avg_sq = state.get(_second_moment_key(group, state))
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


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO: Adam's state in flat fp32 partitions
# ----------------------------------------------------------------------------------------------------------------


def _deepspeed_zero_optimizer(optimizer):
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
    key = _second_moment_key(group, state)
    if step is None or float(step) <= 0 or key not in state:
        return None
    return key, float(step), group


def _deepspeed_adam_denominators(grads: ParamVector, zero, damping: float) -> dict | None:
    """`_adam_denominators` under DeepSpeed ZeRO-1/2/3, from the second moments gathered to full shape in fp32.

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

    denoms = {}
    for (p, g), (key, step, group) in zip(grads.items(), steps):
        exp_avg_sq = safe_get_full_optimizer_state(p, key)
        if exp_avg_sq is None:  # the same on every rank: whether `p` is a ZeRO parameter that requires grad
            return None
        denoms[p] = _adam_denominator(exp_avg_sq.to(g.device).reshape(g.shape), step, group, damping)
    return denoms


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
