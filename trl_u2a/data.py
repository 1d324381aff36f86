"""Datasets in, tokenized negatives / retain rows / alignment pairs out.

Accepted training formats (standard or conversational, like TRL):

- unpaired preference `prompt, completion, label` (`label=False`: negative, `label=True`: retain);
- preference `prompt, chosen, rejected` (rejected: negative, chosen: retain; an implicit prompt is extracted);
- negatives only `prompt, completion` (every row is a negative).

Every negative gets a stable id `negative_id` in `0..n-1` (its order among the negatives of the dataset), the index of
its weight; retain rows get `-1`. An optional `weight` column gives the initial weights.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from datasets import Dataset
from trl.data_utils import extract_prompt, is_conversational

from .doc_links import docs_page

NEGATIVE_ID = "negative_id"
TRAIN_COLUMNS = ["prompt_ids", "completion_ids", "label", NEGATIVE_ID, "weight", "ref_logps"]


def require_dataset(dataset: Any, name: str) -> None:
    """U2A indexes its rows (an id and a weight per negative, pairs scored at every refresh, evaluation rows checked
    and tokenized up front), so a streaming `IterableDataset` is refused with the way to materialise it."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"{name} is a streaming IterableDataset; U2A needs a datasets.Dataset (map-style): every negative gets an "
            "id and a weight that the sampler and the refreshes index, and every row is checked and tokenized before "
            f"training. Materialise it: Dataset.from_generator(lambda: (yield from {name})) for all rows, or "
            f"Dataset.from_list(list({name}.take(n))) for the first n."
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{name} must be a datasets.Dataset, got {type(dataset).__name__}.")


def detect_format(dataset: Dataset, name: str = "train_dataset") -> str:
    """Return `"unpaired"`, `"preference"` or `"negatives"`, or raise a ValueError naming the columns expected."""
    require_dataset(dataset, name)
    columns = set(dataset.column_names)
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty; it needs at least one negative example.")
    if {"chosen", "rejected"} <= columns:
        return "preference"
    if "completion" in columns and "prompt" in columns:
        return "unpaired" if "label" in columns else "negatives"
    raise ValueError(
        f"{name} has columns {sorted(columns)}; expected one of: 'prompt, completion, label' (unpaired preference), "
        "'prompt, chosen, rejected' (preference; 'prompt' may be implicit) or 'prompt, completion' (negatives only)."
    )


def to_unpaired(dataset: Dataset, name: str = "train_dataset", num_proc: int | None = None) -> Dataset:
    """Convert any accepted format to `prompt, completion, label, negative_id, weight` rows.

    Negatives keep their order, so `negative_id` is stable for a given dataset.
    """
    fmt = detect_format(dataset, name)
    if fmt == "preference":
        columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
        _check_text_columns(dataset, name, columns)
        _check_not_blank(dataset, name, columns)
        if "prompt" not in dataset.column_names:
            dataset = dataset.map(extract_prompt, num_proc=num_proc, desc=f"Extracting prompt from {name}")
        keep = [c for c in dataset.column_names if c not in ("chosen", "rejected")]

        def unpair(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {c: [] for c in keep}
            out.update(completion=[], label=[])
            for i in range(len(batch["prompt"])):
                for completion, label in ((batch["rejected"][i], False), (batch["chosen"][i], True)):
                    for c in keep:
                        out[c].append(batch[c][i])
                    out["completion"].append(completion)
                    out["label"].append(label)
            return out

        dataset = dataset.map(unpair, batched=True, remove_columns=dataset.column_names, desc=f"Unpairing {name}")
    else:
        _check_text_columns(dataset, name)
        _check_not_blank(dataset, name, ["prompt", "completion"])
        if fmt == "negatives":
            dataset = dataset.add_column("label", [False] * len(dataset))

    labels = dataset["label"]
    bad = next((i for i, v in enumerate(labels) if not isinstance(v, bool)), None)
    if bad is not None:
        raise ValueError(
            f"{name}: column 'label' must hold booleans (False = negative, True = retain); row {bad} has "
            f"{labels[bad]!r} of type {type(labels[bad]).__name__}."
        )
    num_negatives = sum(1 for v in labels if not v)
    if num_negatives == 0:
        raise ValueError(f"{name} has no negatives (no row with label=False, or no 'rejected' response).")
    _check_text_columns(dataset, name)

    if "id" in dataset.column_names:
        seen: dict = {}
        for i, (value, label) in enumerate(zip(dataset["id"], labels)):
            if label:
                continue
            if value in seen:
                raise ValueError(
                    f"{name}: column 'id' must be unique among the negatives (it names them in the trace); rows "
                    f"{seen[value]} and {i} both have id {value!r}."
                )
            seen[value] = i
    ids, counter = [], 0
    for v in labels:
        ids.append(-1 if v else counter)
        counter += 0 if v else 1
    dataset = dataset.add_column(NEGATIVE_ID, ids)
    if "weight" in dataset.column_names:
        weights = dataset["weight"]
        for i, (w, label) in enumerate(zip(weights, labels)):
            if label:
                continue
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"{name}: column 'weight' must hold finite numbers ≥ 0 for negatives; row {i} has {w!r}."
                )
        dataset = dataset.map(lambda row: {"weight": float(row["weight"] if row["weight"] is not None else 0.0)})
    else:
        dataset = dataset.add_column("weight", [1.0] * len(dataset))
    return dataset


