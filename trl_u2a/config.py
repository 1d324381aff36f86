"""`U2AConfig`: the training arguments of `U2ATrainer`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from trl import KTOConfig

from .core.losses import DEFAULT_BETA, LOSS_TYPES
from .core.weighting import budget_size, check_budget
from .doc_links import docs_page
from .influence.preconditioners import PRECONDITIONERS

RETAIN_LOSSES = ("nll", "kl")
WEIGHTINGS = ("loss", "sampling")


@dataclass
class U2AConfig(KTOConfig):
    r"""
    Configuration class for [`U2ATrainer`].

    This class includes only the parameters that are specific to U2A. For the rest, see [`trl.KTOConfig`] and
    [`~transformers.TrainingArguments`]. The formulas behind each parameter are in `docs/method.md`.

    Parameters:
        > Parameters that control the unlearning loss

        loss_type (`str`, *optional*, defaults to `"npo"`):
            Per-example loss on the negatives: `"ga"` (gradient ascent on the token-mean log-likelihood), `"graddiff"`
            (`"ga"` plus the retain term, which it requires), `"npo"` (negative preference optimisation against the
            start model) or `"simnpo"` (reference-free, length-normalised NPO).
        beta (`float`, *optional*):
            Temperature of `"npo"` and `"simnpo"`. Defaults to `0.1` for `"npo"` and `4.5` for `"simnpo"`.
        gamma (`float`, *optional*, defaults to `0.0`):
            Margin of `"simnpo"`.
        retain_weight (`float`, *optional*):
            Weight α of the retain term on retain examples (`label=True` rows, or `chosen`). `0` disables it. Defaults
            to `1.0` for `"graddiff"` and `0.0` otherwise. The retain term is not weighted by the per-example weights.
        retain_loss (`str`, *optional*, defaults to `"nll"`):
            Retain term: `"nll"` (token-mean negative log-likelihood) or `"kl"` (token-mean KL to the start model).
        weighting (`str`, *optional*, defaults to `"loss"`):
            How the per-example weights act: `"loss"` weights each negative's loss (weighted mean over the batch);
            `"sampling"` draws negatives with probability proportional to their weight and leaves the loss unweighted.

        > Parameters that control the bi-level reweighting (active when an `alignment_dataset` is given)

        beta_pa (`float`, *optional*, defaults to `0.1`):
            β of the DPO alignment objective `J` on the alignment set.
        reweight_steps (`int`, *optional*):
            A fixed cadence: optimizer steps between two refreshes of the weights. `None` (the default) places the
            refreshes so that, after the initial pass, reweighting costs at most `reweight_overhead` of the run's
            training compute, earlier refreshes closer together (docs/method.md, "Cadence"). A refresh always runs
            before the first step.
        reweight_warmup_steps (`float`, *optional*, defaults to `0.2`):
            Optimizer steps of plain unlearning (the initial weights, uniform by default) before the initial pass
            scores every negative: an integer (exact steps) or a float in `[0, 1)` (a ratio of the total steps, as
            `warmup_steps`). At the start model the negatives' gradients carry little signal (it was trained on
            them; a fresh LoRA adapter also has `B = 0`): on the demo's task the first selection's harmful share
            rose from 0.56-0.63 at step 0 to 0.70-0.95 after a fifth of the run (docs/results.md).
        reweight_overhead (`float`, *optional*, defaults to `0.15`):
            The share of the training compute (forward+backward passes over rows) that the refreshes after the
            initial pass may cost when `reweight_steps=None`; with a fixed `reweight_steps` that breaks it, one
            warning.
        budget (`float`, *optional*, defaults to `0.25`):
            Number of negatives to unlearn: a value in `(0, 1]` is a fraction of the negatives (rounded half up, at
            least 1; `1` selects all), a whole number above 1 a count (`weighting.budget_size`). With
            `auto_budget=True` (the default), the most the initial pass may set; with `auto_budget=False`, the
            number itself.
        auto_budget (`bool`, *optional*, defaults to `True`):
            Set the number of negatives to unlearn from the initial pass's scores: the positive scores at or above
            their Otsu threshold (the cut that best splits them in two groups), at least 5 % of the negatives and
            at most `budget`; later refreshes keep that number (`core.auto_budget`). On the demo it selected
            exactly what the fixed 25 % does where half of the negatives were harmful (the cut keeps more than the
            cap) and fewer, more precisely, where 15 % were, with a lower held-out DPO loss in LoRA and full
            fine-tuning (docs/results.md). `False`: unlearn exactly `budget`.
        pool_size (`int`, *optional*):
            Unselected negatives re-scored at each refresh after the first (exploration). `None`: the rows of one
            optimizer step (per-device batch × accumulation × processes).
        pa_samples (`int`, *optional*):
            Number of alignment pairs sampled to estimate `∇J` at each refresh. `None`: every pair at the first
            refresh, then as many pairs as one optimizer step has rows.
        weight_lr (`float`, *optional*, defaults to `0.2`):
            Step size η_w of the tempered mirror-ascent weight update. `0` means selection only (uniform weights on
            the selected set).
        score_clip (`float`, *optional*, defaults to `2.0`):
            Clip `c` of the standardised scores in the weight update.
        max_weight (`float`, *optional*, defaults to `4.0`):
            Cap of a weight, as a multiple of the mean selected weight.
        sparsity (`float`, *optional*, defaults to `0.0`):
            Coefficient ρ of the ℓ1/2 penalty `ρ Σ √ω_i` on the weights.
        preconditioner (`str`, *optional*, defaults to `"adam"`):
            Approximation `P` of the Hessian in the score `s_i = ∇Jᵀ P⁻¹ ∇ℓ_i`: `"identity"`, `"adam"` (the
            optimizer's second moments; before the first step, estimated from `preconditioner_batches` batches) or
            `"fisher"` (diagonal empirical Fisher of `J`).
        preconditioner_batches (`int`, *optional*, defaults to `8`):
            With `preconditioner="adam"`, the first refresh has no optimizer state yet: Adam's second moments are
            estimated as the mean squared gradient of the unlearning loss over this many training-size batches of
            negatives (no optimizer step). `0` uses the identity there.
        damping (`float`, *optional*, defaults to `1e-8`):
            Damping λ added to the diagonal preconditioner.
        scoring_batch_size (`int`, *optional*):
            Batch size of the scoring forward/backward passes. Defaults to `per_device_train_batch_size`.
        in_training_scores (`bool`, *optional*, defaults to `True`):
            Score the trained negatives during their training backward with the query `v` of the last refresh. A
            refresh then ranks with that same `v` (one scale per ranking): it scores only the exploration pool with
            it, carries the selected negatives not trained since, and installs its new `v` for the next window. Used
            when the output embedding is frozen (PEFT/QLoRA); with a trainable LM head TRL's fused head bypasses the
            module, so every refresh rescores the selected negatives with its new `v` instead.
        patience (`int`, *optional*, defaults to `0`):
            Stop training when `J` has not improved for this many refreshes. `0` disables it.
        retain_nll_tolerance (`float`, *optional*):
            Stop training when the retain NLL rises more than this above its value at the first refresh (a guard
            against gradient-ascent collapse). `None` disables it.
        save_refresh_plots (`bool`, *optional*, defaults to `True`):
            At the end of training, draw `J`, the weights and the scores of every refresh as PNGs in
            `output_dir/u2a_plots` (main process; about 2 s). The JSONL trace is written either way.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Train into an `output_dir` that already holds a run (a complete checkpoint) or a saved model, replacing
            it. Without it such a run is refused unless it resumes (`resume_from_checkpoint`).

    > [!NOTE]
    > These parameters have default values different from [`trl.KTOConfig`]:
    > - `learning_rate`: Defaults to `1e-5` instead of `1e-6` (unlearning typically runs for few steps).

    KTO options that U2A never reads (`INERT_KTO_FIELDS`: KTO's loss weights, its reference-model sync, its sampler and
    its reference-log-prob precompute) are refused when set to anything but their default.
    """

    learning_rate: float = field(
        default=1e-5,
        metadata={"help": "The initial learning rate for AdamW."},
    )

    # Unlearning loss
    loss_type: str = field(
        default="npo",
        metadata={
            "help": "Per-example loss on the negatives: 'ga', 'graddiff' (ga + retain term), 'npo' or 'simnpo'.",
            "choices": list(LOSS_TYPES),
        },
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "Temperature of 'npo' and 'simnpo'; None picks 0.1 for 'npo' and 4.5 for 'simnpo'."},
    )
    gamma: float = field(default=0.0, metadata={"help": "Margin γ of 'simnpo'."})
    retain_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight α of the retain term (label=True rows or chosen responses); 0 disables it. None picks 1.0 "
            "for 'graddiff', 0.0 otherwise."
        },
    )
    retain_loss: str = field(
        default="nll",
        metadata={"help": "Retain term: 'nll' or 'kl' (KL to the start model).", "choices": list(RETAIN_LOSSES)},
    )
    weighting: str = field(
        default="loss",
        metadata={
            "help": "'loss': weighted loss over the batch's negatives; 'sampling': draw negatives with probability "
            "proportional to their weight, unweighted loss.",
            "choices": list(WEIGHTINGS),
        },
    )

    # Bi-level reweighting
    beta_pa: float = field(default=0.1, metadata={"help": "β of the DPO alignment objective J."})
    reweight_steps: int | None = field(
        default=None,
        metadata={
            "help": "Fixed cadence: optimizer steps between refreshes (a refresh also runs before step 1). None: "
            "refreshes placed so that they cost at most reweight_overhead of the training compute."
        },
    )
    reweight_warmup_steps: float = field(
        default=0.2,
        metadata={
            "help": "Steps of plain unlearning before the initial pass scores every negative: an integer, or a float "
            "in [0, 1) for a ratio of the total steps."
        },
    )
    reweight_overhead: float = field(
        default=0.15,
        metadata={
            "help": "Share of the training compute the refreshes after the initial pass may cost (reweight_steps=None)."
        },
    )
    budget: float = field(
        default=0.25,
        metadata={
            "help": "Negatives to unlearn: a value in (0, 1] is a fraction of the negatives, a whole number above 1 "
            "a count."
        },
    )
    auto_budget: bool = field(
        default=True,
        metadata={
            "help": "Budget from the initial pass's scores: the positive ones at or above their Otsu threshold, at "
            "least one negative in 20 and at most budget. False: unlearn exactly budget."
        },
    )
    pool_size: int | None = field(
        default=None,
        metadata={
            "help": "Unselected negatives re-scored per refresh after the first (exploration); None: the rows of one "
            "optimizer step."
        },
    )
    pa_samples: int | None = field(
        default=None,
        metadata={
            "help": "Alignment pairs sampled to estimate ∇J per refresh; None: all at the first refresh, then the "
            "rows of one optimizer step."
        },
    )
    weight_lr: float = field(
        default=0.2, metadata={"help": "Step size of the mirror-ascent weight update; 0 = selection only."}
    )
    score_clip: float = field(default=2.0, metadata={"help": "Clip of the standardised scores in the update."})
    max_weight: float = field(default=4.0, metadata={"help": "Cap of a weight, as a multiple of the mean weight."})
    sparsity: float = field(default=0.0, metadata={"help": "Coefficient ρ of the ℓ1/2 penalty ρ Σ √ω."})
    preconditioner: str = field(
        default="adam",
        metadata={
            "help": "Hessian approximation in the scores: 'identity', 'adam' (optimizer second moments) or 'fisher'.",
            "choices": list(PRECONDITIONERS),
        },
    )
    preconditioner_batches: int = field(
        default=8,
        metadata={
            "help": "Batches that estimate Adam's second moments for the first refresh (no optimizer state yet); 0: "
            "identity there."
        },
    )
    damping: float = field(default=1e-8, metadata={"help": "Damping λ added to the diagonal preconditioner."})
    scoring_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of scoring passes; defaults to per_device_train_batch_size."}
    )
    in_training_scores: bool = field(
        default=True,
        metadata={"help": "Score trained negatives during their training backward with the last v."},
    )
    patience: int = field(
        default=0, metadata={"help": "Stop when J has not improved for this many refreshes; 0 disables it."}
    )
    retain_nll_tolerance: float | None = field(
        default=None,
        metadata={"help": "Stop when the retain NLL rises more than this above its first value; None disables it."},
    )
    save_refresh_plots: bool = field(
        default=True, metadata={"help": "Draw the refreshes as PNGs in output_dir/u2a_plots at the end of training."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that holds a run or a saved model, replacing it (otherwise refused "
            "unless resuming)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _refuse_inert_fields(self)
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("retain_loss", self.retain_loss, RETAIN_LOSSES)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.loss_type]
        if self.retain_weight is None:
            self.retain_weight = 1.0 if self.loss_type == "graddiff" else 0.0
        _check_positive("beta", self.beta)
        _check_positive("beta_pa", self.beta_pa)
        _check_positive("score_clip", self.score_clip)
        _check_finite("gamma", self.gamma)
        for name in ("retain_weight", "weight_lr", "sparsity", "damping"):
            _check_non_negative(name, getattr(self, name))
        if self.loss_type == "graddiff" and self.retain_weight == 0:
            raise ValueError(
                "loss_type='graddiff' is gradient ascent plus a retain term, but retain_weight=0. Set retain_weight "
                "> 0 "
                "(e.g. 1.0), or use loss_type='ga'."
            )
        if not math.isfinite(self.max_weight) or self.max_weight < 1:
            raise ValueError(
                f"max_weight={self.max_weight} must be a finite number ≥ 1 (a multiple of the mean weight)."
            )
        check_budget(self.budget)
        _check_finite("reweight_overhead", self.reweight_overhead)
        if not 0 < self.reweight_overhead <= 10:
            raise ValueError(
                f"reweight_overhead={self.reweight_overhead} must be in (0, 10]: the share of the training compute "
                "that refreshes may cost, e.g. 0.15 for 15 %."
            )
        _check_non_negative("reweight_warmup_steps", self.reweight_warmup_steps)
        if self.reweight_warmup_steps >= 1 and self.reweight_warmup_steps != int(self.reweight_warmup_steps):
            raise ValueError(
                f"reweight_warmup_steps={self.reweight_warmup_steps} must be a whole number of steps or a ratio in "
                "[0, 1)."
            )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer ≥ 1.")
        for name in ("patience", "preconditioner_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer ≥ 0.")
        if self.pool_size is not None and (
            isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int) or self.pool_size < 0
        ):
            raise ValueError(f"pool_size={self.pool_size!r} must be None or an integer ≥ 0.")
        for name in ("reweight_steps", "pa_samples", "scoring_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be None or an integer ≥ 1.")
        if self.retain_nll_tolerance is not None:
            _check_positive("retain_nll_tolerance", self.retain_nll_tolerance)

    def budget_count(self, num_negatives: int) -> int:
        """The budget as a number of negatives, for `num_negatives` candidates (`weighting.budget_size`)."""
        try:
            return budget_size(self.budget, num_negatives)
        except ValueError as error:
            raise ValueError(f"{error} (train_dataset has {num_negatives} negatives)") from None


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}.")


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number.")


def _check_positive(name: str, value) -> None:
    _check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name}={value} must be > 0.")


def _check_non_negative(name: str, value) -> None:
    _check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name}={value} must be ≥ 0.")


# KTO options that U2A inherits but never reads: its loss weights and reference-model sync, its sampler (U2A draws
# the selected negatives itself) and its reference-log-prob precompute (U2A caches NPO's own). Hidden from `--help`.
INERT_KTO_FIELDS = (
    "desirable_weight",
    "undesirable_weight",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "precompute_ref_log_probs",
    "train_sampling_strategy",
)


def _refuse_inert_fields(config: U2AConfig) -> None:
    """A KTO option set to a value U2A would silently ignore is an error (the user expects it to act)."""
    defaults = {f.name: f.default for f in dataclasses.fields(KTOConfig)}
    changed = [name for name in INERT_KTO_FIELDS if getattr(config, name) != defaults[name]]
    if changed:
        settings = ", ".join(f"{name}={getattr(config, name)!r}" for name in changed)
        raise ValueError(
            f"{settings}: U2AConfig inherits these KTOConfig options but U2A never reads them, so they would do "
            f"nothing. Remove them (U2A's own options: {docs_page('usage', 'choosing-the-knobs')})."
        )
