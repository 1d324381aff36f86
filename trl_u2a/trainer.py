"""`U2ATrainer`: weighted per-example unlearning of negatives, as a `trl.KTOTrainer` subclass.

Why KTO as parent: its unpaired format (`prompt, completion, label`) is the U2A data model, and it already handles model
loading, PEFT/QLoRA, the reference model (disabled adapter under PEFT, DeepSpeed/FSDP-wrapped otherwise), the fused LM
head and cached per-row reference log-probs (NPO's `log π_0`). The maths lives in `core/` and `influence/`, the
refresh in `refresh/` (its controller imports neither TRL nor transformers); TRL's internals are touched here, in
`config.py`, `model_card.py`, `data.py` (TRL's prompt helpers) and `refresh/callback.py`.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from accelerate.logging import get_logger
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    DataCollator,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
)
from trl import KTOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from . import data as u2a_data
from .checks import check_causal_lm, check_model_source, check_not_a_file, check_output_dir
from .config import U2AConfig
from .core.losses import (
    completion_logps,
    kl_to_reference,
    nll_loss,
    unlearning_loss,
    weight_coefficients,
    weighted_mean,
)
from .core.modeling import GrowingTensor
from .core.modeling import _is_bnb_4bit as is_bnb_4bit
from .core.objectives import AlignmentObjective
from .core.sampler import WeightedNegativeSampler
from .core.weighting import WeightState, weight_entropy
from .distributed import apply_ddp_timeout, check_process_count
from .doc_links import docs_page
from .model_card import write_model_card
from .refresh.sharding import Sharding
from .safe_state import (
    STATE_JSON,
    TRAINER_STATE,
    checkpoint_problem,
    last_complete_checkpoint,
    load_checkpoint_state,
    save_state,
)

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig

logger = get_logger(__name__)


@contextlib.contextmanager
def _as_kto_args(args: U2AConfig, precompute_ref_log_probs: bool):
    """Present `args` to `KTOTrainer.__init__` as a KTO config with no KL term.

    KTO reads `args.loss_type` to decide whether to estimate its KL term (which would force sequential sampling, batch
    size > 1 and extra forwards); U2A's `loss_type` names an unlearning loss, so KTO sees `"apo_zero_unpaired"`, the
    one KTO loss without that term, during its constructor only. `precompute_ref_log_probs` decides whether KTO keeps a
    reference model in memory.
    """
    saved = (args.loss_type, args.precompute_ref_log_probs)
    args.loss_type, args.precompute_ref_log_probs = "apo_zero_unpaired", precompute_ref_log_probs
    try:
        yield
    finally:
        args.loss_type, args.precompute_ref_log_probs = saved


@contextlib.contextmanager
def _no_model_hash():
    """KTO names its reference log-prob cache by a SHA-256 of every parameter (the whole model copied to the CPU
    first) whenever it keeps no reference model; U2A computes its own reference log-probs in memory and never reads
    that hash, so it is not computed."""
    from trl.trainer import kto_trainer

    saved = kto_trainer.hash_module
    kto_trainer.hash_module = lambda module: None
    try:
        yield
    finally:
        kto_trainer.hash_module = saved


@contextlib.contextmanager
def _no_reference_copy(trainer):
    """Under FSDP without PEFT, KTO loads a second copy of the model as its reference whatever
    `precompute_ref_log_probs` says, and frees it after its own precompute. U2A computes NPO's reference log-probs
    itself (from the policy, before any step) and otherwise needs no reference, so that copy is not loaded: inside,
    KTO's loader returns None for any load after `Trainer.__init__` (the policy itself is loaded before it)."""
    from trl.trainer import kto_trainer

    saved = kto_trainer.create_model_from_path

    def load(model_id, *args, **kwargs):
        if hasattr(trainer, "accelerator"):  # Trainer.__init__ has run: this is the reference copy
            return None
        return saved(model_id, *args, **kwargs)

    kto_trainer.create_model_from_path = load
    try:
        yield
    finally:
        kto_trainer.create_model_from_path = saved


