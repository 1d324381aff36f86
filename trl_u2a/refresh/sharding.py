"""How a refresh splits its rows over data-parallel ranks and puts the results back together.

Every rank must run the same number of forwards (ZeRO-3 and FSDP2 gather the parameters in collectives inside each
forward) and call the same collectives in the same order, whatever its data. So each rank takes an equal, padded,
contiguous chunk of the rows; padded rows are marked and dropped after their forward.
"""

from __future__ import annotations

from typing import Any

import torch


def padded_chunk(rows: list[int], rank: int, world: int, min_size: int = 0) -> tuple[list[int], torch.Tensor]:
    """This rank's contiguous chunk of `rows`, `max(min_size, ceil(n / world))` entries, padded with the chunk's first
    row (or `rows[0]`), and the `(size,)` bool mask of the padding. Empty `rows` give an empty chunk."""
    size = max(min_size, -(-len(rows) // world))
    local = list(rows[rank * size : (rank + 1) * size])
    padding = torch.zeros(size, dtype=torch.bool)
    padding[len(local) :] = True
    return local + (local or list(rows))[:1] * (size - len(local)), padding


class Sharding:
    """The data-parallel view of a refresh: this rank, the world, and the collectives it needs.

    Args:
        accelerator: an `accelerate.Accelerator` (or anything with `process_index`, `num_processes`,
            `is_main_process`, `device`, `gather`, `reduce`); one process needs no collective.
    """

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def chunk(self, rows: list[int], min_size: int = 0) -> tuple[list[int], torch.Tensor]:
        """This rank's `padded_chunk` of `rows`."""
        return padded_chunk(rows, self.rank, self.world, min_size)

    def gather_chunks(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The values `local` `(size, ...)` that each rank computed for its `chunk` of `n` rows, gathered in rank order
        without the padding, on the CPU: `(n, ...)` on every rank."""
        accelerator, size = self.accelerator, local.shape[0]
        gathered = accelerator.gather(local.to(accelerator.device)).cpu().view(self.world, size, *local.shape[1:])
        return torch.cat([gathered[r, : max(0, min(size, n - r * size))] for r in range(self.world)])

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """SUM over the ranks, on the CPU."""
        return self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum").cpu()

    def gather_object(self, obj: Any) -> list:
        """`[obj of rank 0, obj of rank 1, ...]` on every rank."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])
