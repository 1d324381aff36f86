"""The refresh's brakes: stop when `J` stops improving or the retain NLL rises (gradient-ascent collapse), and restore
the last parameters that passed the collapse guard."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .record import RefreshRecord

SNAPSHOT_MAX_NUMEL = 200_000_000  # 0.8 GB in fp32: adapters, not full models


class StopRule:
    """`patience`: stop after that many refreshes without a new best `J` (0: never). `retain_nll_tolerance`: stop
    when the retain NLL rises more than that above its first value (None: never); such a record is `collapsed`."""

    def __init__(self, patience: int, retain_nll_tolerance: float | None):
        self.patience = patience
        self.retain_nll_tolerance = retain_nll_tolerance
        self.best_objective = math.inf
        self.refreshes_without_improvement = 0
        self.retain_nll_start: float | None = None

    def check(self, record: RefreshRecord) -> str | None:
        """Update with a refresh's record; the reason to stop, or None. Marks `record["collapsed"]` on a collapse."""
        objective = record["objective"]
        if objective < self.best_objective - 1e-12:
            self.best_objective = objective
            self.refreshes_without_improvement = 0
        else:
            self.refreshes_without_improvement += 1
        retain_nll = record.get("retain_nll")
        if retain_nll is not None and self.retain_nll_start is None:
            self.retain_nll_start = retain_nll
        if self.patience and self.refreshes_without_improvement >= self.patience:
            return (
                f"the alignment objective J has not improved for {self.patience} refreshes "
                f"(best {self.best_objective:.4f}, now {objective:.4f})"
            )
        tolerance = self.retain_nll_tolerance
        if tolerance is not None and retain_nll is not None and retain_nll > self.retain_nll_start + tolerance:
            record["collapsed"] = True
            return (
                f"the retain NLL rose to {retain_nll:.4f}, more than retain_nll_tolerance={tolerance} above its first "
                f"value {self.retain_nll_start:.4f} (gradient-ascent collapse guard)"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_objective": self.best_objective,
            "refreshes_without_improvement": self.refreshes_without_improvement,
            "retain_nll_start": self.retain_nll_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_objective = state["best_objective"]
        self.refreshes_without_improvement = state["refreshes_without_improvement"]
        self.retain_nll_start = state["retain_nll_start"]


class CollapseGuard:
    """A CPU copy of the trainable parameters of the last refresh that passed the collapse guard, restored when a
    later refresh finds the model collapsed. Only for small trainable sets (adapters) of unsharded parameters
    (`enabled` is False under DeepSpeed or FSDP, or without `retain_nll_tolerance`)."""

    def __init__(self, enabled: bool, say: Callable[[int, str], None]):
        self.enabled = enabled
        self.say = say  # `say(level, message)`: logs once for all ranks
        self._good: tuple[int, dict[str, torch.Tensor]] | None = None

    def snapshot(self, model: nn.Module, step: int) -> None:
        self._good = None
        if not self.enabled:
            return
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if sum(p.numel() for p in params.values()) > SNAPSHOT_MAX_NUMEL:
            return
        self._good = (step, {n: p.detach().to("cpu", copy=True) for n, p in params.items()})

    def restore(self, model: nn.Module) -> int | None:
        """Copy the snapshot back into `model`; the step it was taken at, or None when there is none (a warning says
        what to do)."""
        if self._good is None:
            self.say(
                logging.WARNING,
                "The collapsed model is not restored: no snapshot of the trainable parameters was kept (sharded "
                f"parameters, or more than {SNAPSHOT_MAX_NUMEL} of them); use the last checkpoint before the collapse.",
            )
            return None
        step, saved = self._good
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name].to(p.device))
        self.say(
            logging.WARNING,
            f"Restored the trainable parameters of step {step}, the last refresh that passed the collapse guard.",
        )
        return step