def _check_text_columns(dataset: Dataset, name: str, columns=("prompt", "completion")) -> None:
    """Prompts and completions must be strings (standard) or lists of chat messages (conversational), with no
    missing value. Arrow columns are typed, so the type is checked once and missing values through the null count.
    U2A is text-only: image columns and image content parts are refused."""
    from datasets import Value

    for column in ("image", "images"):
        if column in dataset.column_names:
            raise ValueError(
                f"{name} has an '{column}' column; U2A is text-only (its losses and influence scores read the token "
                "log-probs of a causal language model). Remove the column, or use trl.KTOTrainer for vision data."
            )
    for column in columns:
        feature = dataset.features[column]
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            if dataset.data.column(column).null_count:
                row = dataset[column].index(None)
                raise ValueError(f"{name}: column '{column}' has a missing value (None) at row {row}; expected text.")
            continue
        for i, value in enumerate(dataset[column][:1000]):
            # A message without a known `role` is named by `_check_roles` below
            if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
                _check_text_parts(value, name, column, i)
                continue
            raise ValueError(
                f"{name}: column '{column}' must hold strings or lists of chat messages "
                f"([{{'role': ..., 'content': ...}}, ...]); row {i} has {value!r} of type {type(value).__name__}."
            )
        _check_roles(dataset, name, column)
    _check_same_kind(dataset, name, list(columns))


# The roles of TRL's chat templates; ShareGPT exports name the first two "human" and "gpt"
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def _check_roles(dataset: Dataset, name: str, column: str) -> None:
    """Every chat message has a known `role`; a response column (`completion`, `chosen`, `rejected`) ends with the
    assistant's turn and, under an explicit prompt, holds only assistant turns (a chat template renders a `user`
    turn there as a question, which would then be unlearned or scored as the answer)."""
    response = column != "prompt"
    explicit_prompt = "prompt" in dataset.column_names
    for i, messages in enumerate(dataset[column]):
        for message in messages:
            role = message.get("role")
            if role in ROLES:
                continue
            if role in SHAREGPT_ROLES:
                raise ValueError(
                    f"{name}: column '{column}' row {i} has role {role!r}, ShareGPT's name; expected one of "
                    f"{list(ROLES)}. Rename the roles: 'human' -> 'user', 'gpt' -> 'assistant'."
                )
            shown = "no 'role' key" if "role" not in message else f"role {role!r}"
            raise ValueError(
                f"{name}: column '{column}' row {i} has a message with {shown}; expected one of {list(ROLES)}."
            )
        if not response:
            continue
        if explicit_prompt:
            wrong = next((m["role"] for m in messages if m["role"] in ("user", "system")), None)
        else:
            wrong = messages[-1]["role"] if messages[-1]["role"] != "assistant" else None
        if wrong is not None:
            where = "a turn" if explicit_prompt else "its last turn"
            raise ValueError(
                f"{name}: column '{column}' row {i} has {where} by {wrong!r}; a response is the assistant's turn "
                "(role 'assistant'). Move user and system turns into the prompt."
            )


