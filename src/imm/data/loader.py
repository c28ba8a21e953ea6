"""The trainer's data stream: a sharded, endless, resumable sampler and the loader around it.

:class:`ShardedInfiniteSampler` defines one infinite *global stream* of indices: epoch ``e`` is a
permutation of ``range(length)`` drawn from ``(seed, e)`` (or ``range(length)`` without
shuffling), and the epochs follow each other without gaps (a global batch may straddle two
epochs). Global batch ``s`` is positions ``[s * B, (s + 1) * B)`` of that stream. With ``W``
processes, rank ``r`` takes the **contiguous** slice ``[s * B + r * B / W, s * B + (r + 1) * B / W)``
of every global batch, in order. Hence:

* concatenating the ranks' per-step batches in rank order gives exactly the 1-process batch of that
  step (same samples, same order), for any ``W`` dividing ``B``;
* a trainer that splits the per-rank batch into groups of ``M`` consecutive samples (IMM's
  particles) gets the same groups as a 1-process run as long as ``M`` divides ``B / W``: groups
  never span ranks;
* resuming at step ``s`` is ``start = s * B`` (global samples consumed) and yields exactly what an
  uninterrupted run would have yielded from there.

Without ``global_batch`` the slice width is 1, i.e. rank ``r`` takes every ``W``-th index.
:func:`make_loader` wires the sampler into a ``DataLoader`` (any ``num_workers``; the sampler runs
in the main process and batches come back in order).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from imm.core.errors import InputError
from imm.data.datasets import UNLABELLED, RawDataset, UnreadableSample

__all__ = ["ShardedInfiniteSampler", "InfiniteLoader", "make_loader"]


def _epoch_permutation(length: int, seed: int, epoch: int) -> np.ndarray:
    # The legacy RandomState stream is frozen by NumPy, so orders stay reproducible across versions.
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch & 0xFFFFFFFF, (epoch >> 32) & 0xFFFFFFFF]
    return np.random.RandomState(np.array(words, dtype=np.uint32)).permutation(length)


class ShardedInfiniteSampler(torch.utils.data.Sampler):
    """An endless, deterministic, resumable index stream, partitioned across ranks.

    Global stream: position ``p`` is item ``perm_e[p % length]`` of epoch ``e = p // length``, with
    ``perm_e`` a permutation drawn from ``(seed, e)`` (identity with ``shuffle=False``). Rank ``r`` of
    ``world_size`` takes, of every block of ``global_batch`` consecutive positions, the contiguous
    slice ``[r * b, (r + 1) * b)`` with ``b = global_batch / world_size`` (``global_batch`` defaults to
    ``world_size``: every ``world_size``-th position). The rank's iterator yields its positions
    ``>= start`` in order, so batching it by ``b`` gives, at each step, the rank's slice of the
    1-process global batch (see the module docstring). ``start`` is the number of global samples
    already consumed (``step * global_batch`` to resume at ``step``).

    ``position`` (also in :meth:`state_dict`) is the global position after the last index yielded.
    A ``DataLoader`` prefetches, so it runs ahead of what the trainer consumed: checkpoints should
    store the training step and resume with ``start = step * global_batch``.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 start: int = 0, global_batch: int | None = None):
        length, rank, world_size = int(length), int(rank), int(world_size)
        global_batch = world_size if global_batch is None else int(global_batch)
        if length < 1:
            raise InputError(f"the sampler needs a non-empty dataset, got length {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if global_batch < 1 or global_batch % world_size:
            raise InputError(f"global_batch ({global_batch}) must be a positive multiple of world_size "
                             f"({world_size})")
        if int(seed) < 0 or int(start) < 0:
            raise InputError(f"seed and start must be >= 0, got seed={seed}, start={start}")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.start = int(start)
        self.position = self.start
        self._perm_epoch = -1
        self._perm = None

    def index_at(self, position: int) -> int:
        """The dataset index at a global stream position."""
        epoch, offset = divmod(int(position), self.length)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            self._perm = _epoch_permutation(self.length, self.seed, epoch)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def positions(self, start: int | None = None) -> Iterator[int]:
        """This rank's global positions ``>= start`` (default: ``self.start``), in order, forever."""
        start = self.start if start is None else int(start)
        block, lo = divmod(start, self.global_batch)
        first = self.rank * self.per_rank
        while True:
            base = block * self.global_batch
            yield from range(base + max(first, lo), base + first + self.per_rank)
            block, lo = block + 1, 0

    def __iter__(self) -> Iterator[int]:
        for p in self.positions():
            idx = self.index_at(p)
            self.position = p + 1
            yield idx

    def state_dict(self) -> dict:
        return {"length": self.length, "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "shuffle": self.shuffle, "global_batch": self.global_batch, "start": self.start,
                "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state['position']`` (same seed/shuffle/length expected)."""
        for key in ("length", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise InputError(f"sampler state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}")
        self.start = self.position = int(state.get("position", state.get("start", 0)))

    def __repr__(self) -> str:
        return (f"ShardedInfiniteSampler(length={self.length}, rank={self.rank}, world_size={self.world_size}, "
                f"seed={self.seed}, shuffle={self.shuffle}, global_batch={self.global_batch}, start={self.start})")


class _SkipUnreadable(torch.utils.data.Dataset):
    """A dataset's batches where an unreadable item is replaced by the next readable one (``idx + 1``,
    ``idx + 2`` ... modulo the length): the stream stays deterministic, so a resumed run reads what an
    uninterrupted one read. A batch comes with the ``(index, message)`` of the items passed over (see
    :func:`_collate_skipping`). After ``limit + 1`` unreadable items in a row it stops looking and puts
    zeros in their place: the consumer, seeing more than ``limit`` unreadable items, refuses to go on
    before using that batch."""

    def __init__(self, dataset: RawDataset, limit: int):
        self.dataset, self.limit = dataset, int(limit)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> tuple[list, list]:
        items, skipped = [], []
        for idx in indices:
            try:
                items.append(self.dataset[idx])
            except UnreadableSample as exc:
                skipped.append((idx, str(exc)))
                items.append(self._next_readable(idx, skipped))
        return items, skipped

    def _next_readable(self, idx: int, skipped: list) -> tuple[torch.Tensor, int]:
        n = len(self.dataset)
        for k in range(1, min(self.limit + 1, n)):
            try:
                return self.dataset[(idx + k) % n]
            except UnreadableSample as exc:
                skipped.append(((idx + k) % n, str(exc)))
        return torch.zeros(self.dataset.raw_shape, dtype=self.dataset.dtype), UNLABELLED


def _collate_skipping(fetched: tuple[list, list]):
    items, skipped = fetched
    raw, labels = torch.utils.data.default_collate(items)
    return raw, labels, skipped


class InfiniteLoader:
    """An endless iterator of ``(raw_batch, labels)`` made by :func:`make_loader`.

    ``raw_batch`` is ``[batch_per_rank, C, H, W]`` (the dataset's dtype), ``labels`` ``int64
    [batch_per_rank]`` (-1 when unlabelled). Attributes: ``sampler``, ``loader`` (the DataLoader),
    ``step`` (batches yielded so far plus ``start_step``), ``unreadable`` (``{index: message}`` of the
    items skipped so far, with ``make_loader(max_unreadable=...)``).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, sampler: ShardedInfiniteSampler, start_step: int):
        self.loader = loader
        self.sampler = sampler
        self.step = int(start_step)
        self.unreadable: dict[int, str] = {}
        self._it = None

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.step += 1
        if len(batch) == 3:  # _collate_skipping's list of skipped items
            self.unreadable.update(batch[2])
        return batch[0], batch[1]

    def close(self) -> None:
        """Stop the worker processes (also happens when the loader is garbage collected)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def make_loader(dataset, batch_per_rank: int, global_batch: int | None = None, rank: int = 0, world: int = 1,
                seed: int = 0, start_step: int = 0, num_workers: int = 0, shuffle: bool = True,
                pin_memory: bool = False, prefetch_factor: int | None = None,
                multiprocessing_context=None, max_unreadable: int | None = None) -> InfiniteLoader:
    """An endless iterator of this rank's ``(raw_batch, labels)``, step after step.

    ``global_batch`` (default ``batch_per_rank * world``) must equal ``batch_per_rank * world``. At step
    ``s`` (counting from ``start_step``) the batch is positions ``[s * global_batch + rank * batch_per_rank,
    ... + batch_per_rank)`` of the :class:`ShardedInfiniteSampler` stream of ``(seed, shuffle)``: the
    ranks' batches, concatenated in rank order, are the 1-process batch of that step, and resuming at
    ``start_step`` continues exactly where an uninterrupted run would be. Works with any
    ``num_workers`` (the sampler runs in this process; batches keep their order).

    With ``max_unreadable`` (an int), an item that raises :class:`UnreadableSample` is replaced by the
    next readable one and recorded in the loader's ``unreadable`` (the caller decides when there are too
    many; at most ``max_unreadable + 1`` are tried in a row); without it such an item raises.
    """
    batch_per_rank, world = int(batch_per_rank), int(world)
    if batch_per_rank < 1:
        raise InputError(f"batch_per_rank must be at least 1, got {batch_per_rank}")
    global_batch = batch_per_rank * world if global_batch is None else int(global_batch)
    if global_batch != batch_per_rank * world:
        raise InputError(f"global_batch ({global_batch}) must equal batch_per_rank ({batch_per_rank}) x "
                         f"world ({world})")
    if int(start_step) < 0:
        raise InputError(f"start_step must be >= 0, got {start_step}")
    sampler = ShardedInfiniteSampler(len(dataset), rank=rank, world_size=world, seed=seed, shuffle=shuffle,
                                     start=int(start_step) * global_batch, global_batch=global_batch)
    kwargs = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor or 2
        kwargs["persistent_workers"] = False
        if multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = multiprocessing_context
    if max_unreadable is not None:
        dataset = _SkipUnreadable(dataset, max_unreadable)
        kwargs["collate_fn"] = _collate_skipping
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_per_rank, sampler=sampler,
                                         num_workers=int(num_workers), pin_memory=pin_memory, drop_last=False,
                                         **kwargs)
    return InfiniteLoader(loader, sampler, start_step)
