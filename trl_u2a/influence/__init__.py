"""The influence engine: the query `v = P⁻¹∇J` and per-example scores `s_i = ⟨v, ∇ℓ_i⟩` by ghost dot products.

- `J(θ)`: the alignment objective, the mean of a per-pair loss over the alignment set (`core.objectives`).
- `ℓ_i(θ)`: the unlearning loss of negative `i` (`core.losses`), minimised by the lower level.
- `v = P⁻¹ ∇J` over the *tracked* trainable parameters, `P` a positive diagonal preconditioner.
- `s_i = ⟨v, ∇ℓ_i⟩ > 0` means unlearning example `i` is predicted to lower `J` (docs/method.md).

Modules: `tracking` (what can be scored), `ghost` (per-row dot products from one backward), `scores` (the loss
factory, batch and dataset scoring, the brute-force oracle), `query` (`∇J` and `v`), `preconditioners`, and
`sharded` (FSDP2, DeepSpeed ZeRO and all-reduce details). Scoring a batch costs about one training forward+backward
(docs/benchmarks.md).
"""

from .ghost import GhostDotProduct
from .preconditioners import PRECONDITIONERS, gradient_second_moments, precondition
from .query import AlignmentGradient, QueryVector, alignment_gradient, compute_query
from .scores import (
    brute_force_scores,
    make_unlearning_loss_fn,
    score_dataset,
    score_negatives_batch,
)
from .tracking import (
    LossFn,
    ParamVector,
    Tracking,
    resolve_tracking,
    scoring_mode,
    tracked_modules,
    tracked_parameters,
    unwrap_model,
)

__all__ = [
    "PRECONDITIONERS",
    "AlignmentGradient",
    "GhostDotProduct",
    "LossFn",
    "ParamVector",
    "QueryVector",
    "Tracking",
    "alignment_gradient",
    "brute_force_scores",
    "compute_query",
    "gradient_second_moments",
    "make_unlearning_loss_fn",
    "precondition",
    "resolve_tracking",
    "score_dataset",
    "score_negatives_batch",
    "scoring_mode",
    "tracked_modules",
    "tracked_parameters",
    "unwrap_model",
]
