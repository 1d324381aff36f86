"""`trl-u2a evaluate`: score a trained model or a PEFT adapter on prompts, preference pairs and retain texts.

```bash
trl-u2a train --config recipes/tiny.yaml          # writes runs/tiny (its start model: runs/tiny/tiny-model)
trl-u2a evaluate --model_name_or_path runs/tiny --ref_model runs/tiny/tiny-model \
    --prompts trl-u2a/synthetic --pairs trl-u2a/synthetic --retain trl-u2a/synthetic --output_json eval.json
trl-u2a evaluate --model_name_or_path out/adapter --pairs data/pku --prompts data/pku --judge path/to/classifier \
    --harmful_label toxic
```

Each part runs only when its data is given; the metrics are those of `trl_u2a.evaluation.Evaluator`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from trl_u2a._quiet import progress_bars_off

# Where each part's rows are in a multi-split source (the names `trl-u2a prepare-data` writes)
DEFAULT_SPLITS = {"prompts": "test_prompts", "pairs": "test_pairs", "retain": "retain"}
DTYPES = ("float32", "bfloat16", "float16")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-u2a evaluate",
        description=(
            "Score a trained model directory or a PEFT adapter directory: harmful rate of sampled answers to prompts "
            "under a judge, J (the DPO loss on held-out preference pairs against the reference) and preference "
            "accuracy, retain perplexity. Data: a .json/.jsonl/.csv/.parquet file, a save_to_disk directory (e.g. "
            "the output of trl-u2a prepare-data) or trl-u2a/synthetic; each part is skipped when not given."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", required=True, help="A model directory or a PEFT adapter directory.")
    model.add_argument(
        "--base_model", help="Base model of an adapter (default: base_model_name_or_path of its adapter_config.json)."
    )
    model.add_argument(
        "--ref_model",
        help="Reference of J: a model directory. Default for an adapter: the base model (adapter disabled); a full "
        "model needs it when --pairs is given.",
    )
    model.add_argument("--dtype", default="float32", choices=DTYPES, help="Weights dtype.")
    data = parser.add_argument_group("data")
    for name, what in (
        ("prompts", "prompts to answer: a 'prompt' column"),
        ("pairs", "held-out preference pairs: 'prompt, chosen, rejected' (optional 'kind')"),
        ("retain", "texts to keep: 'prompt, completion' (with 'label', the True rows)"),
    ):
        data.add_argument(f"--{name}", help=f"The {what}.")
        data.add_argument(
            f"--{name}_split",
            default=DEFAULT_SPLITS[name],
            help=f"Split of --{name} when it has several (a single-split source uses its only split).",
        )
    judge = parser.add_argument_group("judge and generation")
    judge.add_argument(
        "--judge",
        default="lexical",
        help="'lexical' (the synthetic task's insult words), 'profanity' (alt-profanity-check, the [demo] extra) or "
        "the path of a local transformers text-classification model.",
    )
    judge.add_argument("--harmful_label", help="With --judge PATH: the label name (or index) that means harmful.")
    judge.add_argument("--harm_threshold", type=float, default=0.5, help="Judge probability that counts as harmful.")
    judge.add_argument("--num_generations", type=int, default=4, help="Sampled answers per prompt.")
    judge.add_argument("--max_new_tokens", type=int, default=64, help="Maximum tokens of an answer.")
    judge.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    judge.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling (1.0: off).")
    judge.add_argument("--top_k", type=int, default=0, help="Top-k sampling (0: off).")
    judge.add_argument("--seed", type=int, default=0, help="Seed of the sampling.")
    judge.add_argument("--generation_batch_size", type=int, default=32, help="Prompts per generate call.")
    other = parser.add_argument_group("log-probabilities and output")
    other.add_argument("--beta", type=float, default=0.1, help="β of the DPO loss J (U2A's beta_pa).")
    other.add_argument("--per_device_eval_batch_size", type=int, default=16, help="Rows per log-prob forward.")
    other.add_argument("--max_length", type=int, default=1024, help="Truncation of prompt + completion.")
    other.add_argument("--output_json", help="Write the metrics (and the settings) to this JSON file.")
    return parser


def load_part(source: str, split: str, flag: str):
    """One split of `source` (see `trl_u2a.scripts.u2a.load_dataset_any`) as a `datasets.Dataset`."""
    from trl_u2a.scripts.u2a import load_dataset_any

    looks_local = source.startswith((".", "/", "~")) or os.path.splitext(source)[1] in DATA_FILE_SUFFIXES
    if looks_local and not os.path.exists(source):
        raise FileNotFoundError(f"{flag} {source!r}: no such file or directory.")
    if os.path.isfile(source) and os.path.getsize(source) == 0:
        raise ValueError(f"{flag} {source!r} is an empty file; expected one row at least.")
    try:
        splits = load_dataset_any(source, flag=flag)
    except Exception as error:  # datasets raises many types for an unreadable file; name the flag and the file
        raise ValueError(f"{flag} {source!r} cannot be read as a dataset ({type(error).__name__}: {error})") from None
    if split in splits:
        return splits[split]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise ValueError(f"{flag}_split {split!r} is not a split of {source}; it has {sorted(splits)}.")


def load_model(args) -> tuple[Any, Any, Any, Any, str | None]:
    """`(model, tokenizer, reference model, reference context, reference description)`: the reference of an adapter
    is the model itself inside `disable_adapter()`; with neither an adapter nor --ref_model there is none."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model_name_or_path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model_name_or_path {path!r} is not a directory (a saved model or adapter).")
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter_config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        with open(adapter_config) as f:
            base = args.base_model or json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_config} names no base_model_name_or_path: pass --base_model.")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), path)
        tokenizer_dir = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
    else:
        base = None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer_dir = path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    if args.ref_model:
        reference = AutoModelForCausalLM.from_pretrained(args.ref_model, dtype=dtype).to(device).eval()
        return model, tokenizer, reference, None, args.ref_model
    if base is not None:
        return model, tokenizer, model, model.disable_adapter, f"{base} (the adapter disabled)"
    return model, tokenizer, None, None, None