def _check_same_kind(dataset: Dataset, name: str, columns: list[str]) -> None:
    """The prompt and its responses are all text or all chat messages: TRL concatenates them (a chat prompt plus a
    string completion fails inside tokenization, without naming the row)."""
    from datasets import Value

    kinds = {c: isinstance(dataset.features[c], Value) for c in columns}
    if len(set(kinds.values())) > 1:
        text = [c for c, is_text in kinds.items() if is_text]
        chat = [c for c, is_text in kinds.items() if not is_text]
        raise ValueError(
            f"{name}: column(s) {chat} hold chat messages but {text} hold plain strings (row 0: "
            f"{dataset[text[0]][0]!r}); expected both conversational or both text. Wrap each response as "
            "[{'role': 'assistant', 'content': ...}], or give the prompt as a string."
        )


def _visible(text: Any) -> bool:
    """Whether `text` has a character that shows: not whitespace, nor a control or format character (`"\x00"`)."""
    return isinstance(text, str) and any(ch.isprintable() and not ch.isspace() for ch in text)


def _check_text_parts(messages: list[dict], name: str, column: str, row: int) -> None:
    """Content given as typed parts (`[{"type": "text", "text": ...}]`) is accepted; any other part is refused."""
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(
                    f"{name}: column '{column}' row {row} has a content part of type {kind!r}; U2A is text-only (its "
                    "losses and influence scores read the token log-probs of a causal language model), so only "
                    "{'type': 'text', 'text': ...} parts are accepted. Drop the other parts or those rows."
                )


def _message_has_text(message: Any) -> bool:
    """True for a message with visible text (a string or typed text parts) or with tool calls."""
    if not isinstance(message, dict):
        return False
    if message.get("tool_calls"):
        return True
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return _visible(content)


def _is_blank(value: Any) -> bool:
    """True for text with no visible character, or a conversation whose messages together have none (a tool call
    counts as content)."""
    if isinstance(value, str):
        return not _visible(value)
    if isinstance(value, list):
        return not any(_message_has_text(m) for m in value)
    return False


def _check_not_blank(dataset: Dataset, name: str, columns: list[str]) -> None:
    """An empty or whitespace-only prompt, completion, chosen or rejected is an error, with its row and column.

    An empty negative has no token to unlearn beyond EOS and an empty chosen/rejected makes a pair that says nothing,
    yet both tokenize (EOS is appended) and would train silently; such rows are almost always a broken export.
    Checked on the user's own columns, before unpairing, so the row number is the row of the dataset as given.
    """
    for column in columns:
        values = dataset[column]
        blank = [i for i, v in enumerate(values) if _is_blank(v)]
        if blank:
            more = f" (and {len(blank) - 1} more rows)" if len(blank) > 1 else ""
            first = values[blank[0]]
            texts = [first] if isinstance(first, str) else [m.get("content") for m in first if isinstance(m, dict)]
            # Text that strips to something yet shows nothing is control characters, most often a decoding accident
            what = (
                "has no visible character (control characters only)"
                if any(isinstance(t, str) and t.strip() for t in texts)
                else "is empty or whitespace-only"
            )
            raise ValueError(
                f"{name}: column '{column}' {what} at row {blank[0]}{more}: {first!r}. "
                f"Every {column} needs text; drop or fix those rows "
                f"(e.g. dataset.filter(lambda row: row['{column}'].strip()) for text columns)."
            )


