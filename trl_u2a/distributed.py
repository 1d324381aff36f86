"""What a multi-process launch must get right before training: the process group's timeout, and a world that
accelerate really runs together (not ranks that train alone)."""

from __future__ import annotations

import os

import torch
from accelerate.logging import get_logger

from .doc_links import docs_page

logger = get_logger(__name__)


def apply_ddp_timeout(args) -> None:
    """Make `args.ddp_timeout` the timeout of every collective on the default process group, so that a rank that
    freezes (a stuck device, a deadlocked data loader, SIGSTOP) makes the others fail after `ddp_timeout` seconds.

    transformers passes `ddp_timeout` to `init_process_group` only on its GPU path: with `use_cpu` or
    `ACCELERATE_USE_CPU` the gloo group kept torch's 30-minute default (a frozen rank held the others for more than
    420 s with `ddp_timeout: 120`), and a process group created before the config (by the user or accelerate) keeps
    whatever it was given. The training step, the refresh's all-reduces and gathers, and the checkpoint barriers all
    run on this group.
    """
    _ = args.device  # sets up the process group, as `Trainer.__init__` would
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(args.ddp_timeout_delta)


def check_process_count(accelerator) -> None:
    """Log the world size, distributed type and precision; refuse a launch whose processes accelerate runs alone.

    `accelerate launch` and `torchrun` set `WORLD_SIZE`. On a machine without a GPU, accelerate without `use_cpu`
    falls back to one independent process per rank (`DistributedType.NO`): every rank would train alone, exit 0, and
    write every file twice.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    state = accelerator.state
    if launched > accelerator.num_processes:
        raise RuntimeError(
            f"This process is one of {launched} launched (WORLD_SIZE={launched}), but accelerate runs it alone "
            f"({state.distributed_type}, {accelerator.num_processes} process): the ranks would train independently "
            "and write every file twice. On a machine without a GPU, set ACCELERATE_USE_CPU=true (or use_cpu: true) "
            "and launch with --multi_gpu --num_processes N; with GPUs, check that CUDA is visible to every rank "
            f"({docs_page('troubleshooting', 'a-multi-process-run-is-really-independent-processes')})."
        )
    if launched == 1 and accelerate_ran_one_of_several():
        logger.warning(
            "accelerate launch was asked for several processes but started one: without --multi_gpu its simple "
            "launcher runs a single process, which trains alone. For N processes on a machine without a GPU, launch "
            f"with --multi_gpu --num_processes N and ACCELERATE_USE_CPU=true "
            f"({docs_page('usage', 'multi-gpu-with-accelerate')}).",
            main_process_only=True,
        )
    logger.info(
        f"U2A: {accelerator.num_processes} process(es), distributed type {state.distributed_type}, mixed precision "
        f"{state.mixed_precision}, device {accelerator.device}.",
        main_process_only=True,
    )


def accelerate_ran_one_of_several() -> bool:
    """Whether `accelerate launch --num_processes N` (N > 1) ran this script through its simple launcher, one
    process: that launcher sets `ACCELERATE_USE_CPU` always, and `MASTER_ADDR` for N > 1, but no `WORLD_SIZE`."""
    env = os.environ
    return "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
