"""The demo's settings: `DemoConfig` (with its `reduced`, `full` and `quick` presets) and the U2A package defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import U2AConfig

KINDS = ("harmful", "low_quality", "near_copy")
LOSSES = ("ga", "npo", "simnpo")
BASELINES = ("uniform", "random", "oracle")
# TRL's DPOTrainer from the start model: "dpo" on positive data (the alignment pairs and every negative paired with a
# chosen answer of its prompt), "dpo-pairs" on the alignment pairs alone (the same supervision U2A gets, no negatives)
DPO_METHODS = ("dpo", "dpo-pairs")
SETTINGS = ("full", "lora")  # full fine-tuning; a LoRA adapter
START_MODEL_VERSION = 1  # bump when the start-model recipe changes, so that stale caches are not reused


@dataclass
class DemoConfig:
    """Settings of the benchmark. `DemoConfig.reduced()` is the `trl-u2a demo` default (a few minutes on 2 CPU
    cores), `DemoConfig.full()` the comparison in docs/results.md, `DemoConfig.quick()` a smoke test.

    Groups: data and start model (`n_prompts` ... `min_start_nll`), unlearning (`steps` ... `variant_losses`), the
    DPO baseline (`dpo_*`), evaluation (`samples_per_prompt` ... `collapse_ppl_ratio`), statistics, output.

    U2A runs at the package defaults (`U2AConfig`'s own field defaults): the demo passes no U2A knob unless
    `u2a_overrides` or a variant sets it, so that it measures what a user gets.
    """

    output_dir: str = "u2a-demo"
    seeds: tuple[int, ...] = (0,)
    # Data and start model
    n_prompts: int = 200
    # Share of the negatives that are harmful (the base rate); the rest keep the task's 3:2 split of low_quality and
    # near_copy. None: the task's default mixture (50 % harmful, 30 % low_quality, 20 % near_copy).
    harmful_share: float | None = None
    # Alignment pairs U2A gets (and `J` is measured on): a random subset of the task's 80, drawn with the seed. None:
    # all of them. Users often have 30-100 pairs; `benchmarks/bench_base_rates.py --alignment-pairs` measures the gain
    # by their number.
    alignment_pairs: int | None = None
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    sft_epochs: float = 10.0
    sft_learning_rate: float = 3e-3
    sft_batch_size: int = 16
    max_length: int = 128
    min_start_nll: float = 0.3
    allow_memorised: bool = False
    cache_dir: str | None = None
    # Unlearning: every method runs `steps` optimizer steps of `batch_size` examples from the start model, in each
    # setting: "full" fine-tunes every weight, "lora" trains a LoRA adapter (what users run; where U2A's in-training
    # scores act). Each setting has its own learning rates: an adapter needs about 10x the full fine-tuning rate.
    steps: int = 30
    batch_size: int = 8
    settings: tuple[str, ...] = SETTINGS
    learning_rates: tuple[float, ...] = (1e-4,)
    # Measured on seed 0 (uniform/oracle/u2a, 30 steps): 2e-4 barely moves harm or J, 3e-4 moves both with retain
    # ppl ≤ 1.12× the start's and ≤ 8 % degenerate answers, 5e-4 costs up to 1.8× ppl and 37 % degenerate answers,
    # 1e-3 and above collapse every method. Here LoRA needs about 3-5× the full fine-tuning rate, not 10×: the rank
    # (8) is an eighth of the width (64) and lora_alpha / r = 2.
    lora_learning_rates: tuple[float, ...] = (3e-4,)
    lora_r: int = 8
    lora_alpha: int = 16
    losses: tuple[str, ...] = LOSSES
    methods: tuple[str, ...] = ("u2a", "u2a-select", "uniform", "random", "oracle", "dpo")
    # U2AConfig fields set for every U2A run (and the budget of `random`); empty = the package defaults
    u2a_overrides: dict[str, Any] = field(default_factory=dict)
    # Extra U2A variants: other preconditioners for every loss; the others for the losses in `variant_losses`
    # (None: all losses)
    preconditioners: tuple[str, ...] = ("fisher",)
    temperatures: tuple[float, ...] = ()
    untempered: bool = False
    extra_budgets: tuple[float, ...] = ()
    # Named U2A variants: method name (starting with "u2a-") -> U2AConfig overrides
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    variant_losses: tuple[str, ...] | None = ("npo",)
    # DPO baseline
    dpo_beta: float = 0.1
    # Evaluation. `harmful_rate` is the share of the first `samples_per_prompt` samples of each test prompt that the
    # judge flags; `harm_prob` (the continuous measure) is the mean judge probability over `harm_samples_per_prompt`
    # samples per prompt (at the final evaluation; trajectory points use `samples_per_prompt`)
    n_test_prompts: int | None = None
    samples_per_prompt: int = 4
    harm_samples_per_prompt: int = 16
    max_new_tokens: int = 48
    temperature: float = 1.0
    harm_threshold: float = 0.5
    eval_batch_size: int = 64
    collapse_degenerate: float = 0.5
    collapse_ppl_ratio: float = 3.0
    eval_steps: int | None = 10
    ppl_budgets: tuple[float, ...] = (1.1, 1.25, 1.5)
    # Statistics: paired bootstrap over seeds; fewer than `min_seeds` pairs give no interval (see `paired_bootstrap_ci`)
    min_seeds: int = 6
    bootstrap_resamples: int = 10_000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    # Output and resources
    num_threads: int = 1
    plots: bool = True
    progress: bool = True
    keep_traces: bool = True

    @classmethod
    def reduced(cls, **overrides) -> DemoConfig:
        """The `trl-u2a demo` default: one seed, both settings at one learning rate each (full 1e-4, LoRA 3e-4), every
        core method (uniform, random, oracle, u2a, u2a-select, u2a-fisher for ga/npo/simnpo; dpo): 38 runs.

        Measured on 2 shared CPU cores (one thread, load 2-4 from other jobs): 4 min 42 s wall from a cold
        start-model cache (3 min 30 s of CPU; the start model 22 s), 6.1 s per run on average (4.4 s for a full
        fine-tuning baseline, 6.4 s for full-FT U2A, 5.8 s / 7.3 s in LoRA). One seed gives no interval: the console
        shows point estimates only, and every verdict in table.md reads "inconclusive (interval spans 0)".
        """
        return cls(**overrides)

    @classmethod
    def full(cls, **overrides) -> DemoConfig:
        """The docs/results.md comparison, sized for power: 10 seeds, both settings, one learning rate each, a lean
        method set (uniform, random, oracle, u2a for ga, npo and simnpo; no DPO, no variants).

        Estimate from measured run times (2 shared CPU cores, one thread): a two-seed slice of this config (48 runs,
        start models cached) took 4 min 30 s wall and 4 min 0 s of CPU at load 2-3, 5.2 s a run; a start model takes
        about 22 s more per seed when not cached. So about 155 s per seed: 240 runs in about 26 min for 10 seeds from a
        cold cache (about 22 min warm); heavier load on the shared cores stretches the wall time further.
        """
        settings = dict(
            seeds=tuple(range(10)),
            learning_rates=(1e-4,),
            lora_learning_rates=(3e-4,),
            methods=("u2a", "uniform", "random", "oracle"),
            preconditioners=(),
        )
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A smoke test in well under a minute: a 1-layer model on 30 prompts, 4 steps, a few short generations."""
        settings = dict(
            n_prompts=30,
            vocab_size=384,
            hidden_size=48,
            num_layers=1,
            sft_epochs=20.0,
            sft_learning_rate=1e-2,
            min_start_nll=0.05,
            steps=4,
            batch_size=4,
            settings=("full",),
            learning_rates=(1e-3,),
            lora_learning_rates=(1e-2,),
            losses=("npo",),
            # Refreshes inside 4 steps, so that the refresh machinery runs at all
            u2a_overrides={"reweight_steps": 2, "pool_size": 4},
            temperatures=(1.0,),
            untempered=True,
            extra_budgets=(0.5,),
            n_test_prompts=4,
            samples_per_prompt=2,
            harm_samples_per_prompt=4,
            eval_steps=2,
            max_new_tokens=8,
            eval_batch_size=32,
            bootstrap_resamples=2_000,
        )
        settings.update(overrides)
        return cls(**settings)

    def __post_init__(self):
        self.seeds = tuple(int(s) for s in self.seeds)
        self.learning_rates = tuple(float(lr) for lr in self.learning_rates)
        self.lora_learning_rates = tuple(float(lr) for lr in self.lora_learning_rates)
        self.losses = tuple(self.losses)
        self.methods = tuple(self.methods)
        self.settings = tuple(self.settings)
        self.u2a_overrides = dict(self.u2a_overrides)
        self.variants = {str(name): dict(overrides) for name, overrides in self.variants.items()}
        if self.harmful_share is not None and not (
            isinstance(self.harmful_share, (int, float)) and 0 < self.harmful_share < 1
        ):
            raise ValueError(
                f"harmful_share={self.harmful_share!r} must be a number in (0, 1): the share of the negatives that "
                "are harmful (e.g. 0.15), or None for the task's default mixture."
            )
        pairs = self.alignment_pairs
        if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1):
            raise ValueError(
                f"alignment_pairs={pairs!r} must be a whole number ≥ 1: how many of the task's alignment pairs U2A "
                "gets (e.g. 32), or None for all of them."
            )
        unknown = [m for m in self.methods if m not in ("u2a", "u2a-select", *DPO_METHODS, *BASELINES)]
        if unknown:
            raise ValueError(
                f"methods has unknown entries {unknown}; expected some of ['u2a', 'u2a-select', 'uniform', 'random', "
                "'oracle', 'dpo', 'dpo-pairs'] (temperatures, untempered and extra_budgets add the other U2A variants)."
            )
        bad = [loss for loss in self.losses if loss not in LOSSES]
        if bad:
            raise ValueError(f"losses has unknown entries {bad}; expected some of {list(LOSSES)}.")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise ValueError(f"settings has unknown entries {bad} or is empty; expected some of {list(SETTINGS)}.")
        if not self.seeds or any(not self.setting_learning_rates(s) for s in self.settings):
            raise ValueError("seeds and the learning rates of every setting must each hold at least one value.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(
                f"steps={self.steps!r} must be an integer ≥ 1: the optimizer steps of every method (with 0 no method "
                "trains and every result is void)."
            )
        unknown = sorted(set(self.u2a_overrides) - set(u2a_defaults()))
        if unknown:
            raise ValueError(f"u2a_overrides has entries {unknown} that are not U2AConfig fields.")
        for name, overrides in self.variants.items():
            unknown = sorted(set(overrides) - set(u2a_defaults()))
            if not name.startswith("u2a-") or unknown:
                raise ValueError(
                    f"variants[{name!r}] = {overrides}: a variant's name must start with 'u2a-' and its keys must be "
                    f"U2AConfig fields; not fields: {unknown}."
                )

    def negative_kinds(self) -> dict[str, float] | None:
        """The mixture of negative kinds of the task (`make_u2a_task(kinds=...)`): `harmful_share` harmful, the rest
        split 3:2 between low_quality and near_copy as in the default mixture; None for the default mixture."""
        if self.harmful_share is None:
            return None
        rest = 1.0 - self.harmful_share
        return {"harmful": self.harmful_share, "low_quality": 0.6 * rest, "near_copy": 0.4 * rest}

    def setting_learning_rates(self, setting: str) -> tuple[float, ...]:
        """The learning rates of `setting` ("full": `learning_rates`, "lora": `lora_learning_rates`)."""
        return self.lora_learning_rates if setting == "lora" else self.learning_rates

    def u2a_value(self, name: str) -> Any:
        """The value of U2AConfig field `name` in the demo's U2A runs: `u2a_overrides`, else the package default."""
        return self.u2a_overrides.get(name, u2a_defaults()[name])

    def u2a_variants(self, loss_type: str) -> dict[str, dict[str, Any]]:
        """U2A method name -> the U2AConfig overrides of that variant, for `loss_type`."""
        variants: dict[str, dict[str, Any]] = {}
        if "u2a" in self.methods:
            variants["u2a"] = {}
        if "u2a-select" in self.methods:
            variants["u2a-select"] = {"weight_lr": 0.0}
        for name in self.preconditioners:
            if name != self.u2a_value("preconditioner"):
                variants[f"u2a-{name}"] = {"preconditioner": name}
        if self.variant_losses is None or loss_type in self.variant_losses:
            for eta in self.temperatures:
                if eta not in (0.0, self.u2a_value("weight_lr")):
                    variants[f"u2a-w{eta:g}"] = {"weight_lr": eta}
            if self.untempered:
                # The paper code's update (sign fixed): `ω ← ω exp(s/std(s))`, no clip, no cap
                variants["u2a-untempered"] = {"weight_lr": 1.0, "score_clip": 1e6, "max_weight": 1e6}
            for b in self.extra_budgets:
                if b != self.u2a_value("budget"):
                    variants[f"u2a-b{b:g}"] = {"budget": b}
            variants.update(self.variants)
        return variants

    def start_model_settings(self, seed: int) -> dict[str, Any]:
        """Everything the start model depends on (besides the data, hashed separately)."""
        keys = (
            "n_prompts",
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "sft_epochs",
            "sft_learning_rate",
            "sft_batch_size",
            "max_length",
        )
        return {"version": START_MODEL_VERSION, "seed": seed, **{k: getattr(self, k) for k in keys}}


def u2a_defaults() -> dict[str, Any]:
    """`U2AConfig`'s own field defaults (the package defaults), read from the dataclass, never copied here."""
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(U2AConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