def check_preference(dataset: Dataset, name: str = "alignment_dataset") -> Dataset:
    """Validate a preference dataset (`prompt, chosen, rejected`; implicit prompt allowed) and extract its prompt."""
    require_dataset(dataset, name)
    columns = set(dataset.column_names)
    if not {"chosen", "rejected"} <= columns:
        raise ValueError(
            f"{name} has columns {sorted(columns)}; expected preference pairs 'prompt, chosen, rejected' (the prompt "
            "may be implicit in chosen/rejected)."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty; the alignment objective needs at least one preference pair.")
    _check_text_columns(dataset, name, [c for c in ("prompt", "chosen", "rejected") if c in columns])
    _check_not_blank(dataset, name, [c for c in ("prompt", "chosen", "rejected") if c in columns])
    same = [i for i, (c, r) in enumerate(zip(dataset["chosen"], dataset["rejected"])) if c == r]
    if same:
        more = f" (and {len(same) - 1} more rows)" if len(same) > 1 else ""
        raise ValueError(
            f"{name}: row {same[0]}{more} has chosen identical to rejected ({dataset['chosen'][same[0]]!r}); such a "
            "pair states no preference and its gradient of J is zero, so the scores would be float noise. Drop those "
            "rows, e.g. dataset.filter(lambda row: row['chosen'] != row['rejected'])."
        )
    if "prompt" not in columns:
        dataset = dataset.map(extract_prompt, desc=f"Extracting prompt from {name}")
    return dataset


def check_tokenizer(tokenizer, name: str = "processing_class") -> int:
    """The token id that pads batches: the pad token, else EOS (as TRL falls back); a tokenizer with neither is an
    error (batches of unequal rows cannot be padded)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError(
        f"{name} ({type(tokenizer).__name__}) has neither a pad token nor an EOS token (pad_token=None, "
        "eos_token=None); expected at least one, to pad batches and end completions. Set one, e.g. "
        "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and model.resize_token_embeddings(len(tokenizer))."
    )


def format_mismatch(train_dataset: Dataset, alignment_dataset: Dataset) -> str | None:
    """A warning when one of the two sets is conversational and the other plain text, or None. The chat template then
    formats one of them only, so `J`'s gradient is taken on text shaped unlike the negatives it scores."""
    from trl.data_utils import is_conversational

    if len(train_dataset) == 0 or len(alignment_dataset) == 0:
        return None
    kinds = ["conversational" if is_conversational(d[0]) else "plain text" for d in (train_dataset, alignment_dataset)]
    if kinds[0] == kinds[1]:
        return None
    return (
        f"train_dataset is {kinds[0]} but alignment_dataset is {kinds[1]}: only the conversational one goes through "
        "the chat template, so the influence scores compare texts formatted differently. Give both sets in the same "
        f"format ({docs_page('usage', 'data')})."
    )


def _chat_template_kwargs(tools: Any, chat_template_kwargs: dict | None) -> dict:
    """The `apply_chat_template` options of a row, as TRL builds them: its `tools` (JSON text or a list) and its
    `chat_template_kwargs`."""
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(chat_template_kwargs or {})}


def _common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def _tokenize(tokenizer, text: Any, **template_kwargs) -> list[int]:
    """Token ids of `text` as TRL's dataset preparation makes them: a conversation through the chat template (which
    writes its own special tokens, so no second BOS), plain text through the tokenizer with its special tokens (the
    BOS of a Llama-style tokenizer)."""
    if isinstance(text, list):
        return list(
            tokenizer.apply_chat_template(text, tokenize=True, return_dict=True, **template_kwargs)["input_ids"]
        )
    return list(tokenizer(text=text)["input_ids"])


def _with_eos(tokenizer, completion: str) -> str:
    if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
        return completion + tokenizer.eos_token
    return completion


def tokenize_prompt_completion(
    tokenizer, prompt: Any, completion: Any, tools: Any = None, chat_template_kwargs: dict | None = None
) -> tuple[list[int], list[int]]:
    """Tokenize one row exactly as `trl.KTOTrainer` does: conversational rows through the chat template (generation
    prompt on the prompt; the row's `tools` and `chat_template_kwargs` passed on), plain text with the tokenizer's
    special tokens and EOS appended to the completion; the completion starts where the prompt and prompt+completion
    ids diverge."""
    if is_conversational({"prompt": prompt}):
        kwargs = _chat_template_kwargs(tools, chat_template_kwargs)
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)
        full_ids = _tokenize(tokenizer, prompt + completion, **kwargs)
    else:
        prompt_ids = _tokenize(tokenizer, prompt)
        full_ids = _tokenize(tokenizer, prompt + _with_eos(tokenizer, completion))
    split = _common_prefix_length(prompt_ids, full_ids)
    return full_ids[:split], full_ids[split:]


def tokenize_unpaired(dataset: Dataset, tokenizer, max_length: int | None, name: str, num_proc=None) -> Dataset:
    """Add `prompt_ids` and `completion_ids`; a prompt that leaves no room for its completion is an error."""

    def fn(row):
        prompt_ids, completion_ids = tokenize_prompt_completion(
            tokenizer, row["prompt"], row["completion"], row.get("tools"), row.get("chat_template_kwargs")
        )
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}

    dataset = dataset.map(fn, num_proc=num_proc, desc=f"Tokenizing {name}")
    _check_lengths(dataset, max_length, name, ["completion_ids"])
    return dataset


