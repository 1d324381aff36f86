"""U2A's periodic refresh: `controller` (scoring, selection, reweighting; no trainer library), `host` (its narrow
interface to a training loop), `callback` (the `TrainerCallback` adapter for `U2ATrainer`), `record` (the typed
refresh record and JSONL trace), `guards` (early stop and collapse restore), `sharding` (ranks and collectives)."""

from .callback import U2ARefreshCallback
from .controller import RefreshController
from .host import RefreshHost
from .record import REFRESH_FILE, TRACE_FILE, RefreshRecord

__all__ = ["REFRESH_FILE", "TRACE_FILE", "RefreshController", "RefreshHost", "RefreshRecord", "U2ARefreshCallback"]
