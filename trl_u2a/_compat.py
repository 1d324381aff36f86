"""Every private TRL / transformers / torch name that trl-u2a relies on, why, and the versions it was checked on.

A release that renames one, or changes the parameters of one, fails `tests/test_compat.py` instead of a user's run:
the test resolves each entry below against the installed packages and checks that every private hook U2ATrainer
overrides is listed here. When a new release passes, add it to `CHECKED_ON`; when one breaks, adapt the code and the
entry together.
"""

from __future__ import annotations

from dataclasses import dataclass

# The versions on which tests/test_compat.py resolved every entry below: the floor (.ci/floor.txt) and the latest of
# the supported range (trl 1.15.0 resolves them too, but its fused LM head cannot run on a CPU)
CHECKED_ON = {
    "trl": ("1.15.0", "1.16.0"),
    "transformers": ("5.18.0", "5.25.0"),
    "peft": ("0.16.0", "0.21.2"),
    "accelerate": ("1.10.1", "1.16.0"),
    "torch": ("2.13.0",),
}


@dataclass(frozen=True)
class PrivateName:
    """One private name. `kind` says how the test checks it:

    - `"method"`: `owner.name` is a function whose parameters are `params` (an overridden hook or a called method);
    - `"function"`: the same for a module-level function (`owner` is the module);
    - `"attribute"`: `owner.__init__` assigns `self.name`;
    - `"class_attribute"`: `owner` has the attribute `name`;
    - `"source"`: the text `name` occurs in the source of `owner` (a value or a keyword U2A passes).
    """

    owner: str
    name: str
    kind: str
    why: str
    params: tuple[str, ...] | None = None


PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # ---- KTOTrainer hooks overridden by U2ATrainer
    PrivateName(
        "trl.KTOTrainer",
        "_prepare_dataset",
        "method",
        "U2A tokenizes its own formats (negatives, retain rows, ids and weights) where KTO prepares its rows",
        ("self", "dataset", "processing_class", "args", "dataset_name"),
    ),
    PrivateName(
        "trl.KTOTrainer",
        "_set_signature_columns_if_needed",
        "method",
        "keeps U2A's columns (negative_id, weight, ref_logps) through Trainer's column removal",
        ("self",),
    ),
    PrivateName(
        "trl.KTOTrainer",
        "_precompute_ref_logps",
        "method",
        "NPO's reference log-probs are computed in memory (sharded across ranks) instead of KTO's cached pass",
        ("self", "dataset", "name", "batch_size"),
    ),
    PrivateName(
        "trl.KTOTrainer",
        "_get_train_sampler",
        "method",
        "U2A's weighted negative sampler replaces KTO's sequential/random sampler",
        ("self", "train_dataset"),
    ),
    PrivateName(
        "trl.KTOTrainer",
        "_save_checkpoint",
        "method",
        "a checkpoint also holds U2A's state (weights, sampler, refresh history), written atomically",
        ("self", "model", "trial"),
    ),
    PrivateName(
        "transformers.Trainer",
        "_save_rng_state",
        "method",
        "U2A's state is saved beside the RNG state, inside the same checkpoint step",
        ("self", "output_dir"),
    ),
    PrivateName(
        "transformers.Trainer",
        "_load_from_checkpoint",
        "method",
        "resuming restores U2A's state with the model",
        ("self", "resume_from_checkpoint", "model"),
    ),
    PrivateName(
        "transformers.Trainer",
        "_issue_warnings_after_load",
        "method",
        "overridden: a tied weight's key (lm_head.weight) is dropped from the missing keys reported on resume",
        ("self", "load_result"),
    ),
    PrivateName("trl.KTOTrainer", "_tag_names", "class_attribute", "model-card and Hub tags of U2A"),
    PrivateName("trl.KTOTrainer", "_name", "class_attribute", "trainer name in the model card"),
    PrivateName("trl.KTOTrainer", "_paper", "class_attribute", "paper title, id and citation in the model card"),
    # ---- KTOTrainer / Trainer methods and attributes read or written
    PrivateName(
        "transformers.Trainer",
        "_get_learning_rate",
        "method",
        "the refresh step size follows the current learning rate",
        ("self",),
    ),
    PrivateName(
        "trl.KTOTrainer",
        "compute_ref_log_probs",
        "method",
        "NPO's reference log-probs of a batch, as KTO computes them (PEFT adapter disabled, DeepSpeed engine)",
        ("self", "model", "inputs"),
    ),
    PrivateName("trl.KTOTrainer", "_metrics", "attribute", "U2A's per-batch metrics are logged through KTO's log()"),
    PrivateName("transformers.Trainer", "_signature_columns", "attribute", "set by the hook above"),
    PrivateName(
        "trl.KTOTrainer",
        "aux_loss_enabled",
        "attribute",
        "the MoE router loss is added when KTO would add it (model returns router logits, coefficient not 0)",
    ),
    PrivateName("trl.KTOTrainer", "router_aux_loss_coef", "attribute", "the coefficient KTO resolved from the config"),
    PrivateName(
        "trl.KTOTrainer",
        "precompute_ref_logps",
        "attribute",
        "set by U2A to whether its rows carry reference log-probs",
    ),
    PrivateName(
        "trl.KTOTrainer",
        'calculate_kl = args.loss_type not in ["apo_zero_unpaired"]',
        "source",
        "U2A's loss_type names an unlearning loss; KTO sees 'apo_zero_unpaired', its one loss without the KL term "
        "(which would force sequential sampling and extra forwards), during its constructor only",
    ),
    PrivateName(
        "trl.KTOTrainer",
        "args.precompute_ref_log_probs and not self.is_fsdp_enabled",
        "source",
        "KTO keeps no reference model in memory when precompute_ref_log_probs is set: U2A sets it unless the KL "
        "retain term needs one",
    ),
    # ---- module-level helpers
    PrivateName(
        "trl.trainer.kto_trainer",
        "hash_module",
        "function",
        "replaced during construction: KTO hashes every parameter to name a cache U2A never reads",
        ("module",),
    ),
    PrivateName(
        "trl.trainer.kto_trainer",
        "create_model_from_path",
        "function",
        "replaced during construction: under FSDP without PEFT, KTO loads a reference copy U2A never reads",
        ("model_id", "architecture", "kwargs"),
    ),
    PrivateName(
        "trl.trainer.utils",
        "add_fused_lm_head",
        "function",
        "KTO adds the fused head; U2A calls the model with fused_lm_head=True and reads outputs.log_probs",
        ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
    ),
    PrivateName("trl.trainer.utils.FusedCausalLMOutput", "log_probs", "class_attribute", "per-token log-probs"),
    PrivateName(
        "trl.trainer.utils",
        "use_adapter",
        "function",
        "the reference model under PEFT is the model with its adapter disabled (KL retain term, alignment scores)",
        ("model", "adapter_name"),
    ),
    PrivateName(
        "trl.models.utils",
        "disable_gradient_checkpointing",
        "function",
        "reference forwards run without gradient checkpointing",
        ("model", "gradient_checkpointing_kwargs"),
    ),
    PrivateName(
        "trl.models",
        "prepare_deepspeed",
        "function",
        "an inference engine for NPO's reference pass before train() builds the training engine",
        ("model", "accelerator"),
    ),
    PrivateName(
        "trl.trainer.utils",
        "generate_model_card",
        "function",
        "U2A's model card is TRL's with a U2A section",
        (
            "base_model",
            "model_name",
            "hub_model_id",
            "dataset_name",
            "tags",
            "wandb_url",
            "trackio_url",
            "trainer_name",
            "trainer_citation",
            "template_file",
            "paper_title",
            "paper_id",
            "comet_url",
        ),
    ),
    PrivateName("trl.trainer.utils", "get_comet_experiment_url", "function", "the model card's Comet link", ()),
    PrivateName("trl.trainer.utils", "get_trackio_space_url", "function", "the model card's Trackio link", ()),
    PrivateName(
        "torch.distributed.distributed_c10d",
        "_set_pg_timeout",
        "function",
        "ddp_timeout applied to the process group accelerate already created",
        ("timeout", "group"),
    ),
    PrivateName(
        "torch._dynamo.eval_frame.OptimizedModule",
        "_orig_mod",
        "attribute",
        "the influence hooks attach to the module a torch.compile wrapper holds",
    ),
)
