"""Score negatives by their influence on the alignment objective, without training, and write the scores.

```bash
trl-u2a score --config recipes/score_tiny.yaml
trl-u2a score --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name data/pku --dataset_train_split forget \
    --alignment_split alignment --output scores.parquet --use_peft --lora_target_modules all-linear
```
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from trl_u2a.scripts.u2a import TINY_MODEL, U2AScriptArguments


@dataclass
class ScoreArguments(U2AScriptArguments):
    """Arguments of `trl-u2a score`: the datasets (as for `trl-u2a train`) and the scoring settings.

    Parameters:
        output (`str`, *optional*, defaults to `"scores.jsonl"`):
            Where to write the scored negatives: `.jsonl` or `.parquet`.
        loss_type (`str`, *optional*, defaults to `"npo"`):
            Unlearning loss whose gradient is scored.
        beta (`float`, *optional*):
            Temperature of `npo`/`simnpo` (defaults 0.1 / 4.5).
        gamma (`float`, *optional*, defaults to `0.0`):
            Margin of `simnpo`.
        beta_pa (`float`, *optional*, defaults to `0.1`):
            β of the DPO alignment objective.
        preconditioner (`str`, *optional*, defaults to `"identity"`):
            `"identity"` or `"fisher"`.
        damping (`float`, *optional*, defaults to `0.0`):
            Damping added to the diagonal preconditioner.
        batch_size (`int`, *optional*, defaults to `8`):
            Batch size of the scoring passes.
        max_length (`int`, *optional*, defaults to `1024`):
            Maximum tokenized length of a prompt + completion.
        output_dir (`str`, *optional*, defaults to `"u2a-scores"`):
            Working directory (the offline tiny model is built there when `trl-u2a/tiny` is asked for).
    """

    output: str = field(default="scores.jsonl", metadata={"help": "Output file: .jsonl or .parquet."})
    loss_type: str = field(
        default="npo",
        metadata={"help": "Unlearning loss whose gradient is scored.", "choices": ["ga", "graddiff", "npo", "simnpo"]},
    )
    beta: float | None = field(default=None, metadata={"help": "Temperature of npo (0.1) / simnpo (4.5)."})
    gamma: float = field(default=0.0, metadata={"help": "Margin of simnpo."})
    beta_pa: float = field(default=0.1, metadata={"help": "β of the DPO alignment objective."})
    preconditioner: str = field(
        default="identity", metadata={"help": "'identity' or 'fisher'.", "choices": ["identity", "fisher"]}
    )
    damping: float = field(default=0.0, metadata={"help": "Damping added to the diagonal preconditioner."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of the scoring passes."})
    max_length: int = field(default=1024, metadata={"help": "Maximum tokenized length of prompt + completion."})
    output_dir: str = field(default="u2a-scores", metadata={"help": "Working directory."})


def main(script_args: ScoreArguments, model_args) -> str:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_u2a.checks import check_causal_lm
    from trl_u2a.scoring import score_negatives
    from trl_u2a.scripts.u2a import load_alignment, load_dataset_any, resolve_model

    path = resolve_model(model_args.model_name_or_path, script_args.output_dir)  # before any data is loaded
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required (a hub id, a local file or directory, or trl-u2a/synthetic).")
    if os.path.splitext(script_args.output)[1] not in (".jsonl", ".parquet"):
        raise ValueError(f"--output={script_args.output!r} must end in .jsonl or .parquet.")
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config, script_args.synthetic_seed)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"--dataset_train_split={script_args.dataset_train_split!r} is not a split of {script_args.dataset_name}; "
            f"it has {sorted(dataset)}."
        )
    alignment = load_alignment(script_args, dataset)
    if alignment is None:
        raise ValueError(
            f"--alignment_split={script_args.alignment_split!r} is not a split of {script_args.dataset_name}; it has "
            f"{sorted(dataset)}. Scoring needs an alignment set: name that split, or give --alignment_dataset_name."
        )

    if model_args.model_name_or_path != TINY_MODEL:
        # AutoModelForCausalLM loads a classifier's body under a random LM head without a word
        check_causal_lm(model_args.model_name_or_path, "--model_name_or_path")
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=getattr(torch, dtype),
        quantization_config=get_quantization_config(model_args),
    )
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    if torch.cuda.is_available():
        model = model.to("cuda")

    scored = score_negatives(
        model,
        tokenizer,
        dataset[script_args.dataset_train_split],
        alignment,
        loss_type=script_args.loss_type,
        preconditioner=script_args.preconditioner,
        damping=script_args.damping,
        beta=script_args.beta,
        gamma=script_args.gamma,
        beta_pa=script_args.beta_pa,
        batch_size=script_args.batch_size,
        max_length=script_args.max_length,
    )
    os.makedirs(os.path.dirname(os.path.abspath(script_args.output)), exist_ok=True)
    if script_args.output.endswith(".parquet"):
        scored.to_parquet(script_args.output)
    else:
        scored.to_json(script_args.output, lines=True)
    positive = sum(s > 0 for s in scored["score"])
    print(f"Scored {len(scored)} negatives ({positive} with a positive score) -> {script_args.output}")
    return script_args.output


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, TrlParser

    dataclass_types = (ScoreArguments, ModelConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("score", help="Score negatives", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    parser.usage = "%(prog)s [--config SCORE.yaml] [--OPTION VALUE ...]"
    return parser


def cli(argv: list[str] | None = None) -> str:
    from trl_u2a.checks import read_text_file

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv[:-1]:
        read_text_file(argv[argv.index("--config") + 1], "--config")  # TrlParser's own error names no file
    script_args, model_args = make_parser(prog="trl-u2a score").parse_args_and_config(args=argv)
    return main(script_args, model_args)


if __name__ == "__main__":
    import sys

    from trl_u2a.scripts.errors import run_command

    sys.exit(run_command("score", cli, sys.argv[1:]))
