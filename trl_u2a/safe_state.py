"""U2A's checkpoint state in a format that cannot run code on load: tensors in safetensors, everything else as JSON.

A pickle (`torch.load(..., weights_only=False)`) executes whatever a crafted file asks for when it is read, so a
checkpoint downloaded or shared with a U2A run could run arbitrary code on resume. Here a state is any nesting of
`None`, `bool`, `int`, `float`, `str`, `list`, `tuple`, `dict` (any of these as keys) and `torch.Tensor`; it is split
into a JSON tree and a flat `{name: tensor}` file, and decoded back to the same Python types and the same tensors
(dtype and values bit for bit). The encoding is generic on purpose: a new plain key in the refresh or sampler state
round-trips without this file changing.

JSON tags (a JSON object with exactly one of these keys; a dict of the state that looks like a tag is itself written
as `__items__`, so decoding is unambiguous):

- `{"__tensor__": name}`: the tensor `name` of the safetensors file;
- `{"__tuple__": [...]}`: a tuple;
- `{"__items__": [[key, value], ...]}`: a dict whose keys are not all strings (e.g. negative ids), or a dict that
  would read as a tag.

Checkpoints of earlier versions hold a pickled `u2a_state.pt`; `load_legacy_state` reads it with
`torch.load(weights_only=True)`, which refuses any global outside torch's allow-list (tensors and plain containers),
so a crafted one fails with a clear error and its code never runs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any

import torch

STATE_JSON = "u2a_state.json"
STATE_TENSORS = "u2a_state.safetensors"
LEGACY_STATE_FILE = "u2a_state.pt"
# The file transformers writes last in a checkpoint: present and readable, the checkpoint is complete
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1

_TAGS = ("__tensor__", "__tuple__", "__items__")


def encode(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `state` into a JSON-serialisable tree and the tensors it references.

    Raises:
        TypeError: for a value of any other type, naming where it is in the state (e.g. `state['refresh']['x']`), so
            that a new non-plain entry fails when it is first saved in a test, not when a user resumes.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, where: str) -> Any:
        # bool before int: bool is a subclass of int, and JSON keeps them apart
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)  # repr round-trips every float exactly; JSON writes nan/inf as NaN/Infinity
        if isinstance(value, torch.Tensor):
            name = str(len(tensors))
            # safetensors refuses views sharing storage and non-contiguous tensors; a copy also detaches it
            tensors[name] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": name}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
                return {k: walk(v, f"{where}[{k!r}]") for k, v in value.items()}
            return {"__items__": [[walk(k, f"{where} key"), walk(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        raise TypeError(
            f"Cannot save {where} in a U2A checkpoint: it is a {type(value).__module__}.{type(value).__qualname__}. "
            "The checkpoint state may hold only None, bool, int, float, str, list, tuple, dict and torch.Tensor "
            "(converted, e.g. with .item() or .tolist(), before it enters the state)."
        )

    return walk(state, "state"), tensors


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`.

    Raises:
        ValueError: when the tree references a tensor that the tensor file lacks.
    """

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((tag, content),) = value.items()
            if tag == "__tensor__":
                if content not in tensors:
                    raise ValueError(
                        f"the U2A state references tensor {content!r}, which its {STATE_TENSORS} lacks (the two files "
                        "are from different saves, or one was truncated)."
                    )
                return tensors[content]
            if tag == "__tuple__":
                return tuple(walk(v) for v in content)
            if tag == "__items__":
                # A tuple key decodes to a tuple again; a list can never have been a key
                return {walk(k): walk(v) for k, v in content}
        return {k: walk(v) for k, v in value.items()}

    return walk(tree)


def save_state(state: dict[str, Any], directory: str) -> None:
    """Write `state` to `directory/u2a_state.safetensors` and then `directory/u2a_state.json` (the JSON last: it
    names the tensors, so a JSON file that exists has its tensor file complete). Each file is written under a
    temporary name and renamed, so a failed write (a full disk) never leaves a truncated file under either name."""
    from safetensors.torch import save_file

    tree, tensors = encode(state)
    path = os.path.join(directory, STATE_TENSORS)
    save_file(tensors, path + ".tmp", metadata={"format": "trl-u2a", "version": "1"})
    os.replace(path + ".tmp", path)
    payload = json.dumps({"format_version": FORMAT_VERSION, "state": tree})
    path = os.path.join(directory, STATE_JSON)
    with open(path + ".tmp", "w") as f:
        f.write(payload)
    os.replace(path + ".tmp", path)


