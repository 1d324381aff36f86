"""Checks of what the user names on the way in: output folders, model sources, data files and config files.

Each check raises one error that names the file, field or flag, the value seen and what is expected, before any model
is loaded or any file is written (the data columns are checked in `data.py`, the numbers in `config.py`).
"""

from __future__ import annotations

import json
import os
import re

# What a finished run or a saved model leaves at the top of its folder (transformers' and PEFT's file names)
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_config.json",
    "adapter_model.safetensors",
)
# Heads that score or label text: a causal LM's log-probabilities are what U2A unlearns and scores
NON_GENERATIVE_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM")
# A JSON `\uXXXX` escape of a surrogate that is not one half of a high+low pair (pyarrow cannot encode it as UTF-8)
_LONE_SURROGATE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def check_not_a_file(output_dir: str, name: str) -> None:
    """An output folder that exists as a file (a typo, or the model file itself) cannot hold a run."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(
            f"{name} {output_dir!r} is an existing file; expected a directory (new, or the run's)."
        )


def check_output_dir(output_dir: str, resume_from_checkpoint=None, overwrite_output_dir: bool = False) -> None:
    """Refuse a training run into a folder that already holds a run (a complete checkpoint) or a saved model, unless
    it resumes or `overwrite_output_dir` is set: the new run would overwrite the model, card and traces and, under
    `save_total_limit`, delete the earlier run's checkpoints."""
    from .safe_state import last_complete_checkpoint

    check_not_a_file(output_dir, "output_dir")
    # The words a command line passes for "no resume" (as `U2ATrainer.train` reads them)
    resuming = resume_from_checkpoint not in (None, False) and str(resume_from_checkpoint).strip().lower() not in (
        "false",
        "none",
        "",
    )
    if resuming or overwrite_output_dir or not os.path.isdir(output_dir):
        return
    found = last_complete_checkpoint(output_dir)
    if found is None:
        found = next(
            (os.path.join(output_dir, f) for f in MODEL_FILES if os.path.isfile(os.path.join(output_dir, f))), None
        )
    if found is not None:
        raise ValueError(
            f"output_dir {output_dir!r} already holds a run ({found}); a new run would overwrite it. Resume it with "
            "--resume_from_checkpoint true, choose another --output_dir, or pass --overwrite_output_dir true to "
            "replace it."
        )


def check_prepare_output_dir(output_dir: str, manifest: str) -> None:
    """`prepare-data` writes only into a new or empty folder, or over its own earlier output (which has `manifest`)."""
    check_not_a_file(output_dir, "--output_dir")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(os.path.join(output_dir, manifest)):
        raise ValueError(
            f"--output_dir {output_dir!r} is not empty and holds no earlier prepare-data output (no {manifest}); the "
            "splits would be written beside its files. Choose a new or empty folder."
        )


def architectures(source) -> list[str]:
    """The model classes of `source` (a model object, a PEFT model, or a local folder / hub id with a config.json);
    empty when they cannot be known without a download."""
    if isinstance(source, str):
        path = os.path.join(source, "config.json")
        if not os.path.isfile(path):
            return []
        try:
            with open(path, encoding="utf-8") as f:
                return list(json.load(f).get("architectures") or [])
        except (OSError, ValueError):
            return []  # from_pretrained reports an unreadable config itself
    base = source.get_base_model() if hasattr(source, "get_base_model") else source
    return [type(base).__name__]


def check_causal_lm(model, name: str = "model") -> None:
    """Refuse a model whose head does not generate text (a reward model, classifier or judge given by mistake)."""
    kinds = architectures(model)
    if kinds and all(k.endswith(NON_GENERATIVE_HEADS) for k in kinds):
        shown = model if isinstance(model, str) else type(model).__name__
        raise ValueError(
            f"{name} {shown!r} is a {kinds[0]}, not a causal language model; U2A unlearns through the "
            "log-probabilities of generated text. Pass the policy to unlearn from (an ...ForCausalLM checkpoint), "
            "not a reward model or classifier."
        )


def check_model_source(name_or_path: str, flag: str = "model_name_or_path") -> None:
    """A model name that is neither an existing folder nor a valid hub id is a path typo: say so, instead of
    huggingface_hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(name_or_path):
        return
    if os.path.exists(name_or_path):
        raise NotADirectoryError(f"{flag} {name_or_path!r} is a file; expected a model folder or a hub id.")
    # `runs/tny` beside a local `runs/` folder is a mistyped path, not the hub id of an organisation `runs`
    looks_local = (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or os.path.isdir(name_or_path.split("/")[0])
    )
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise FileNotFoundError(
            f"{flag} {name_or_path!r}: no such directory (and not a hub id of the form 'namespace/name')."
        )


def check_data_file(path: str, flag: str) -> None:
    """A JSON / JSON Lines data file must be UTF-8 with no lone surrogate escape: name the file and the byte that is
    not. datasets reads some such files with replacement characters (the text silently changed) and fails on others
    with pyarrow's error, which does not name the file."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{flag} {path!r} is not UTF-8 text: byte {offset + error.start} (line {number}) is "
                    f"0x{raw[error.start]:02x}. Data files must be UTF-8; re-encode it (e.g. iconv -f latin1 -t utf-8)."
                ) from None
            match = _LONE_SURROGATE.search(line)
            if match:
                raise ValueError(
                    f"{flag} {path!r} has a lone surrogate escape {match.group()!r} at byte "
                    f"{offset + len(line[: match.start()].encode('utf-8'))} (line {number}): half of a UTF-16 pair, "
                    "which is no character. Fix or drop that text (it is usually a truncated emoji)."
                )
            offset += len(raw)


def load_data_file(path: str, flag: str):
    """A `DatasetDict` with one `train` split from a .json/.jsonl/.csv/.parquet file; a JSON file is checked first
    (`check_data_file`)."""
    from datasets import load_dataset

    extension = os.path.splitext(path)[1].lstrip(".").lower()
    builder = "json" if extension == "jsonl" else extension
    if builder == "json":
        check_data_file(path, flag)
    return load_dataset(builder, data_files={"train": path})


def read_text_file(path: str, flag: str) -> str:
    """The UTF-8 text of a file the user names with `flag` (e.g. `--config`), or an error naming the flag and file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file.")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; expected a YAML file.")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{flag} {path!r} is not UTF-8 text (byte {error.start} is 0x{raw[error.start]:02x}); expected a YAML file."
        ) from None
