"""`U2ARefreshCallback`: the `TrainerCallback` that drives the refresh controller inside a `U2ATrainer`, and
`TrainerHost`, the controller's view of that trainer. The only refresh module that knows about transformers or TRL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from accelerate.logging import get_logger
from torch import nn
from transformers import TrainerCallback
from trl.trainer.utils import use_adapter

from .. import data as u2a_data
from ..core.modeling import move_batch
from ..core.objectives import AlignmentObjective, DPOObjective, as_objective
from ..core.weighting import WeightState
from .controller import RefreshController
from .record import RefreshRecord
from .sharding import Sharding

if TYPE_CHECKING:
    from ..trainer import U2ATrainer

logger = get_logger(__name__)


class TrainerHost:
    """`RefreshHost` over a `U2ATrainer`: its model, optimizer, weights, training rows and logging."""

    def __init__(self, trainer: U2ATrainer):
        self.trainer = trainer
        self.args = trainer.args
        self.sharding = Sharding(trainer.accelerator)

    budget = property(lambda self: self.trainer.budget)
    weight_state = property(lambda self: self.trainer.weight_state)
    negative_names = property(lambda self: self.trainer.negative_names)
    num_retain = property(lambda self: len(self.trainer.retain_rows))
    optimizer = property(lambda self: self.trainer.optimizer)
    is_sharded = property(lambda self: self.trainer.is_deepspeed_enabled or self.trainer.is_fsdp_enabled)

    def policy(self) -> nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def set_weights(self, state: WeightState) -> None:
        self.trainer.set_weights(state)

    def negative_batches(self, ids: list[int], batch_size: int, device: torch.device) -> Iterator[dict]:
        return self._collated(self.trainer.negative_rows[ids], batch_size, device)

    def retain_batches(self, positions: list[int], batch_size: int, device: torch.device) -> Iterator[dict]:
        return self._collated(self.trainer.retain_rows[positions], batch_size, device)

    def _collated(self, rows: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[dict]:
        """Training rows `rows` in batches of `batch_size`, each collated and moved to `device` when it is asked for
        (one column read per batch): a pass over N rows holds one batch, not N rows of batches."""
        dataset, collator = self.trainer.train_dataset, self.trainer.data_collator
        for start in range(0, len(rows), batch_size):
            columns = dataset[rows[start : start + batch_size].tolist()]
            examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
            yield move_batch(collator(examples), device)

    def reference(self) -> tuple[nn.Module | None, Callable[[], AbstractContextManager] | None]:
        """The trainer's `ref_model`; under PEFT, TRL's frozen "ref" copy of a pretrained adapter or else the base model
        (adapter disabled); otherwise the policy itself."""
        if self.trainer.ref_model is not None:
            return self.trainer.ref_model, None
        model = self.policy()
        if hasattr(model, "peft_config"):
            # TRL keeps a frozen copy of a pretrained adapter as "ref"; a fresh adapter's start model is the base
            adapter = "ref" if "ref" in model.peft_config else None
            return None, partial(_reference_adapter, model, adapter)
        return None, None

    def learning_rate(self) -> float:
        return self.trainer._get_learning_rate()

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.trainer.log_refresh(metrics)


class U2ARefreshCallback(TrainerCallback):
    """Runs U2A's refresh inside a `U2ATrainer`; installed by the trainer when it gets an `alignment_dataset`.

    Args:
        trainer: the `U2ATrainer` (a callback is not given the trainer by transformers, and the refresh needs its
            model, optimizer, datasets and accelerator).
        alignment_dataset: preference pairs (`prompt, chosen, rejected`, standard or conversational).
        objective: a custom alignment objective (`trl_u2a.core.objectives`); default the DPO loss with
            `args.beta_pa`.
    """

    def __init__(self, trainer: U2ATrainer, alignment_dataset, objective: AlignmentObjective | None = None):
        args = trainer.args
        tokenizer = trainer.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        pairs = u2a_data.tokenize_pairs(
            alignment_dataset, tokenizer, args.max_length, "alignment_dataset", num_proc=args.dataset_num_proc
        )
        world = trainer.accelerator.num_processes
        # In-training scores read each row's share of the training backward, which these make impossible:
        head = trainer.model.get_output_embeddings()
        reason = None
        if head is not None and head.weight.requires_grad:
            # TRL's fused LM head reads `lm_head.weight` without calling the module: the hooks miss the head's share
            reason = "the output embedding is trainable and TRL's fused LM head bypasses its module"
        elif trainer.aux_loss_enabled:
            # The load-balancing loss is a batch term: its gradient would enter every row's share
            reason = "the MoE router's load-balancing loss is in the training backward"
        in_training = args.in_training_scores and reason is None
        if args.in_training_scores and reason is not None:
            logger.info(
                f"in_training_scores is off: {reason}, so trained negatives are rescored at each refresh instead.",
                main_process_only=True,
            )
        self.controller = RefreshController(
            TrainerHost(trainer),
            pairs,
            u2a_data.PairCollator(tokenizer.pad_token_id, args.max_length),
            as_objective(objective) if objective is not None else DPOObjective(args.beta_pa),
            in_training=in_training,
            rows_per_step=args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        )

    @property
    def history(self) -> list[RefreshRecord]:
        """Every refresh's record, in order (and a final one with `final: True` after training)."""
        return self.controller.history

    def refresh(self, state, control) -> RefreshRecord:
        """Run one refresh now (outside the schedule)."""
        record = self.controller.refresh(state.global_step)
        self._stop_if_asked(record, control)
        return record

    def on_train_begin(self, args, state, control, **kwargs):
        self._stop_if_asked(self.controller.begin(state.global_step, state.max_steps), control)

    def on_step_end(self, args, state, control, **kwargs):
        self._stop_if_asked(self.controller.step_end(state.global_step, control.should_training_stop), control)

    def on_train_end(self, args, state, control, **kwargs):
        self.controller.end(state.global_step)
        if self.controller.host.sharding.is_main_process and self.history and args.save_refresh_plots:
            from ..plots import plot_refreshes

            plot_refreshes(self.history, f"{args.output_dir}/u2a_plots")

    @staticmethod
    def _stop_if_asked(record: RefreshRecord | None, control) -> None:
        if record is not None and record.get("stopped"):
            control.should_training_stop = True

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


@contextmanager
def _reference_adapter(model: nn.Module, adapter: str | None):
    """TRL's `use_adapter` (the "ref" adapter, or none), with every parameter's `requires_grad` kept as it was.

    PEFT's adapter switch also sets `requires_grad` (False on a disabled adapter, True on the one switched to). The
    reference pass may be the first forward of an FSDP2 model, where FSDP2 fixes each group's gradient dtypes from the
    parameters that require grad at that moment: with the adapter frozen it finds none, and the first training
    backward then fails to reduce the bf16 gradients into the fp32 adapter ("attempting to assign a gradient with
    dtype BFloat16 to a tensor with grad_dtype Float"). The pass runs under `no_grad`, so the flags change nothing
    in it.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with use_adapter(model, adapter_name=adapter):
            for p, flag in flags:
                p.requires_grad_(flag)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
