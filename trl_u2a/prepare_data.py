"""`trl-u2a prepare-data`: build the paper's splits from a preference dataset.

```bash
trl-u2a prepare-data --dataset PKU-Alignment/PKU-SafeRLHF --output_dir data/pku
trl-u2a prepare-data --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs --output_dir data/uf
trl-u2a train --config recipes/pku_saferlhf.yaml      # reads data/pku
```

The source is a hub dataset id, a local data file (.json/.jsonl/.parquet/.csv) or a `save_to_disk` directory, in one
of three schemas:

- `pku_saferlhf`: `prompt, response_0, response_1, safer_response_id` (and `is_response_0_safe`,
  `is_response_1_safe`). The safer response is chosen. When the safety labels are present, only pairs with exactly
  one safe response are kept (as in the paper's code), so every rejected response is unsafe; `--pku_all_pairs` keeps
  every pair.
- `ultrafeedback`: `prompt, chosen, rejected` where `chosen` and `rejected` are chat message lists; the last
  assistant turn is the response, and the messages before it the prompt when there is no `prompt` column.
- `preference`: `prompt, chosen, rejected` strings.

Every pair is assigned, by its prompt, to one of three disjoint prompt sets, so that no prompt is shared between
splits:

- test: `--num_test_prompts` prompts (`test_prompts`, one row per prompt, and their pairs `test_pairs`, also saved as
  `test` for evaluation during training);
- alignment: `--alignment_fraction` of the other prompts; all their pairs form `alignment`, the held-out preference
  set that defines the alignment objective;
- train: the rest. Each train pair contributes one response to `original`, the SFT mix that makes the start model
  misaligned: the rejected response for exactly `round(rejected_fraction * pairs)` pairs drawn at random, the chosen
  one for the others. `forget` holds those rejected responses (`label=False`), `retain` the chosen ones
  (`label=True`), and `train` is `forget` then `retain` (unpaired rows: negative `i` of `train` is row `i` of
  `forget`), what `trl-u2a train` reads by default.

Every row keeps `prompt_id` (the index of its prompt) and `source_row` (its row in the source dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any

from .checks import check_prepare_output_dir, load_data_file

SCHEMAS = ("pku_saferlhf", "ultrafeedback", "preference")
SCHEMA_COLUMNS = {
    "pku_saferlhf": ("prompt", "response_0", "response_1", "safer_response_id"),
    "ultrafeedback": ("chosen", "rejected"),
    "preference": ("prompt", "chosen", "rejected"),
}
DATA_FILE_EXTENSIONS = ("json", "jsonl", "parquet", "csv")
MANIFEST = "u2a_prepare_data.json"


# ------------------------------------------------------------------------------------------------------------ loading
def load_source(dataset: str, config: str | None = None, split: str = "train"):
    """Load one split of a hub dataset, a local data file or a `save_to_disk` directory as a `datasets.Dataset`."""
    from datasets import Dataset, load_dataset, load_from_disk

    if os.path.isdir(dataset) and (
        os.path.exists(os.path.join(dataset, "dataset_dict.json"))
        or os.path.exists(os.path.join(dataset, "state.json"))
    ):
        loaded = load_from_disk(dataset)
        return loaded if isinstance(loaded, Dataset) else _pick_split(loaded, split, dataset)
    extension = os.path.splitext(dataset)[1].lstrip(".").lower()
    if extension in DATA_FILE_EXTENSIONS:
        if not os.path.isfile(dataset):
            raise FileNotFoundError(f"--dataset {dataset!r} looks like a local data file, but there is no such file.")
        return load_data_file(dataset, "--dataset")["train"]
    if os.path.isdir(dataset):
        # A directory of data files (or a local copy of a hub repository): the builder is inferred from its files
        return _pick_split(load_dataset(dataset, name=config), split, dataset)
    return load_hub_dataset(dataset, "--dataset", name=config, split=split)


class HubUnreachableError(ConnectionError):
    """A dataset id that is no local path and cannot be loaded from the Hub; the message is one line."""


def hub_unreachable_message(name: str, flag: str, why: str, offline: bool = False) -> str:
    cache = (
        "offline mode is on (HF_HUB_OFFLINE) and the Hugging Face cache has no copy of it"
        if offline
        else "with a copy in the Hugging Face cache, set HF_HUB_OFFLINE=1 to use it"
    )
    return (
        f"{flag} {name!r} is not a local path and cannot be loaded from the Hub ({why}). Offline, pass a local "
        "path instead: a .json/.jsonl/.parquet/.csv file, or a directory written by Dataset.save_to_disk (read with "
        f"datasets.load_from_disk); {cache}."
    )


def load_hub_dataset(dataset_id: str, flag: str = "--dataset", timeout: float = 3.0, **kwargs):
    """`datasets.load_dataset(dataset_id, **kwargs)` for a Hub id, failing in seconds and in one line when the Hub
    cannot be reached (without this, `datasets` retries for 20-30 s and raises its raw `ConnectionError`/`OSError`)."""
    import socket
    from urllib.parse import urlparse

    import datasets
    from huggingface_hub import constants

    if not datasets.config.HF_HUB_OFFLINE:
        # One TCP connect with a short timeout tells "no network" apart before any retry loop starts
        endpoint = urlparse(constants.ENDPOINT)
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        except OSError as error:
            why = f"{endpoint.hostname}:{port} unreachable: {error.strerror or type(error).__name__}"
            raise HubUnreachableError(hub_unreachable_message(dataset_id, flag, why)) from None
    try:
        return datasets.load_dataset(dataset_id, **kwargs)
    except (ConnectionError, OSError) as error:
        if isinstance(error, FileNotFoundError) and not datasets.config.HF_HUB_OFFLINE:
            raise  # the Hub answered: the id or file does not exist, and datasets' message says which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        offline = bool(datasets.config.HF_HUB_OFFLINE)
        raise HubUnreachableError(hub_unreachable_message(dataset_id, flag, first_line, offline)) from None


def _pick_split(splits, split: str, name: str):
    if split in splits:
        return splits[split]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise ValueError(f"--split {split!r} is not a split of {name}; it has {sorted(splits)}.")


# ------------------------------------------------------------------------------------------------------------ schemas
def detect_schema(dataset) -> str:
    """The schema of `dataset` (one of `SCHEMAS`) from its columns and first row, or a ValueError naming the columns
    seen and the schemas supported."""
    columns = set(dataset.column_names)
    if set(SCHEMA_COLUMNS["pku_saferlhf"]) <= columns:
        return "pku_saferlhf"
    if {"chosen", "rejected"} <= columns and len(dataset):
        if isinstance(dataset[0]["chosen"], list):
            return "ultrafeedback"
        if "prompt" in columns:
            return "preference"
    raise ValueError(_schema_error(columns))


def _schema_error(columns, schema: str | None = None) -> str:
    supported = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in SCHEMA_COLUMNS.items())
    head = f"The dataset has columns {sorted(columns)}"
    if schema is not None:
        head += f", which do not fit --format {schema}"
    return f"{head}. Supported schemas (--format) and their columns: {supported}."


def to_pairs(dataset, schema: str | None = None, pku_all_pairs: bool = False) -> tuple[list[dict[str, Any]], dict]:
    """Rows of `prompt, chosen, rejected` (message lists for the prompt, strings for the responses) and the counts of
    rows dropped, by reason.

    Prompts are kept as message lists (`[{"role": "user", "content": ...}]` for a string prompt) so that multi-turn
    prompts survive; `build_splits` renders them as strings for the standard format.
    """
    columns = set(dataset.column_names)
    if schema is None:
        schema = detect_schema(dataset)
    if schema not in SCHEMAS:
        raise ValueError(f"--format {schema!r} is not supported; expected one of {list(SCHEMAS)}.")
    if not set(SCHEMA_COLUMNS[schema]) <= columns:
        raise ValueError(_schema_error(columns, schema))

    pairs, dropped = [], {"invalid": 0, "identical": 0, "same_safety": 0}
    data = dataset.to_dict()
    for i in range(len(dataset)):
        row = {c: data[c][i] for c in data}
        if schema == "pku_saferlhf":
            pair = _pku_pair(row, i, pku_all_pairs)
            if pair is None:
                dropped["same_safety"] += 1
                continue
        else:
            pair = _preference_pair(row, schema, i)
        if not pair["prompt"] or not pair["chosen"] or not pair["rejected"]:
            dropped["invalid"] += 1
            continue
        if pair["chosen"] == pair["rejected"]:
            dropped["identical"] += 1
            continue
        pairs.append({**pair, "source_row": i})
    return pairs, dropped


def _pku_pair(row: dict[str, Any], index: int, all_pairs: bool) -> dict[str, Any] | None:
    safer = row["safer_response_id"]
    if safer not in (0, 1):
        raise ValueError(f"pku_saferlhf: 'safer_response_id' must be 0 or 1; row {index} has {safer!r}.")
    safe = (row.get("is_response_0_safe"), row.get("is_response_1_safe"))
    if not all_pairs and None not in safe and safe[0] == safe[1]:
        return None  # both safe or both unsafe: the rejected response would not be a harmful one
    return {
        "prompt": _user_turn(row["prompt"]),
        "chosen": _text(row[f"response_{safer}"]),
        "rejected": _text(row[f"response_{1 - safer}"]),
    }


def _preference_pair(row: dict[str, Any], schema: str, index: int) -> dict[str, Any]:
    chosen, rejected = row["chosen"], row["rejected"]
    if schema == "ultrafeedback":
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
                raise ValueError(
                    f"ultrafeedback: column {name!r} must hold chat message lists; row {index} has "
                    f"{type(value).__name__}. Use --format preference for string responses."
                )
        # The turns before the last assistant turn are the prompt; TRL's explicit-prompt format keeps them in `prompt`
        prompt = _prompt_messages(chosen) or _user_turn(row.get("prompt"))
        return {"prompt": prompt, "chosen": _last_assistant(chosen), "rejected": _last_assistant(rejected)}
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"preference: column {name!r} must hold strings; row {index} has {type(value).__name__}. Use --format "
                "ultrafeedback for chat message lists."
            )
    return {"prompt": _user_turn(row["prompt"]), "chosen": _text(chosen), "rejected": _text(rejected)}


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _user_turn(prompt) -> list[dict[str, str]]:
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    text = _text(prompt)
    return [{"role": "user", "content": text}] if text else []


def _prompt_messages(messages: list[dict]) -> list[dict[str, str]]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    return [dict(m) for m in messages[:last]] if last is not None else []


def _last_assistant(messages: list[dict]) -> str:
    turns = [m.get("content") for m in messages if m.get("role") == "assistant"]
    return _text(turns[-1]) if turns else ""


# ------------------------------------------------------------------------------------------------------------- splits
def build_splits(
    pairs: list[dict[str, Any]],
    alignment_fraction: float = 0.2,
    rejected_fraction: float = 0.65,
    num_test_prompts: int = 2000,
    seed: int = 0,
    conversational: bool = False,
):
    """Split preference pairs by prompt into the U2A splits (see the module docstring); returns a `DatasetDict`."""
    from datasets import Dataset, DatasetDict

    if not 0.0 < alignment_fraction < 1.0:
        raise ValueError(f"alignment_fraction={alignment_fraction} must be in (0, 1).")
    if not 0.0 < rejected_fraction < 1.0:
        raise ValueError(f"rejected_fraction={rejected_fraction} must be in (0, 1).")
    if isinstance(num_test_prompts, bool) or not isinstance(num_test_prompts, int) or num_test_prompts < 0:
        raise ValueError(f"num_test_prompts={num_test_prompts!r} must be an integer ≥ 0.")

    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for pair in pairs:
        by_prompt.setdefault(json.dumps(pair["prompt"], sort_keys=True), []).append(pair)
    keys = list(by_prompt)
    rng = random.Random(seed)
    rng.shuffle(keys)
    rest = len(keys) - num_test_prompts
    num_alignment = max(round(alignment_fraction * rest), 0)
    train_keys = keys[num_test_prompts + num_alignment :]
    num_train_pairs = sum(len(by_prompt[k]) for k in train_keys)
    if rest < 2 or num_alignment < 1 or num_train_pairs < 2:
        raise ValueError(_too_few_message(len(pairs), len(keys), num_test_prompts, alignment_fraction))
    test_keys, alignment_keys = keys[:num_test_prompts], keys[num_test_prompts : num_test_prompts + num_alignment]
    prompt_id = {key: i for i, key in enumerate(sorted(keys))}

    def rows(split_keys):
        return [{"prompt_id": prompt_id[k], **pair} for k in split_keys for pair in by_prompt[k]]

    train_pairs = rows(train_keys)
    num_rejected = round(rejected_fraction * len(train_pairs))
    num_rejected = min(max(num_rejected, 1), len(train_pairs) - 1)
    rejected = set(rng.sample(range(len(train_pairs)), num_rejected))
    original = []
    for i, pair in enumerate(train_pairs):
        label = i not in rejected
        completion = pair["chosen"] if label else pair["rejected"]
        original.append(_unpaired(pair, completion, label))
    forget = [row for row in original if not row["label"]]
    retain = [row for row in original if row["label"]]
    test_pairs = rows(test_keys)
    test_prompts = [{"prompt_id": prompt_id[k], "prompt": by_prompt[k][0]["prompt"]} for k in test_keys]

    splits = {
        "alignment": [_paired(pair) for pair in rows(alignment_keys)],
        "original": original,
        "forget": forget,
        "retain": retain,
        "train": forget + retain,
        "test_prompts": test_prompts,
        "test_pairs": [_paired(pair) for pair in test_pairs],
    }
    splits["test"] = splits["test_pairs"]
    render = _conversational_row if conversational else _standard_row
    return DatasetDict({name: _dataset(Dataset, [render(r) for r in data], name) for name, data in splits.items()})


def _too_few_message(num_pairs: int, num_prompts: int, num_test_prompts: int, alignment_fraction: float) -> str:
    """Why the split sizes do not fit the data, with the sizes and the flags (and values) that would."""
    rest = max(num_prompts - num_test_prompts, 0)
    head = (
        f"Too few rows: {num_pairs} usable pairs with {num_prompts} distinct prompts. --num_test_prompts "
        f"{num_test_prompts} holds out {min(num_test_prompts, num_prompts)} prompts for testing, leaving {rest}, and "
        f"--alignment_fraction {alignment_fraction} gives {max(round(alignment_fraction * rest), 0)} of those to the "
        "alignment set; it needs at least 1 alignment prompt and 2 training pairs."
    )
    # The largest test split (at most a tenth of the prompts) that leaves a valid alignment and training part
    for test in range(min(num_test_prompts, num_prompts // 10), -1, -1):
        left = num_prompts - test
        alignment = round(alignment_fraction * left)
        if left >= 2 and 1 <= alignment <= left - 1:
            return f"{head} Pass --num_test_prompts {test} (or fewer) for this dataset, or use a larger dataset."
    return f"{head} Use a dataset with more distinct prompts (at least 3), or adjust --alignment_fraction."


def _unpaired(pair: dict[str, Any], completion: str, label: bool) -> dict[str, Any]:
    keys = ("prompt_id", "source_row", "prompt")
    return {**{k: pair[k] for k in keys}, "completion": completion, "label": label}


def _paired(pair: dict[str, Any]) -> dict[str, Any]:
    return {k: pair[k] for k in ("prompt_id", "source_row", "prompt", "chosen", "rejected")}


def _standard_row(row: dict[str, Any]) -> dict[str, Any]:
    # A multi-turn prompt has no faithful plain-text form: keep the last user turn (--conversational keeps them all)
    users = [m["content"] for m in row["prompt"] if m.get("role") == "user"]
    return {**row, "prompt": users[-1] if users else row["prompt"][-1]["content"]}


def _conversational_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("completion", "chosen", "rejected"):
        if key in row:
            out[key] = [{"role": "assistant", "content": row[key]}]
    return out


def _dataset(dataset_cls, rows: list[dict[str, Any]], name: str):
    if rows:
        return dataset_cls.from_list(rows)
    # Empty splits (e.g. --num_test_prompts 0) still get their columns, so that loaders see a consistent schema
    columns = {"test_prompts": ["prompt_id", "prompt"]}.get(
        name, ["prompt_id", "source_row", "prompt", "chosen", "rejected"]
    )
    return dataset_cls.from_dict({c: [] for c in columns})


# --------------------------------------------------------------------------------------------------------------- main
def prepare_data(
    dataset: str,
    output_dir: str,
    format: str | None = None,
    alignment_fraction: float = 0.2,
    rejected_fraction: float = 0.65,
    num_test_prompts: int = 2000,
    seed: int = 0,
    conversational: bool = False,
    dataset_config: str | None = None,
    split: str = "train",
    pku_all_pairs: bool = False,
):
    """Load `dataset`, build the U2A splits, save them to `output_dir` with `save_to_disk`, and return them with a
    summary (a dict of counts, also written to `output_dir/u2a_prepare_data.json`)."""
    for name, value in (("alignment_fraction", alignment_fraction), ("rejected_fraction", rejected_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"--{name} {value} must be in (0, 1).")
    if format is not None and format not in SCHEMAS:
        raise ValueError(f"--format {format!r} is not supported; expected one of {list(SCHEMAS)}.")
    check_prepare_output_dir(output_dir, MANIFEST)
    source = load_source(dataset, dataset_config, split)
    pairs, dropped = to_pairs(source, format, pku_all_pairs=pku_all_pairs)
    splits = build_splits(pairs, alignment_fraction, rejected_fraction, num_test_prompts, seed, conversational)
    splits.save_to_disk(output_dir)
    summary = {
        "dataset": dataset,
        "split": split,
        "source_rows": len(source),
        "pairs": len(pairs),
        "dropped": dropped,
        "arguments": {
            "format": format,
            "alignment_fraction": alignment_fraction,
            "rejected_fraction": rejected_fraction,
            "num_test_prompts": num_test_prompts,
            "seed": seed,
            "conversational": conversational,
            "pku_all_pairs": pku_all_pairs,
        },
        "splits": {name: {"rows": len(d), "prompts": len(set(d["prompt_id"]))} for name, d in splits.items()},
    }
    with open(os.path.join(output_dir, MANIFEST), "w") as f:
        json.dump(summary, f, indent=2)
    return splits, summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['dataset']} [{summary['split']}]: {summary['source_rows']} rows -> {summary['pairs']} pairs "
        f"(dropped: {', '.join(f'{k} {v}' for k, v in summary['dropped'].items())})",
        f"{'split':<14}{'rows':>9}{'prompts':>9}",
    ]
    lines += [f"{name:<14}{s['rows']:>9}{s['prompts']:>9}" for name, s in summary["splits"].items()]
    original = summary["splits"]["original"]["rows"]
    forget = summary["splits"]["forget"]["rows"]
    lines.append(f"rejected share of original: {forget / original:.3f}")
    return "\n".join(lines)


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build the U2A splits (alignment, original, forget, retain, train, test_prompts, test_pairs) from "
        "a preference dataset and save them with save_to_disk. `trl-u2a train --dataset_name OUTPUT_DIR` then reads "
        "its train split, and its alignment split as the alignment set (--alignment_split alignment).",
        # The defaults (e.g. 2000 test prompts) decide whether a small dataset fits: show them
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="Hub dataset id, local .json/.jsonl/.parquet/.csv file, or save_to_disk directory.",
    )
    parser.add_argument("--output_dir", required=True, help="Where to save the splits (a save_to_disk directory).")
    parser.add_argument(
        "--format",
        choices=SCHEMAS,
        default=None,
        help="Schema of the dataset; detected from its columns when omitted.",
    )
    parser.add_argument(
        "--alignment_fraction",
        type=float,
        default=0.2,
        help="Fraction of the non-test prompts whose pairs form the held-out alignment set.",
    )
    parser.add_argument(
        "--rejected_fraction",
        type=float,
        default=0.65,
        help="Fraction of the train pairs that put their rejected response into 'original'.",
    )
    parser.add_argument(
        "--num_test_prompts",
        type=int,
        default=2000,
        help="Prompts held out for evaluation (test_prompts, test_pairs); lower it for a small dataset, 0 for none.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompt split and of the rejected draw.")
    parser.add_argument(
        "--conversational",
        action="store_true",
        help="Store prompts and responses as chat message lists instead of strings.",
    )
    parser.add_argument("--dataset_config", default=None, help="Configuration name of a hub dataset.")
    parser.add_argument(
        "--split",
        default="train",
        help="Split of the source dataset to read (e.g. train_prefs for HuggingFaceH4/ultrafeedback_binarized).",
    )
    parser.add_argument(
        "--pku_all_pairs",
        action="store_true",
        help="pku_saferlhf: keep pairs whose responses are both safe or both unsafe (chosen = the "
        "safer one); by default only pairs with exactly one safe response are kept.",
    )
    return parser


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser(prog="trl-u2a prepare-data")
    args = parser.parse_args(argv)
    # Errors about the user's input are raised: `trl-u2a` prints them in one line (`scripts.errors`)
    _, summary = _prepare_from_args(args)
    print(format_summary(summary))
    print(f"Saved to {args.output_dir}.")
    return 0


def _prepare_from_args(args):
    return prepare_data(
        dataset=args.dataset,
        output_dir=args.output_dir,
        format=args.format,
        alignment_fraction=args.alignment_fraction,
        rejected_fraction=args.rejected_fraction,
        num_test_prompts=args.num_test_prompts,
        seed=args.seed,
        conversational=args.conversational,
        dataset_config=args.dataset_config,
        split=args.split,
        pku_all_pairs=args.pku_all_pairs,
    )


if __name__ == "__main__":
    from trl_u2a.scripts.errors import run_command

    raise SystemExit(run_command("prepare-data", cli, sys.argv[1:]))