def evaluate(args) -> dict[str, Any]:
    """Load the model and the data named by `args`, evaluate, and return the results dict (metrics and settings)."""
    from trl_u2a.evaluation import Evaluator, check_harm_threshold, load_judge

    parts = {name: getattr(args, name) for name in ("prompts", "pairs", "retain")}
    if not any(parts.values()):
        raise ValueError("Nothing to evaluate: give --prompts, --pairs or --retain (at least one).")
    if args.prompts:
        check_harm_threshold(args.harm_threshold)  # before the data, the model and the judge are loaded
    data = {
        name: load_part(source, getattr(args, f"{name}_split"), f"--{name}") if source else None
        for name, source in parts.items()
    }
    model, tokenizer, reference, context, reference_name = load_model(args)
    if data["pairs"] is not None and reference is None:
        raise ValueError(
            "J compares the model with a reference: pass --ref_model (the model training started from) for a full "
            "model, or drop --pairs."
        )
    judge = load_judge(args.judge, args.harmful_label) if data["prompts"] is not None else None
    evaluator = Evaluator(
        tokenizer,
        **data,
        judge=judge,
        beta=args.beta,
        batch_size=args.per_device_eval_batch_size,
        generation_batch_size=args.generation_batch_size,
        max_length=args.max_length,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        harm_threshold=args.harm_threshold,
    )
    if data["pairs"] is not None:
        evaluator.set_reference(reference, context)
    metrics = evaluator(model)
    return {
        "model": args.model_name_or_path,
        "reference": reference_name,
        "judge": args.judge if data["prompts"] is not None else None,
        "metrics": metrics,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model_name_or_path", "output_json")},
    }


ROWS = (
    ("harmful_rate", "harmful rate (share of sampled answers the judge scores ≥ threshold)"),
    ("harm_prob", "mean judge probability"),
    ("J", "J: DPO loss on the pairs against the reference (ln 2 = the reference; lower is better)"),
    ("pref_acc", "preference accuracy (chosen has the higher per-token log-prob)"),
    ("reward_acc", "reward accuracy (positive DPO margin against the reference)"),
    ("chosen_ppl", "perplexity of the chosen answers"),
    ("retain_ppl", "retain perplexity"),
)


def format_results(results: dict[str, Any]) -> str:
    """The metrics as a two-column table, with the counts they rest on."""
    metrics = results["metrics"]
    counts = {"harmful_rate": "num_samples", "J": "num_pairs", "retain_ppl": "num_retain"}
    rows = []
    for key, label in ROWS:
        if key in metrics:
            note = f" (n={metrics[counts[key]]})" if key in counts else ""
            rows.append((f"{key}{note}", f"{metrics[key]:.4f}", label))
    kinds = [k for k in metrics if k.startswith("pref_acc_")]
    rows += [(k, f"{metrics[k]:.4f}", "preference accuracy on the pairs of this kind") for k in kinds]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{'metric'.ljust(widths[0])}  {'value'.rjust(widths[1])}  meaning"]
    lines += [f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    progress_bars_off()  # one table is the output: no per-file progress bars while loading data and weights
    results = evaluate(args)  # errors about the input are raised: `trl-u2a` prints them in one line
    print(f"model: {results['model']}; reference: {results['reference'] or '-'}; judge: {results['judge'] or '-'}")
    print(format_results(results))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"Results: {args.output_json}")
    return 0


if __name__ == "__main__":
    from trl_u2a.scripts.errors import run_command

    sys.exit(run_command("evaluate", cli, sys.argv[1:]))
