"""`GhostDotProduct`: per-row `⟨v, ∇_row L⟩` from one ordinary backward, without per-example gradients.

For a linear module `y_t = W a_t + c` applied at positions `t` of example `i`, `∇_W ℓ_i = Σ_t b_t a_tᵀ` and
`∇_c ℓ_i = Σ_t b_t` with `b_t = ∂ℓ_i/∂y_t`, hence `⟨V_W, ∇_W ℓ_i⟩ + ⟨v_c, ∇_c ℓ_i⟩ = Σ_t b_tᵀ V_W a_t + b_t·v_c`; for
an embedding `y_t = E[id_t]`, `⟨V_E, ∇_E ℓ_i⟩ = Σ_t ⟨V_E[id_t], b_t⟩`. A module called several times (or one weight
seen through two modules, as with tied embeddings) contributes one such sum per call. The output gradients `b` of a
whole batch come from ONE backward of `Σ_i ℓ_i`: examples are independent rows.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .tracking import ParamVector, Tracking, resolve_tracking, unwrap_model


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

    @contextmanager
    def output_edges(self):
        """Collect the gradient edges of the hooked module outputs of the forwards run inside this block, and yield
        that list: `torch.autograd.grad(loss, edges)` then reaches every tensor hook without computing any weight
        gradient. Edges, not the output tensors, so that outputs no backward needs (lora_B's) are not kept alive."""
        self._edges = []
        try:
            yield self._edges
        finally:
            self._edges = None

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
