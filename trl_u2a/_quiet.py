"""Silence, narrowly, the messages of other libraries that a U2A user can do nothing about. Each filter matches one
message; everything else (including these libraries' other warnings) is untouched."""

from __future__ import annotations

import logging
import re
import warnings

# bitsandbytes >= 0.50 on a CPU with AVX512-BF16 logs this at import when the optional `kernels` package is absent,
# then falls back to its own kernel: nothing is wrong, and every run printed it
_BNB_KERNELS = re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community")
# With HF_HUB_OFFLINE=1 and `kernels` installed, the same import first logs this from kernels (trust was checked when
# the kernel was downloaded; offline it cannot be, and nothing asks anything of the user)
_BNB_KERNEL_TRUST = re.compile(r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")
# DeepSpeed, imported by accelerate/TRL whenever it is installed, logs this on every machine without a GPU
_DEEPSPEED_CPU = re.compile(r"Setting accelerator to CPU\. If you have GPU or other accelerator")


class _DropMessage(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(str(record.msg))


def install() -> None:
    """Idempotent: a filter is added once per logger."""
    # The loggers are created now if those libraries are not imported yet; they keep the filter when they are
    for name, pattern in (
        ("bitsandbytes.backends.cpu.ops", _BNB_KERNELS),
        ("kernels._internals.hf_hub", _BNB_KERNEL_TRUST),
        ("DeepSpeed", _DEEPSPEED_CPU),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
    # transformers 5.2x renames `gradient_checkpointing` and warns on every TrainingArguments and model, whether or not
    # the user set it; TRL's configs still use the old name, so the user cannot act on it
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)


def progress_bars_off() -> None:
    """No datasets map bars and no transformers loading/saving bars, for the rest of the process: for a command that
    owns its process and shows its own output."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