def load_state(directory: str) -> dict[str, Any]:
    """Read the state that `save_state` wrote to `directory`. Nothing in these files is executed.

    Raises:
        ValueError: when a file is missing, truncated, or of another format version.
    """
    from safetensors.torch import load_file

    path = os.path.join(directory, STATE_JSON)
    try:
        with open(path) as f:
            payload = json.load(f)
    except ValueError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): the save was interrupted or the file was edited."
        ) from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise ValueError(
            f"{path} has format_version {version!r}; this trl-u2a reads version {FORMAT_VERSION}. Resume with the "
            "trl-u2a version that wrote the checkpoint."
        )
    tensors_path = os.path.join(directory, STATE_TENSORS)
    if not os.path.isfile(tensors_path):
        raise ValueError(f"{directory} has {STATE_JSON} but no {STATE_TENSORS}: the checkpoint is incomplete.")
    try:
        tensors = load_file(tensors_path)
    except Exception as error:  # safetensors raises its own error types for a malformed header
        raise ValueError(
            f"{tensors_path} cannot be read ({error}): the file is truncated or not safetensors."
        ) from None
    return decode(payload["state"], tensors)


def load_legacy_state(path: str) -> dict[str, Any]:
    """Read a pickled `u2a_state.pt` of an earlier trl-u2a with `torch.load(weights_only=True)`: tensors and plain
    containers load, anything else is refused before it is constructed.

    Raises:
        ValueError: naming the refused global and why, when the pickle holds anything outside torch's allow-list.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names the refused global in one of two phrasings, depending on whether its module is blocked
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
        what = found.group(1) if found else "an object outside tensors and plain containers"
        raise ValueError(
            f"Refusing to load {path}: it is a pickle that asks to build {what}, which a U2A state never holds. "
            "Unpickling it could run arbitrary code, so it was not loaded. Resume only from checkpoints you wrote; "
            f"this trl-u2a writes {STATE_JSON} and {STATE_TENSORS}, which hold no code."
        ) from None
    if not isinstance(state, dict) or "weights" not in state:
        raise ValueError(f"{path} does not hold a U2A state (a dict with 'weights'); got {type(state).__name__}.")
    return state


def state_format(path: str) -> str | None:
    """The one rule for "this directory holds a U2A state": `"safetensors"` when it has this trl-u2a's two state
    files, `"legacy"` when it has an earlier version's pickle, None otherwise."""
    if os.path.isfile(os.path.join(path, STATE_JSON)) and os.path.isfile(os.path.join(path, STATE_TENSORS)):
        return "safetensors"
    if os.path.isfile(os.path.join(path, LEGACY_STATE_FILE)):
        return "legacy"
    return None


def load_checkpoint_state(path: str) -> dict[str, Any]:
    """The U2A state of checkpoint `path`, in whichever format `state_format` finds.

    Raises:
        FileNotFoundError: when `path` holds no U2A state.
        ValueError: when the state files cannot be read (see `load_state`, `load_legacy_state`).
    """
    found = state_format(path)
    if found == "safetensors":
        return load_state(path)
    if found == "legacy":
        return load_legacy_state(os.path.join(path, LEGACY_STATE_FILE))
    raise FileNotFoundError(
        f"{path} has no {STATE_JSON} and {STATE_TENSORS}: it was not written by U2ATrainer (or the save was "
        "interrupted), so the weights of the negatives cannot be restored."
    )


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete U2A checkpoint, or None. `trainer_state.json` is the last file a checkpoint
    save writes, after every rank's files and the U2A state, so a readable one marks a checkpoint whose files are all
    there."""
    if not os.path.isdir(path):
        return "it is not a directory"
    if state_format(path) is None:
        return f"it has no {STATE_JSON} and {STATE_TENSORS} (not written by U2ATrainer, or the save was interrupted)"
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            json.load(f)
    except (OSError, ValueError):
        return "its trainer_state.json is missing or truncated (the save was interrupted)"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step `checkpoint-N` directory of `output_dir` that is complete (see `checkpoint_problem`)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, number = name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and number.isdigit():
            steps.append((int(number), os.path.join(output_dir, name)))
    for _, path in sorted(steps, reverse=True):
        if checkpoint_problem(path) is None:
            return path
    return None
