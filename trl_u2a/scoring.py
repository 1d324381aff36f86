"""Data selection without training: score negatives by their influence on an alignment objective.

```python
from trl_u2a import score_negatives
scored = score_negatives(model, tokenizer, negatives, alignment_set, loss_type="npo")
best = scored.sort("score", reverse=True).select(range(1000))
```
"""

from __future__ import annotations

from datasets import Dataset

from . import data as u2a_data
from .config import _check_positive
from .core.modeling import fill_reference_logps, model_device, move_batch
from .core.objectives import DPOObjective, as_objective, reference_logps
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

    pair_batches = [
        move_batch(collate_pairs([pairs[i] for i in range(s, min(s + batch_size, len(pairs)))]), device)
        for s in range(0, len(pairs), batch_size)
    ]
    negative_batches = [
        move_batch(collate([rows[i] for i in range(s, min(s + batch_size, len(rows)))]), device)
        for s in range(0, len(rows), batch_size)
    ]
    with scoring_mode(model):
        if getattr(objective, "needs_reference", False):
            pair_batches = reference_logps(model, pair_batches, reference_context=reference)
        if loss_type == "npo":
            negative_batches = fill_reference_logps(model, negative_batches, reference_context=reference)
        query = compute_query(model, objective, pair_batches, preconditioner=preconditioner, damping=damping)
        loss_fn = make_unlearning_loss_fn(loss_type, beta, gamma, ga_reduction)
        scores = score_dataset(model, negative_batches, loss_fn, query, desc="Scoring negatives")
    drop = [c for c in ("prompt_ids", "completion_ids", "label", "weight") if c in rows.column_names]
    return rows.remove_columns(drop).add_column("score", scores.double().cpu().tolist())