def tokenize_pairs(dataset: Dataset, tokenizer, max_length: int | None, name: str, num_proc=None) -> Dataset:
    """Add `prompt_ids`, `chosen_ids`, `rejected_ids` to a preference dataset, as `trl.DPOTrainer` does: one prompt
    for both sides, cut where it diverges from the earlier of prompt+chosen and prompt+rejected."""

    def fn(row):
        prompt = row["prompt"]
        if is_conversational({"prompt": prompt}):
            kwargs = _chat_template_kwargs(row.get("tools"), row.get("chat_template_kwargs"))
            prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)
            chosen_ids = _tokenize(tokenizer, prompt + row["chosen"], **kwargs)
            rejected_ids = _tokenize(tokenizer, prompt + row["rejected"], **kwargs)
        else:
            prompt_ids = _tokenize(tokenizer, prompt)
            chosen_ids = _tokenize(tokenizer, prompt + _with_eos(tokenizer, row["chosen"]))
            rejected_ids = _tokenize(tokenizer, prompt + _with_eos(tokenizer, row["rejected"]))
        split = min(_common_prefix_length(prompt_ids, chosen_ids), _common_prefix_length(prompt_ids, rejected_ids))
        return {
            "prompt_ids": prompt_ids[:split],
            "chosen_ids": chosen_ids[split:],
            "rejected_ids": rejected_ids[split:],
        }

    dataset = dataset.map(fn, num_proc=num_proc, desc=f"Tokenizing {name}")
    _check_lengths(dataset, max_length, name, ["chosen_ids", "rejected_ids"])
    return dataset


def _check_lengths(dataset: Dataset, max_length: int | None, name: str, completion_columns: list[str]) -> None:
    for i, prompt_ids in enumerate(dataset["prompt_ids"]):
        if max_length is not None and len(prompt_ids) >= max_length:
            raise ValueError(
                f"{name}: row {i} has a prompt of {len(prompt_ids)} tokens, which leaves no completion token within "
                f"max_length={max_length}. Raise max_length or shorten/drop that prompt."
            )
    for column in completion_columns:
        for i, ids in enumerate(dataset[column]):
            if len(ids) == 0:
                raise ValueError(f"{name}: row {i} has an empty completion ('{column}' has no token).")


def pad_right(sequences: list[list[int]], pad_value: int, pad_to_multiple_of: int | None = None) -> torch.Tensor:
    """Right-pad a list of int lists into a `(B, T)` int64 tensor, `T` rounded up to `pad_to_multiple_of` if set."""
    width = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), width), pad_value, dtype=torch.int64)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return out


def collate_completions(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    max_length: int | None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """`input_ids, attention_mask, completion_mask`, each `(B, T)`, truncated to `max_length`, then right-padded (to a
    multiple of `pad_to_multiple_of` if set, as TRL's collators pad)."""
    ids, masks = [], []
    for p, c in zip(prompts, completions):
        full, mask = p + c, [0] * len(p) + [1] * len(c)
        if max_length is not None:
            full, mask = full[:max_length], mask[:max_length]
        ids.append(full)
        masks.append(mask)
    return {
        "input_ids": pad_right(ids, pad_token_id, pad_to_multiple_of),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0, pad_to_multiple_of),
        "completion_mask": pad_right(masks, 0, pad_to_multiple_of),
    }


class UnpairedCollator:
    """Collate tokenized unpaired rows; forwards `label`, `negative_id` and `ref_logps` as tensors (accelerate can
    only gather tensors across processes)."""

    def __init__(self, pad_token_id: int, max_length: int | None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_completions(
            [r["prompt_ids"] for r in rows],
            [r["completion_ids"] for r in rows],
            self.pad_token_id,
            self.max_length,
            self.pad_to_multiple_of,
        )
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
        batch[NEGATIVE_ID] = torch.tensor([int(r[NEGATIVE_ID]) for r in rows], dtype=torch.int64)
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([float(r["ref_logps"]) for r in rows])
        return batch


class PairCollator:
    """Collate tokenized preference rows into the alignment-objective batch format:
    `{chosen,rejected}_{input_ids,attention_mask,completion_mask}` `(B, T)` and optional `ref_*_logps` `(B,)`."""

    def __init__(self, pad_token_id: int, max_length: int | None):
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for side in ("chosen", "rejected"):
            part = collate_completions(
                [r["prompt_ids"] for r in rows],
                [r[f"{side}_ids"] for r in rows],
                self.pad_token_id,
                self.max_length,
            )
            batch.update({f"{side}_{k}": v for k, v in part.items()})
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([float(r[key]) for r in rows])
        return batch
