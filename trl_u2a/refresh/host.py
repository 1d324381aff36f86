"""`RefreshHost`: what the refresh controller needs from the training loop, and nothing more.

The controller (`refresh.controller`) imports no trainer library; `refresh.callback` implements this interface over
a `U2ATrainer`. Another training loop can drive U2A's refresh by implementing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from ..core.weighting import WeightState
from .sharding import Sharding


class RefreshHost(Protocol):
    """The training loop as a refresh sees it.

    Attributes:
        args: the run's `U2AConfig` (read only).
        sharding: this rank, the world, and the collectives (`Sharding`).
        budget: how many negatives a refresh selects.
        weight_state: the current weights of the negatives (`WeightState`, `(N,)`).
        negative_names: the training data's `id` of each negative, or None.
        num_retain: how many retain rows the training data has.
        optimizer: the optimizer (Adam's state for the `adam` preconditioner), None before it exists.
        is_sharded: parameters are sharded (DeepSpeed, FSDP): no CPU snapshot of them is taken.
    """

    args: Any
    sharding: Sharding
    budget: int
    weight_state: WeightState
    negative_names: list[str] | None
    num_retain: int
    optimizer: torch.optim.Optimizer | None
    is_sharded: bool

    def policy(self) -> nn.Module:
        """The model being trained, unwrapped from DDP/DeepSpeed/FSDP wrappers."""
        ...

    def set_weights(self, state: WeightState) -> None:
        """Install new weights: the loss and sampler use them from the next batch."""
        ...

    def negative_batches(self, ids: list[int], batch_size: int, device: torch.device) -> Iterable[dict]:
        """Negatives `ids` collated as training batches of `batch_size` rows, moved to `device`. Iterated once, in
        order; a generator that builds each batch when asked keeps a pass over N negatives at one batch of memory."""
        ...

    def retain_batches(self, positions: list[int], batch_size: int, device: torch.device) -> Iterable[dict]:
        """Retain rows (by position among the retain rows) collated as training batches, moved to `device`; iterated
        once, in order, like `negative_batches`."""
        ...

    def reference(self) -> tuple[nn.Module | None, Callable[[], AbstractContextManager] | None]:
        """The start model `π_0` for the pairs' reference log-probs: a separate reference model (or None: the policy)
        and a context that turns the policy into it (a PEFT adapter switched off), or None."""
        ...

    def learning_rate(self) -> float:
        """The learning rate of the step just taken."""
        ...

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log one refresh's metrics at the current step, unaveraged."""
        ...
