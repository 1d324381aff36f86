"""U2A's periodic refresh: `controller` (scoring, selection, reweighting; no trainer library), `host` (its narrow
interface to a training loop), `callback` (the `TrainerCallback` adapter for `U2ATrainer`), `record` (the typed
refresh record and JSONL trace), `guards` (early stop and collapse restore), `sharding` (ranks and collectives).

`U2ARefreshCallback` loads on first use, so that importing the controller does not import transformers or TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .controller import RefreshController
from .host import RefreshHost
from .record import REFRESH_FILE, TRACE_FILE, RefreshRecord

if TYPE_CHECKING:
    from .callback import U2ARefreshCallback

__all__ = ["REFRESH_FILE", "TRACE_FILE", "RefreshController", "RefreshHost", "RefreshRecord", "U2ARefreshCallback"]


def __getattr__(name: str):
    if name == "U2ARefreshCallback":
        return importlib.import_module(".callback", __name__).U2ARefreshCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
