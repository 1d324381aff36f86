"""trl-u2a: U2A (Unlearning to Align) for Hugging Face TRL.

Public API: `U2AConfig`, `U2ATrainer`, `U2ARefreshCallback`, and the scoring API `score_negatives`.
Imports are lazy so that `import trl_u2a` stays cheap (torch and TRL load on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _quiet

__version__ = "0.1.0"

_quiet.install()

_LAZY = {
    "U2AConfig": "trl_u2a.config",
    "U2ATrainer": "trl_u2a.trainer",
    "U2ARefreshCallback": "trl_u2a.refresh.callback",
    "score_negatives": "trl_u2a.scoring",
    "DPOObjective": "trl_u2a.core.objectives",
    "AlignmentObjective": "trl_u2a.core.objectives",
}

__all__ = [
    "AlignmentObjective",
    "DPOObjective",
    "U2AConfig",
    "U2ARefreshCallback",
    "U2ATrainer",
    "score_negatives",
]

if TYPE_CHECKING:
    from .config import U2AConfig
    from .core.objectives import AlignmentObjective, DPOObjective
    from .refresh.callback import U2ARefreshCallback
    from .scoring import score_negatives
    from .trainer import U2ATrainer


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_u2a' has no attribute {name!r}")
