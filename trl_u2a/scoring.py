"""Data selection without training: score negatives by their influence on an alignment objective.

```python
from trl_u2a import score_negatives
scored = score_negatives(model, tokenizer, negatives, alignment_set, loss_type="npo")
best = scored.sort("score", reverse=True).select(range(1000))
```
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from datasets import Dataset

from . import data as u2a_data
from .config import _check_positive
from .core.modeling import model_device, move_batch, reference_values, sequence_logps
from .core.objectives import DPOObjective, as_objective, pair_reference_values
from .influence import compute_query, make_unlearning_loss_fn, score_dataset, scoring_mode


def score_negatives(
    model,
    tokenizer,
    negatives: Dataset,
    alignment_set: Dataset,
    loss_type: str = "npo",
    preconditioner: str = "identity",
    damping: float = 0.0,
    beta: float | None = None,
    gamma: float = 0.0,
    ga_reduction: str = "mean",
    beta_pa: float = 0.1,
    objective=None,
    batch_size: int = 8,
    max_length: int | None = 1024,
) -> Dataset:
    """Score every negative of `negatives` at the current `model` (the start model `θ_0`): `s_i = ∇Jᵀ P⁻¹ ∇ℓ_i`.

    Args:
        model: a causal LM; its trainable parameters define the geometry (all weights, or a PEFT adapter).
        tokenizer: its tokenizer.
        negatives: any training format of `U2ATrainer` (retain rows are dropped).
        alignment_set: preference pairs `prompt, chosen, rejected`.
        loss_type: the unlearning loss whose gradient is scored (`ga`, `graddiff`, `npo`, `simnpo`).
        preconditioner: `"identity"` or `"fisher"` (`"adam"` needs a training run's optimizer).
        objective: a custom alignment objective; default the DPO loss with `beta_pa` against `model` itself.

    Returns:
        The negatives (`prompt, completion, negative_id`, their other columns) with a float `score` column;
        `score > 0` predicts that unlearning the example lowers the alignment loss.
    """
    if preconditioner == "adam":
        raise ValueError(
            "preconditioner='adam' reads a training optimizer's second moments, and score_negatives trains nothing; "
            "use 'identity' or 'fisher'."
        )
    # The same rules, and messages, as the U2AConfig fields of the same names
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer ≥ 1.")
    for name, value in (("beta", beta), ("beta_pa", beta_pa)):
        if value is not None:
            _check_positive(name, value)
    pad_token_id = u2a_data.check_tokenizer(tokenizer, "tokenizer")
    rows = u2a_data.to_unpaired(negatives, "negatives")
    rows = rows.filter(lambda row: not row["label"])
    rows = u2a_data.tokenize_unpaired(rows, tokenizer, max_length, "negatives")
    pairs = u2a_data.tokenize_pairs(
        u2a_data.check_preference(alignment_set, "alignment_set"), tokenizer, max_length, "alignment_set"
    )
    collate = u2a_data.UnpairedCollator(pad_token_id, max_length)
    collate_pairs = u2a_data.PairCollator(pad_token_id, max_length)
    device = model_device(model)
    objective = as_objective(objective) if objective is not None else DPOObjective(beta_pa)
    reference = model.disable_adapter if hasattr(model, "disable_adapter") else None
    loss_fn = make_unlearning_loss_fn(loss_type, beta, gamma, ga_reduction)
    num_batches = -(-len(rows) // batch_size)

    # Every pass builds its batches one at a time (`batches`): the memory of scoring N negatives is one batch plus
    # N floats, whatever N. Reference log-probs are a pass of their own, sliced into the batches of the next pass.
    with scoring_mode(model):
        pair_values = {}
        if getattr(objective, "needs_reference", False):
            pair_values = pair_reference_values(
                model, batches(pairs, collate_pairs, batch_size, device), reference_context=reference
            )
        negative_values = {}
        if loss_type == "npo":
            negative_values = reference_values(
                model, batches(rows, collate, batch_size, device), _negative_logps, reference_context=reference
            )
        query = compute_query(
            model,
            objective,
            batches(pairs, collate_pairs, batch_size, device, pair_values),
            preconditioner=preconditioner,
            damping=damping,
        )
        scores = score_dataset(
            model,
            batches(rows, collate, batch_size, device, negative_values),
            loss_fn,
            query,
            desc="Scoring negatives",
            total=num_batches,
        )
    drop = [c for c in ("prompt_ids", "completion_ids", "label", "weight") if c in rows.column_names]
    return rows.remove_columns(drop).add_column("score", scores.double().cpu().tolist())


def batches(
    dataset: Dataset,
    collate,
    batch_size: int,
    device: torch.device,
    values: dict[str, torch.Tensor] | None = None,
) -> Iterator[dict]:
    """The rows of `dataset` in order, `batch_size` at a time, each collated and moved to `device` when asked for,
    with its slice of each `(N,)` tensor of `values` (per-row reference log-probs) under the same key."""
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        batch = collate([dataset[i] for i in range(start, stop)])
        batch.update({k: v[start:stop] for k, v in (values or {}).items()})
        yield move_batch(batch, device)


def _negative_logps(model, batch: dict) -> dict[str, torch.Tensor]:
    """`ref_logps` of a batch of negatives: the reference log-probs NPO reads."""
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return {"ref_logps": logps}
