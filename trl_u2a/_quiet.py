"""Silence, narrowly, the messages of other libraries that a U2A user can do nothing about. Each filter matches one
message; everything else (including these libraries' other warnings) is untouched."""

from __future__ import annotations

import logging
import re
import warnings

# bitsandbytes >= 0.50 on a CPU with AVX512-BF16 logs this at import when the optional `kernels` package is absent,
# then falls back to its own kernel: nothing is wrong, and every run printed it
_BNB_KERNELS = re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community")


class _DropMessage(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(str(record.msg))


def install() -> None:
    """Idempotent: a filter is added once per logger."""
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")  # created now if bitsandbytes is not imported yet
    if not any(isinstance(f, _DropMessage) for f in bnb.filters):
        bnb.addFilter(_DropMessage(_BNB_KERNELS))
    # transformers 5.2x renames `gradient_checkpointing` and warns on every TrainingArguments and model, whether or not
    # the user set it; TRL's configs still use the old name, so the user cannot act on it
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)
