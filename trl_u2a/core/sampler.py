"""The training sampler: draws only negatives whose weight is positive, and follows the weights as they change.

The order of draws is a pure function of `(seed, epoch, draw index, version table)`, where the version table lists,
for the current epoch, from which draw index each weight version applies. That makes it

- identical on every data-parallel rank (each rank draws the same global sequence and accelerate takes its shard),
- exact on resume: the table is saved in checkpoints, so replaying the skipped batches reproduces the same draws,
- insensitive to the dataloader's prefetch and to the rank: a new weight version applies from the first global-batch
  boundary at or after the draw count at refresh time. Under data parallelism accelerate has every rank iterate the
  same sampler and keep every `num_processes`-th batch, so at a given step the ranks have drawn different counts, but
  all within the same global batch; rounding up to its boundary gives every rank, and a one-process run with the same
  global batch, the same starting draw.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class WeightedNegativeSampler(Sampler[int]):
    """Yields dataset row indices: active negatives (and, if `retain_rows` is given, one retain row after each).

    Args:
        negative_rows: `(n,)` int64, the dataset row of each negative id.
        retain_rows: `(r,)` int64 rows of the retain examples, or `None` when no retain term is trained.
        negatives_per_epoch: negatives drawn per epoch (the trainer passes the budget rounded up to whole global
            batches, so that every step trains a full batch), fixed so the trainer's step count stays exact. Draws
            cycle through blocks: each block is a random permutation of the active negatives (`"loss"`), so within
            an epoch every selected negative is drawn once before any is drawn twice.
        weights: `(n,)` initial weights.
        mode: `"loss"` (each block is a permutation of the active negatives) or `"sampling"` (each block is drawn with
            replacement with probability ∝ ω).
        seed: base seed; blocks are seeded from `(seed, epoch, version, block)`.
        global_batch_size: rows drawn per global micro-batch (per-device batch size × number of processes).
    """

    def __init__(
        self,
        negative_rows: torch.Tensor,
        retain_rows: torch.Tensor | None,
        negatives_per_epoch: int,
        weights: torch.Tensor,
        mode: str = "loss",
        seed: int = 0,
        global_batch_size: int = 1,
    ):
        self.negative_rows = negative_rows.long()
        self.retain_rows = retain_rows.long() if retain_rows is not None and len(retain_rows) > 0 else None
        self.negatives_per_epoch = int(negatives_per_epoch)
        self.mode = mode
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.epoch = 0
        self.draws = 0  # indices yielded in the current epoch
        self._table: list[tuple[int, int, torch.Tensor]] = []  # (first draw, version, weights) in this epoch
        self._version = 0
        self._current = weights.detach().double().clone()
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}
        self._resume_table: tuple[int, list[tuple[int, int, torch.Tensor]]] | None = None

    def __len__(self) -> int:
        return self.negatives_per_epoch * (2 if self.retain_rows is not None else 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def update_weights(self, weights: torch.Tensor) -> None:
        """New weights apply from the next global batch not yet drawn (the dataloader may hold a prefetched one)."""
        self._version += 1
        self._current = weights.detach().double().clone()
        start = -(-self.draws // self.global_batch_size) * self.global_batch_size
        self._table.append((start, self._version, self._current))

    def __iter__(self):
        self.draws = 0
        self._blocks.clear()
        resume, self._resume_table = self._resume_table, None
        if resume is not None and resume[0] == self.epoch:
            # Replaying the epoch a checkpoint was taken in: the versions apply from the same draws as before
            self._table = resume[1]
        else:
            self._table = [(0, self._version, self._current)]
        for slot in range(len(self)):
            if self.retain_rows is not None and slot % 2 == 1:
                yield int(self._retain_row(slot // 2))
            else:
                yield int(self._negative_row(slot // 2 if self.retain_rows is not None else slot))
            self.draws += 1

    def _entry(self, draw: int) -> tuple[int, int, torch.Tensor]:
        current = self._table[0]
        for entry in self._table:
            if entry[0] <= draw:
                current = entry
        return current

    def _negative_row(self, k: int) -> torch.Tensor:
        start, version, weights = self._entry(self.draws)
        # Position within the sequence of blocks that started when this version took effect
        first_k = self._first_negative_slot(start)
        offset = k - first_k
        active = torch.nonzero(weights > 0).flatten()
        if len(active) == 0:
            raise RuntimeError("No negative has a positive weight: there is nothing left to unlearn.")
        block_size = len(active)
        block_index, position = divmod(offset, block_size)
        key = (version, block_index)
        if key not in self._blocks:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, version, block_index))
            if self.mode == "sampling":
                block = active[torch.multinomial(weights[active], block_size, replacement=True, generator=generator)]
            else:
                block = active[torch.randperm(block_size, generator=generator)]
            self._blocks[key] = block
        return self.negative_rows[self._blocks[key][position]]

    def _first_negative_slot(self, draw: int) -> int:
        return (draw + 1) // 2 if self.retain_rows is not None else draw

    def _retain_row(self, k: int) -> torch.Tensor:
        block_index, position = divmod(k, len(self.retain_rows))
        key = (-1, block_index)
        if key not in self._blocks:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, -1, block_index))
            self._blocks[key] = torch.randperm(len(self.retain_rows), generator=generator)
        return self.retain_rows[self._blocks[key][position]]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "version": self._version,
            "current": self._current.clone(),
            "table": [(d, v, w.clone()) for d, v, w in self._table],
        }

    def load_state_dict(self, state: dict) -> None:
        self._version = int(state["version"])
        self._current = state["current"].double().clone()
        self._resume_table = (int(state["epoch"]), [(int(d), int(v), w.double().clone()) for d, v, w in state["table"]])


def mix_seed(*parts: int) -> int:
    """A fixed mix of integers into a generator seed (Python's `hash` is not a contract across versions)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part) + 1) % (2**61 - 1)
    return seed