@contextlib.contextmanager
def _dataset_bars(disable: bool):
    """datasets' `map` progress bars off inside (as `disable_tqdm` asks), restored on exit."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if disable:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if disable and was_enabled:
            datasets_logging.enable_progress_bar()


class U2ATrainer(KTOTrainer):
    """Trainer for U2A: weighted per-example unlearning of negative examples, with a periodic bi-level refresh of the
    weights when an alignment set is given.

    Example:

    ```python
    >>> from trl_u2a import U2AConfig, U2ATrainer
    >>> trainer = U2ATrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct",
    ...     args=U2AConfig(output_dir="out", loss_type="npo"),
    ...     train_dataset=negatives,            # prompt/completion/label, prompt/chosen/rejected, or prompt/completion
    ...     alignment_dataset=preference_pairs,  # optional: enables selection and reweighting
    ... )
    >>> trainer.train()
    ```

    Args (TRL's order; `alignment_dataset` and `alignment_objective` by keyword):
        model: a model id or path, a `PreTrainedModel`, or a `PeftModel` (as for `trl.KTOTrainer`).
        ref_model: optional reference model; by default the start model (the disabled adapter under PEFT). Only
            `loss_type="npo"` (through cached reference log-probs) and `retain_loss="kl"` use it.
        args: a `U2AConfig`.
        data_collator: not supported (the trainer collates its own rows); a clear error when given.
        train_dataset: negatives (and optional retain rows) in one of the formats of `trl_u2a.data`.
        eval_dataset: optional evaluation rows in a training format; the loss on them is unweighted.
        processing_class: the tokenizer; loaded from the model when omitted.
        compute_metrics: not supported (see `trl-u2a evaluate`); a clear error when given.
        callbacks: extra `TrainerCallback`s.
        optimizers: `(optimizer, scheduler)`, as for `transformers.Trainer`.
        quantization_config: a `BitsAndBytesConfig` for QLoRA, when `model` is a path or hub id.
        peft_config: a `peft.PeftConfig` (e.g. `LoraConfig`) to train an adapter.
        alignment_dataset: held-out preference pairs that define the alignment objective `J`. Without it the trainer
            runs plain weighted unlearning with the initial weights.
        alignment_objective: a custom objective (see `trl_u2a.core.objectives`) instead of the DPO loss on the pairs.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "u2a", "unlearning"]
    _name = "U2A"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Bridging the Gap Between Preference Alignment and Machine Unlearning",
        "id": "2504.06659",
        "citation": textwrap.dedent("""\
            @article{feng2025u2a,
                title        = {{Bridging the Gap Between Preference Alignment and Machine Unlearning}},
                author       = {Xiaohua Feng and Yuyuan Li and Huwei Ji and Jiaming Zhang and Li Zhang and
                                Tianyu Du and Chaochao Chen},
                year         = 2025,
                eprint       = {arXiv:2504.06659}
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        ref_model: PreTrainedModel | None = None,
        args: U2AConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
        *,
        alignment_dataset: Dataset | None = None,
        alignment_objective: AlignmentObjective | None = None,
    ):
        # TRL's positional order, so that a KTOTrainer/DPOTrainer call site ports as is; U2A's own inputs by keyword.
        # The steps run in this order; each says what the next ones need from it.
        args = self._u2a_arguments(model, args, data_collator, compute_metrics)
        train_dataset, alignment_dataset = self._checked_inputs(args, train_dataset, alignment_dataset)
        self._build_kto_trainer(
            args,
            model=model,
            ref_model=ref_model,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._add_reference_logps(args)
        self._install_weights(args)
        self._install_refresh(args, alignment_dataset, alignment_objective)

    def _u2a_arguments(self, model, args, data_collator, compute_metrics) -> U2AConfig:
        """Step 1: refuse what U2A does not take and return the `U2AConfig` (a default one named after the model).
        First, because every later step reads the arguments, and a refusal should cost nothing."""
        if data_collator is not None:
            raise ValueError(
                "U2ATrainer does not take a data_collator: it tokenizes and collates its rows itself (completion "
                "masks, negative ids and cached reference log-probs travel in the batch). Pass the data as a dataset "
                f"in one of the formats of {docs_page('usage', 'data')} instead."
            )
        if compute_metrics is not None:
            raise ValueError(
                "U2ATrainer does not take compute_metrics: its evaluation logs the unlearning loss and log-probs of "
                "eval_dataset. For harmful rate, J, preference accuracy and retain perplexity of a trained model, run "
                f"`trl-u2a evaluate` ({docs_page('usage', 'evaluating-a-model')})."
            )
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = U2AConfig(output_dir=f"{os.path.basename(str(name)) or 'model'}-U2A")
        if not isinstance(args, U2AConfig):
            raise TypeError(f"args must be a U2AConfig, got {type(args).__name__}.")
        apply_ddp_timeout(args)  # before the accelerator that the TRL trainer builds reads it
        check_not_a_file(args.output_dir, "output_dir")
        if isinstance(model, str):
            check_model_source(model)
        check_causal_lm(model)
        return args

    def _checked_inputs(self, args, train_dataset, alignment_dataset) -> tuple[Dataset, Dataset | None]:
        """Step 2: the training rows in the unpaired format (with negative ids) and the checked alignment pairs.
        Before the TRL trainer loads any model: a typo in a column name should cost seconds."""
        if train_dataset is None:
            raise ValueError("train_dataset is required: the negatives to unlearn.")
        with _dataset_bars(args.disable_tqdm):
            train_dataset = u2a_data.to_unpaired(train_dataset, "train_dataset", num_proc=args.dataset_num_proc)
        if alignment_dataset is not None:
            alignment_dataset = u2a_data.check_preference(alignment_dataset, "alignment_dataset")
            mismatch = u2a_data.format_mismatch(train_dataset, alignment_dataset)
            if mismatch is not None:
                logger.warning(mismatch, main_process_only=True)
        return train_dataset, alignment_dataset

    def _build_kto_trainer(self, args, **kto_inputs) -> None:
        """Step 3: `KTOTrainer.__init__` (model, PEFT, reference model, accelerator, tokenized datasets).

        `_collator` exists before it: KTO calls `_prepare_dataset` (ours) from its constructor, which gives the
        collator the tokenizer's pad id. KTO sees `args` as a KTO config without a KL term (`_as_kto_args`) and
        keeps a reference model in memory only for the KL retain term (NPO's reference log-probs are cached by the
        next step, not by KTO: see `_precompute_ref_logps`)."""
        keeps_reference = args.retain_weight > 0 and args.retain_loss == "kl"
        self._collator = u2a_data.UnpairedCollator(
            pad_token_id=None, max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of
        )
        self._kto_constructing = True
        try:
            with (
                _as_kto_args(args, precompute_ref_log_probs=not keeps_reference),
                _no_model_hash(),
                _no_reference_copy(self) if not keeps_reference else contextlib.nullcontext(),
                _dataset_bars(args.disable_tqdm),
            ):
                super().__init__(args=args, data_collator=self._collator, **kto_inputs)
        finally:
            self._kto_constructing = False
        check_process_count(self.accelerator)
        # KTO set these from the config it saw; U2A's loss reads its own
        self.loss_type = args.loss_type
        self.beta = args.beta
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _add_reference_logps(self, args) -> None:
        """Step 4, for NPO: the column `ref_logps = log π_0(y|x)` of the training and evaluation rows. After the TRL
        trainer, which built the model, the reference and the accelerator this pass runs on; before any training
        step, so that without a reference model the policy still is the start model."""
        if args.loss_type == "npo":
            batch_size = args.precompute_ref_batch_size or args.per_device_train_batch_size
            self.train_dataset = self._precompute_ref_logps(self.train_dataset, "train", batch_size)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    k: self._precompute_ref_logps(v, k, batch_size) for k, v in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", batch_size)
        self.precompute_ref_logps = "ref_logps" in self.train_dataset.column_names

    def _install_weights(self, args) -> None:
        """Step 5: the weight state, one weight per negative id (uniform, or the `weight` column), the rows of the
        negatives and retain examples, and the device copy of the weights the loss reads. After the TRL trainer:
        it reads the prepared `train_dataset` and the accelerator's device."""
        negative_ids = torch.tensor(self.train_dataset[u2a_data.NEGATIVE_ID])
        is_negative = negative_ids >= 0
        self.num_negatives = int(is_negative.sum())
        initial = torch.zeros(self.num_negatives, dtype=torch.float64)
        initial[negative_ids[is_negative]] = torch.tensor(self.train_dataset["weight"], dtype=torch.float64)[
            is_negative
        ]
        # Before the refresh controller exists: it would divide by the number of selectable negatives
        if not bool((initial > 0).any()):
            raise ValueError("Every negative has weight 0 in the 'weight' column: there is nothing to unlearn.")
        self.weight_state = WeightState.from_initial(initial)
        self.negative_rows = torch.nonzero(is_negative).flatten()[torch.argsort(negative_ids[is_negative])]
        # The user's `id` column, if any, names the negatives in the trace
        self.negative_names = None
        if "id" in self.train_dataset.column_names:
            user_ids = self.train_dataset["id"]
            self.negative_names = [user_ids[r] for r in self.negative_rows.tolist()]
        self.retain_rows = torch.nonzero(~is_negative).flatten()
        if args.retain_weight > 0 and len(self.retain_rows) == 0:
            raise ValueError(
                f"retain_weight={args.retain_weight} (loss_type={args.loss_type!r}) needs retain examples, but "
                "train_dataset has none: add rows with label=True, or use the preference format (chosen = retain)."
            )
        # On the device: the loss gathers its rows' weights there every micro-step (from a CPU copy that is a
        # host-to-device copy, and a stream sync, per micro-step)
        self._weights = self.weight_state.weights.to(device=self.accelerator.device, dtype=torch.float32)
        self._sampler: WeightedNegativeSampler | None = None
        self._pending_sampler_state: dict | None = None

    def _install_refresh(self, args, alignment_dataset, alignment_objective) -> None:
        """Step 6: the budget (negatives trained per epoch) and, with an alignment set, the refresh callback. Last:
        the callback reads the weight state, the budget and the tokenizer of the steps before."""
        self.alignment_dataset = alignment_dataset
        self.refresh_callback = None
        if alignment_dataset is None:
            # No selection: every negative of positive initial weight is trained
            self.budget = int(self.weight_state.selected.sum())  # > 0: _install_weights refused all-zero weights
            logger.info(
                "No alignment_dataset given: running plain weighted unlearning with the initial weights (no selection "
                "or reweighting). Pass alignment_dataset=<preference pairs> to enable U2A's bi-level reweighting.",
                main_process_only=True,
            )
            return
        from .refresh import U2ARefreshCallback

        # The refreshes select `budget` negatives (`U2AConfig.budget`, as a count)
        self.budget = args.budget_count(self.num_negatives)
        with _dataset_bars(args.disable_tqdm):
            self.refresh_callback = U2ARefreshCallback(self, alignment_dataset, objective=alignment_objective)
        self.add_callback(self.refresh_callback)

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        names = {"train": "train_dataset", "eval": "eval_dataset", "test": "test_dataset"}
        name = names.get(dataset_name, f"eval_dataset[{dataset_name!r}]")
        u2a_data.require_dataset(dataset, name)
        if "prompt_ids" in dataset.column_names:  # already prepared (e.g. `evaluate` on a prepared split)
            return dataset
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self._collator.pad_token_id = u2a_data.check_tokenizer(tokenizer)
        name = "train_dataset" if dataset_name == "train" else f"eval_dataset[{dataset_name}]"
        if u2a_data.NEGATIVE_ID not in dataset.column_names:
            dataset = u2a_data.to_unpaired(dataset, name, num_proc=args.dataset_num_proc)
        return u2a_data.tokenize_unpaired(dataset, tokenizer, args.max_length, name, num_proc=args.dataset_num_proc)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(u2a_data.TRAIN_COLUMNS)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """Add the column `ref_logps = log π_0(y|x)` of every row, computed once (NPO's reference term).

        Rows are sharded across processes in equal, padded chunks (ZeRO-3 needs every rank to run the same forwards)
        and gathered in memory, so no cache file has to be shared between processes.
        """
        # KTO's constructor calls this too: U2A adds the column in `_add_reference_logps` instead, once the trainer
        # is built (also when KTO keeps a reference model for the KL retain term and would not call it). Only NPO
        # reads reference log-probs; for the other losses this pass would be wasted compute
        if self._kto_constructing or self.args.loss_type != "npo" or "ref_logps" in dataset.column_names:
            return dataset
        # A bitsandbytes 4-bit layer run under no_grad in eval mode on CPU repacks its weight for inference and then
        # drops every later gradient through it (see `modeling.eval_mode`); a freshly loaded model is in eval mode
        for m in self.model.modules():
            if is_bnb_4bit(m):
                m.training = True
        engine = None
        if self.ref_model is not None or not self.is_deepspeed_enabled:
            model = self.ref_model or self.model
        elif type(self.model_wrapped).__name__ == "DeepSpeedEngine":
            model = self.model_wrapped  # the training engine, once `train` has built it
        else:
            # Before `train` prepares the model, DeepSpeed has neither placed (ZeRO-1/2) nor gathers (ZeRO-3) its
            # parameters: an inference engine for this pass only
            engine = model = prepare_deepspeed(self.model, self.accelerator)
        try:
            values = self._reference_values(model, dataset, name, batch_size)
        finally:
            if engine is not None:
                # Its ZeRO-3 hooks would stay on the module beside those of the training engine, and the two parameter
                # coordinators disagree: after a single reference forward per rank, the first training forward failed
                # with "IndexError: pop from an empty deque"
                engine.empty_partition_cache()
                engine.destroy()
        return dataset.add_column("ref_logps", values)

    def _reference_values(self, model, dataset, name, batch_size) -> list[float]:
        """`log π_0(y|x)` of every row of `dataset` for NPO, 0 for retain rows; every rank returns all of them."""
        # NPO reads log π_0 of the negatives only; retain rows get 0 (the retain term never reads it)
        targets = [i for i, retain in enumerate(dataset["label"]) if not retain]
        if not targets:
            return [0.0] * len(dataset)
        sharding = Sharding(self.accelerator)
        rows, _ = sharding.chunk(targets)
        values = GrowingTensor()  # not a list of per-batch tensors: they would fragment the heap (see its docstring)
        for start in tqdm(
            range(0, len(rows), batch_size),
            desc=f"Computing reference log-probs of the {name} negatives",
            disable=not self.accelerator.is_local_main_process
            or self.args.disable_tqdm
            or bool(os.environ.get("TQDM_DISABLE")),
        ):
            batch = self._collator([dataset[i] for i in rows[start : start + batch_size]])
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            values.extend(self.compute_ref_log_probs(model, batch)[0].float())
        local = values.values() if values.size else torch.zeros(0, device=self.accelerator.device)
        ref_logps = torch.zeros(len(dataset))
        ref_logps[targets] = sharding.gather_chunks(local, len(targets))
        return ref_logps.tolist()

    def _get_train_sampler(self, train_dataset=None):
        retain_rows = self.retain_rows if self.args.retain_weight > 0 else None
        global_batch = self.args.per_device_train_batch_size * self.accelerator.num_processes
        self._sampler = WeightedNegativeSampler(
            negative_rows=self.negative_rows,
            retain_rows=retain_rows,
            # Whole global batches: an epoch of `budget` draws would end on a partial batch (budget 49 at batch 8:
            # every 7th step trained one negative). The draws cycle through the selected negatives anyway.
            negatives_per_epoch=-(-self.budget // global_batch) * global_batch,
            weights=self.weight_state.weights,
            mode=self.args.weighting,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            global_batch_size=global_batch,
        )
        if self._pending_sampler_state is not None:
            self._sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return self._sampler

    # --------------------------------------------------------------- weights
    def set_weights(self, state: WeightState) -> None:
        """Install a new weight state: the loss uses it from the next batch, the sampler from the next draw."""
        self.weight_state = state
        self._weights = state.weights.to(device=self.accelerator.device, dtype=torch.float32)
        if self._sampler is not None:
            self._sampler.update_weights(state.weights)

    def log_refresh(self, metrics: dict[str, float]) -> None:
        """Log one refresh's `u2a/*` metrics as an entry of their own at the current step, unaveraged: in TRL's
        `_metrics` two refreshes inside one logging window would be averaged into one value."""
        Trainer.log(self, dict(metrics))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`L = Σ_i ω_i ℓ_i / Σ_i ω_i + α · L_retain` over the batch, where the weight sum is all-reduced so that
        data-parallel ranks together compute the weighted mean of the global batch."""
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        input_ids = inputs["input_ids"].to(device)
        attention_mask = inputs["attention_mask"].to(device)
        completion_mask = inputs["completion_mask"].to(device)
        is_retain = inputs["label"].to(device).bool()
        negative_ids = inputs[u2a_data.NEGATIVE_ID].to(device)
        use_kl = self.args.retain_weight > 0 and self.args.retain_loss == "kl"
        # A Mixture-of-Experts model returns its router's load-balancing loss, added below as KTO adds it
        model_kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}

        if use_kl:
            # The KL term needs the full next-token distributions, so the fused (log-prob only) head is bypassed
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
            logits = outputs.logits
            per_token = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(-1)
        else:
            labels = input_ids.masked_fill(completion_mask == 0, -100)
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                fused_lm_head=True,
                use_cache=False,
                **model_kwargs,
            )
            per_token = outputs.log_probs[:, -(input_ids.size(1) - 1) :]
        logps, lengths = completion_logps(per_token, completion_mask)
        ref_logps = inputs["ref_logps"].to(device) if "ref_logps" in inputs else None

        losses = unlearning_loss(self.loss_type, logps, lengths, ref_logps, self.args.beta, self.args.gamma)
        is_negative = ~is_retain
        if self.args.weighting == "sampling" or mode == "eval":
            # Evaluation rows are not the training negatives: their ids do not index the training weights
            weights = is_negative.to(losses.dtype)
        else:
            weights = self._weights[negative_ids.clamp(min=0)].to(losses.dtype) * is_negative
        # Σω and the retain count of the global batch, as per-rank means (DDP averages gradients over ranks): one
        # all-reduce for both
        totals = torch.stack([weights.sum(), is_retain.sum().to(losses.dtype)]).detach()
        weight_total, retain_count = self.accelerator.reduce(totals, reduction="mean").unbind()
        loss = weighted_mean(losses, weights, normalizer=weight_total)

        retain_nll = torch.where(is_retain, nll_loss(logps, lengths), 0.0)
        if self.args.retain_weight > 0:
            if use_kl:
                retain_term = self._kl_retain(model, input_ids, attention_mask, completion_mask, logits)
                retain_term = torch.where(is_retain, retain_term, 0.0)
            else:
                retain_term = retain_nll
            loss = loss + self.args.retain_weight * retain_term.sum() / retain_count.clamp(min=1)
        if self.aux_loss_enabled:
            # A batch-level term, unweighted: it balances the experts' load over all rows, negatives and retain alike
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        if mode == "train":
            # Each row's coefficient in `loss`, for in-training scores (`_row_factors` adds the backward's factor)
            self._row_coefficients = weight_coefficients(weights.detach(), normalizer=weight_total)
            # What the backward multiplies `loss` by (1 / accumulation steps, an AMP or DeepSpeed fp16 loss scale,
            # whatever a later version adds) arrives as the gradient of `loss`, before any module's
            self._backward_factor = None
            if loss.requires_grad:
                loss.register_hook(self._record_backward_factor)
        self._log_batch_metrics(mode, losses, logps, lengths, weights, is_negative, is_retain, retain_nll)
        if return_outputs:
            return loss, {"logps": logps.detach()}
        return loss

    def _record_backward_factor(self, grad: torch.Tensor) -> None:
        """Tensor hook on `compute_loss`'s training loss: `d(backpropagated scalar)/d(loss)`, a 0-dim tensor."""
        self._backward_factor = grad.detach()

    def _row_factors(self) -> torch.Tensor:
        """`(B,)` each row's factor in the last training backward: its coefficient in the loss times the backward's."""
        if self._backward_factor is None:
            raise RuntimeError("In-training scores found no backward through the training loss of this micro-batch.")
        return self._row_coefficients * self._backward_factor.to(self._row_coefficients)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As KTO's, but the predictions are each row's completion log-prob `log π(y|x)` `(B,)` and the labels its
        `label` (1: retain, 0: negative): the loss reads log-probs through TRL's fused head, so no logits exist."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs["logps"], inputs["label"].long()

    def _prepared(self, dataset, name: str):
        """A dataset passed to `evaluate` or `predict`: tokenized (and given NPO's reference log-probs) as the eval
        dataset given at construction is; a prepared one is returned as is."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        with _dataset_bars(self.args.disable_tqdm):
            dataset = self._prepare_dataset(dataset, tokenizer, self.args, name)
            batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            return self._precompute_ref_logps(dataset, name, batch_size)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepared(v, k) for k, v in eval_dataset.items()}
        elif eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._prepared(eval_dataset, metric_key_prefix)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`predictions`: each row's completion log-prob `(N,)`; `label_ids`: its `label` (1: retain, 0: negative);
        `metrics`: the (unweighted) unlearning loss and the log-prob metrics of evaluation."""
        test_dataset = self._prepared(test_dataset, metric_key_prefix)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def training_step(self, model, inputs, *args, **kwargs):
        controller = self.refresh_callback.controller if self.refresh_callback is not None else None
        if controller is None or not controller.scoring_in_training:
            return super().training_step(model, inputs, *args, **kwargs)
        # In-training scores: the training backward already holds each negative's output gradients
        return controller.record_training_scores(
            inputs[u2a_data.NEGATIVE_ID],
            self._row_factors,
            lambda: super(U2ATrainer, self).training_step(model, inputs, *args, **kwargs),
        )

    def _kl_retain(self, model, input_ids, attention_mask, completion_mask, logits):
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            else:
                ref_logits = self.ref_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return kl_to_reference(logits, ref_logits, completion_mask)

    def _log_batch_metrics(self, mode, losses, logps, lengths, weights, is_negative, is_retain, retain_nll):
        stats = torch.stack(
            [
                (torch.where(is_negative, losses, 0.0)).sum(),
                (torch.where(is_negative, logps / lengths.clamp(min=1), 0.0)).sum(),
                is_negative.sum().to(losses.dtype),
                retain_nll.sum(),
                is_retain.sum().to(losses.dtype),
            ]
        ).detach()
        # One row per rank, all of them: these are per-rank sums, not samples. `gather_for_metrics` cut the rows to
        # the dataset's remainder at a dataloader's end (every step, when the budget fits one global batch), so a NaN
        # on rank 1 went unseen by every rank, was backpropagated into every replica and saved in a checkpoint
        per_rank = self.accelerator.gather(stats[None]).cpu()
        loss_sum, logp_sum, num_negatives, nll_sum, num_retain = per_rank.sum(0).tolist()
        # Decided on the gathered values, so every rank stops at this step with this message, before the backward
        bad = [rank for rank, row in enumerate(per_rank) if not bool(torch.isfinite(row[:2]).all())]
        if bad:
            raise FloatingPointError(
                f"Non-finite unlearning loss at optimizer step {self.state.global_step + 1} ({mode}) on rank "
                f"{', '.join(map(str, bad))} of {len(per_rank)}: loss sum {loss_sum}, log-prob sum {logp_sum}. The "
                "learning rate may be too high (gradient-ascent collapse), or a batch holds a corrupt row; every "
                "rank stops here, and the last checkpoint holds the last good weights and adapter."
            )
        metrics = self._metrics[mode]
        if num_negatives > 0:
            metrics["loss/negatives"].append(loss_sum / num_negatives)
            metrics["logps/negatives"].append(logp_sum / num_negatives)
        if num_retain > 0:
            metrics["nll/retain"].append(nll_sum / num_retain)
        if mode == "train":
            selected = self.weight_state.weights[self.weight_state.selected]
            metrics["weights/num_selected"].append(float(len(selected)))
            metrics["weights/max"].append(float(selected.max()) if len(selected) else 0.0)
            metrics["weights/entropy"].append(weight_entropy(selected))

    # ------------------------------------------------------------ model card
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card with the base model named and a U2A section (`trl_u2a.model_card`)."""
        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if _internal_call:  # checkpoints get their card from `_save_checkpoint`
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
        card = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            import shutil

            shutil.copyfile(card, os.path.join(output_dir, "README.md"))

    # ------------------------------------------------------------ checkpoint
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming only from a *complete* checkpoint: `resume_from_checkpoint=True` takes the last
        checkpoint of `output_dir` whose files were all written (a run killed while saving leaves a partial one).

        The strings `"true"` and `"last"` (any case; what a command line or YAML file passes) mean True, and
        `"false"`/`"none"` mean None, unless a directory of that name exists. A fresh run into an `output_dir` that
        holds a complete checkpoint or a saved model is refused unless `args.overwrite_output_dir` is set.
        """
        check_output_dir(self.args.output_dir, resume_from_checkpoint, self.args.overwrite_output_dir)
        if isinstance(resume_from_checkpoint, str) and not os.path.isdir(resume_from_checkpoint):
            word = resume_from_checkpoint.strip().lower()
            if word in ("true", "last"):
                resume_from_checkpoint = True
            elif word in ("false", "none", ""):
                resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint "
                    f"(a checkpoint-N directory with {STATE_JSON} and a readable trainer_state.json). Drop "
                    "resume_from_checkpoint to start from scratch, or pass the output_dir of the run to resume."
                )
        elif isinstance(resume_from_checkpoint, str):
            missing = checkpoint_problem(resume_from_checkpoint)
            if missing:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {missing}.")
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        # A checkpoint save at the last step wrote the card before `on_train_end` measured the final J: rewrite it
        card = os.path.join(self.args.output_dir, "README.md")
        if self.args.should_save and os.path.isfile(card):
            with open(card) as f:
                ours = "## U2A: what was unlearned" in f.read()
            if ours:
                self.create_model_card(model_name=os.path.basename(os.path.normpath(self.args.output_dir)))
        return output

    def u2a_state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the weight trajectory exactly: weights, scores, sampler, refresh state."""
        state = {"weights": self.weight_state.state_dict()}
        if self._sampler is not None:
            state["sampler"] = self._sampler.state_dict()
        if self.refresh_callback is not None:
            state["refresh"] = self.refresh_callback.state_dict()
        return state

    def load_u2a_state_dict(self, state: dict[str, Any]) -> None:
        # Checks that the checkpoint has as many negatives as this run before anything is installed
        restored = WeightState.uniform(self.num_negatives)
        restored.load_state_dict(state["weights"])
        self.set_weights(restored)
        if "sampler" in state:
            if self._sampler is not None:
                self._sampler.load_state_dict(state["sampler"])
            else:
                self._pending_sampler_state = state["sampler"]
        if "refresh" in state and self.refresh_callback is not None:
            self.refresh_callback.load_state_dict(state["refresh"])

    def _save_checkpoint(self, model, trial):
        # The U2A state is written before the parent's files, and `trainer_state.json`, the mark of a complete
        # checkpoint, after every rank has written all of its files (`_marked_complete_last`)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = self.u2a_state_dict()  # on every rank: it gathers the per-rank in-training scores
        try:
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                # A directory saved before (a resume from an earlier checkpoint) is incomplete until its files are
                # rewritten: its old completeness mark goes first
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(output_dir, TRAINER_STATE))
                # safetensors + JSON, not a pickle: loading them cannot run code (see `safe_state`)
                save_state(state, output_dir)
            with self._marked_complete_last(output_dir, run_dir):
                super()._save_checkpoint(model, trial)
        except Exception as error:
            last = last_complete_checkpoint(run_dir)
            raise RuntimeError(
                f"Could not save checkpoint {output_dir} at optimizer step {self.state.global_step}: "
                f"{type(error).__name__}: {error}. The last complete checkpoint, which "
                f"resume_from_checkpoint=True picks up, is {last or 'none (nothing to resume from yet)'}; a checkpoint "
                "without trainer_state.json is never loaded."
            ) from error

    @contextlib.contextmanager
    def _marked_complete_last(self, output_dir: str, run_dir: str):
        """Inside, the parent's checkpoint save writes `trainer_state.json` under a temporary name and deletes no old
        checkpoint; on exit every rank waits for the others (all their files, whatever `save_only_model` leaves out,
        are written), then the main process renames it, and only then rotates the old checkpoints.

        transformers lets the main process write the mark without waiting for the other ranks: one that froze or
        died while saving left a checkpoint marked complete but missing its files. A frozen rank makes this barrier
        fail after `ddp_timeout`, before the mark is written and before an older complete checkpoint is deleted.
        """
        from transformers.trainer_utils import rotate_checkpoints

        mark = os.path.join(output_dir, TRAINER_STATE)
        write_state = self.state.save_to_json
        limit = self.args.save_total_limit
        self.state.save_to_json = lambda path: write_state(path + ".tmp" if path == mark else path)
        self.args.save_total_limit = None
        try:
            yield
        finally:
            del self.state.save_to_json  # the class's method again
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            os.replace(mark + ".tmp", mark)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The U2A state first: a refused or unreadable one should stop the resume before any model file is read
        state = load_checkpoint_state(resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_u2a_state_dict(state)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A checkpoint leaves out a tied weight (`lm_head.weight` under tied embeddings): it shares the tensor of a key
        # that was loaded, so the resume is exact and transformers' "missing keys" warning would only alarm
        missing = set(load_result.missing_keys)
        if missing:
            names_by_tensor = defaultdict(set)
            for name, parameter in self.model.named_parameters(remove_duplicate=False):
                names_by_tensor[id(parameter)].add(name)
            tied = {name for names in names_by_tensor.values() if names - missing for name in names & missing}
            load_result = SimpleNamespace(
                missing_keys=[key for key in load_result.missing_keys if key not in tied],
                unexpected_keys=load_result.unexpected_keys,
            )
        super()._issue_warnings_after_load(load_result)
