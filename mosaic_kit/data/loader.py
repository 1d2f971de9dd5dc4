"""A resumable data order and a loader that skips bad samples deterministically.

The data position of a run is ``(epoch, position)``: an index into a fixed permutation of the
dataset drawn from ``(seed, epoch)``. `ResumableSampler` holds it; `SkippingLoader` reads the
samples in that order (optionally with worker processes), skips `BadSample` ones into a
`BadDataTally`, batches the good ones and advances the position by the samples it has actually
consumed, not by what workers prefetched. Saving `SkippingLoader.state_dict` with a checkpoint and
loading it into a fresh loader continues with exactly the samples an uninterrupted run would
have seen next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..utils.checks import check_int
from .bad import BadDataTally, BadSample, log
from .composer import _seed_for

__all__ = ["ResumableSampler", "SkippingLoader"]


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A seeded, resumable order over ``num_samples`` items, shared out across ``world_size`` ranks.

    Epoch ``e``'s order is ``torch.randperm(num_samples)`` from a generator seeded by
    ``(seed, e)`` (or ``range(num_samples)`` without shuffling); rank ``r`` takes every
    ``world_size``-th index of it starting at ``r``. ``position`` counts the indices of this rank's
    epoch order already consumed.

    Iterating the sampler yields this rank's remaining indices of the current epoch and advances
    ``position`` as it goes, then moves to the next epoch. A `torch.utils.data.DataLoader` with
    workers reads ahead of training, so with workers let `SkippingLoader` drive the sampler: it
    counts what was consumed.

    Args:
        num_samples: the dataset's length.
        seed: the data seed.
        shuffle: permute each epoch (else the identity order).
        rank: this process's rank.
        world_size: number of processes.

    Examples:
        >>> sampler = ResumableSampler(6, seed=3)
        >>> first = [next(it) for it in [iter(sampler)] for _ in range(2)]
        >>> state = sampler.state_dict()
        >>> rest = list(sampler)
        >>> resumed = ResumableSampler(6, seed=3)
        >>> resumed.load_state_dict(state)
        >>> list(resumed) == rest, sorted(first + rest) == list(range(6)), sampler.epoch
        (True, True, 1)
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=0)
        self.seed = check_int("seed", seed)
        self.shuffle = bool(shuffle)
        self.world_size = check_int("world_size", world_size, minimum=1)
        self.rank = check_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"Expected `rank` in [0, world_size) = [0, {self.world_size}), but got {rank}.")
        self.epoch = 0
        self.position = 0
        self._cached: tuple[int, list[int]] | None = None

    def order(self, epoch: int | None = None) -> list[int]:
        """This rank's indices of ``epoch`` (default: the current one), in order.

        Args:
            epoch: the epoch.

        Returns:
            The indices.

        Examples:
            >>> ResumableSampler(5, shuffle=False, rank=1, world_size=2).order()
            [1, 3]
        """
        epoch = self.epoch if epoch is None else check_int("epoch", epoch, minimum=0)
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            generator = torch.Generator().manual_seed(_seed_for(self.seed, epoch))
            full = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            full = list(range(self.num_samples))
        order = full[self.rank::self.world_size]
        self._cached = (epoch, order)
        return order

    def __len__(self) -> int:
        return len(self.order())

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        while self.position < len(order):
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int | bool]:
        """The data position and what defines the order.

        Returns:
            ``{"seed", "epoch", "position", "num_samples", "shuffle", "rank", "world_size"}``.

        Examples:
            >>> ResumableSampler(4, seed=7).state_dict()["seed"]
            7
        """
        return {
            "seed": self.seed, "epoch": self.epoch, "position": self.position, "num_samples": self.num_samples,
            "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position (and seed) of `state_dict`.

        The order must be the same one: a different ``num_samples``, ``shuffle``, ``rank`` or
        ``world_size`` would make the position point elsewhere, so it raises.

        Args:
            state: what `state_dict` returned.

        Returns:
            None.

        Examples:
            >>> sampler = ResumableSampler(4)
            >>> sampler.load_state_dict(dict(ResumableSampler(4).state_dict(), epoch=2, position=1))
            >>> sampler.epoch, sampler.position
            (2, 1)
        """
        expected = {"seed", "epoch", "position", "num_samples", "shuffle", "rank", "world_size"}
        if not isinstance(state, dict) or set(state) != expected:
            raise ValueError(f"Expected `state` with keys {sorted(expected)}, but got {state!r}.")
        for name in ("num_samples", "shuffle", "rank", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"Expected the saved `{name}` to match this sampler's ({getattr(self, name)!r}), but got "
                    f"{state[name]!r}: resuming with another order would not continue the run."
                )
        self.seed = check_int("seed", state["seed"])
        self.epoch = check_int("epoch", state["epoch"], minimum=0)
        self._cached = None
        position = check_int("position", state["position"], minimum=0)
        if position > len(self.order()):
            raise ValueError(f"Expected `position` in [0, {len(self.order())}], but got {position}.")
        self.position = position


class _Guarded(torch.utils.data.Dataset):
    """Returns a `BadSample` instead of raising it, so that workers pass it back in order."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except BadSample as bad:
            return bad


def _identity(item: Any) -> Any:
    return item


class SkippingLoader:
    """Batches of good samples in a seeded, resumable order; bad samples counted and skipped.

    Iterating yields ``collate_fn(list of batch_size samples)`` (a plain list without
    ``collate_fn``), reading the dataset in the order of ``sampler`` across epochs. A sample that
    raises `BadSample` is recorded in ``tally``, logged with its id (logger ``mosaic_kit.data``)
    and skipped; it is never replaced, so a given order and data set always give the same batches.
    Any other exception propagates.

    The iteration is endless unless ``max_epochs`` is given; then it stops after that many epochs
    (counting from epoch 0), yielding the last partial batch unless ``drop_last``. Batches may
    span two epochs.

    With ``num_workers > 0`` a `torch.utils.data.DataLoader` reads ahead; the data position only
    counts samples handed to the consumer, so `state_dict` taken after a batch is exact.

    Args:
        dataset: a map-style dataset.
        batch_size: good samples per batch.
        collate_fn: turns a list of samples into a batch (e.g. a `functools.partial` of
            `collate_samples`).
        sampler: the order (default: ``ResumableSampler(len(dataset), seed)``).
        seed: the data seed when no sampler is given.
        num_workers: DataLoader worker processes (0: read in this process).
        max_epochs: stop after this many epochs (None: endless).
        drop_last: drop the final partial batch when ``max_epochs`` ends the iteration.
        tally: where bad samples are counted (default: a new `BadDataTally`).
        **loader_kwargs: passed to the DataLoader (``prefetch_factor``, ``pin_memory``, ...).

    Examples:
        >>> class Data(torch.utils.data.Dataset):
        ...     def __len__(self): return 7
        ...     def __getitem__(self, i):
        ...         if i == 3:
        ...             raise BadSample("empty_mask", f"s{i}", "mask has no pixel inside")
        ...         return i
        >>> loader = SkippingLoader(Data(), batch_size=2, sampler=ResumableSampler(7, shuffle=False), max_epochs=1)
        >>> list(loader), loader.tally.counts
        ([[0, 1], [2, 4], [5, 6]], {'empty_mask': 1})
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        sampler: ResumableSampler | None = None,
        seed: int = 0,
        num_workers: int = 0,
        max_epochs: int | None = None,
        drop_last: bool = False,
        tally: BadDataTally | None = None,
        **loader_kwargs: Any,
    ) -> None:
        self.dataset = dataset
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        if collate_fn is not None and not callable(collate_fn):
            raise ValueError(f"Expected `collate_fn` to be callable or None, but got {collate_fn!r}.")
        self.collate_fn = collate_fn
        if sampler is None:
            sampler = ResumableSampler(len(dataset), seed=seed)
        if not isinstance(sampler, ResumableSampler):
            raise ValueError(f"Expected `sampler` to be a ResumableSampler, but got {type(sampler).__name__}.")
        if sampler.num_samples != len(dataset):
            raise ValueError(
                f"Expected `sampler.num_samples` = len(dataset) = {len(dataset)}, but got {sampler.num_samples}."
            )
        self.sampler = sampler
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.max_epochs = None if max_epochs is None else check_int("max_epochs", max_epochs, minimum=0)
        self.drop_last = bool(drop_last)
        self.tally = BadDataTally() if tally is None else tally
        self.loader_kwargs = loader_kwargs

    def _read(self, indices: list[int]) -> Iterator[Any]:
        """The samples (or BadSample objects) of ``indices``, in order."""
        if self.num_workers == 0:
            guarded = _Guarded(self.dataset)
            for index in indices:
                yield guarded[index]
            return
        loader = torch.utils.data.DataLoader(
            _Guarded(self.dataset), batch_size=None, sampler=indices, num_workers=self.num_workers,
            collate_fn=_identity, **self.loader_kwargs,
        )
        yield from loader

    def __iter__(self) -> Iterator[Any]:
        batch: list[Any] = []
        sampler = self.sampler
        while self.max_epochs is None or sampler.epoch < self.max_epochs:
            order = sampler.order()
            if not order and self.max_epochs is None:
                raise ValueError("Expected a non-empty order for an endless loader, but this rank has no samples.")
            good = sampler.position > 0  # a resumed epoch had good samples before, or none were read yet
            for item in self._read(order[sampler.position:]):
                sampler.position += 1
                if isinstance(item, BadSample):
                    self.tally.record(item)
                    log.warning("skipping bad sample %s", item)
                    continue
                good = True
                batch.append(item)
                if len(batch) == self.batch_size:
                    out, batch = batch, []
                    yield out if self.collate_fn is None else self.collate_fn(out)
            if not good and self.max_epochs is None:
                raise RuntimeError(
                    f"Every sample of epoch {sampler.epoch} was bad ({self.tally.total} skipped in all): "
                    "an endless loader would never yield a batch."
                )
            sampler.epoch += 1
            sampler.position = 0
        if batch and not self.drop_last:
            yield batch if self.collate_fn is None else self.collate_fn(batch)

    def state_dict(self) -> dict[str, Any]:
        """The data position and the tally (save it with each checkpoint).

        Returns:
            ``{"sampler": ResumableSampler.state_dict(), "tally": BadDataTally.state_dict()}``.

        Examples:
            >>> loader = SkippingLoader(list(range(10)), batch_size=3, seed=1)
            >>> batches = iter(loader)
            >>> first = next(batches)
            >>> state = loader.state_dict()
            >>> state["sampler"]["epoch"], state["sampler"]["position"]
            (0, 3)
            >>> resumed = SkippingLoader(list(range(10)), batch_size=3, seed=1)
            >>> resumed.load_state_dict(state)
            >>> next(iter(resumed)) == next(batches)
            True
        """
        return {"sampler": self.sampler.state_dict(), "tally": self.tally.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict`; the next iteration continues where the saved run stopped.

        Args:
            state: what `state_dict` returned.

        Returns:
            None.

        Examples:
            >>> loader = SkippingLoader(list(range(4)), batch_size=2, seed=0)
            >>> loader.load_state_dict(dict(loader.state_dict(), sampler=dict(loader.sampler.state_dict(), epoch=5)))
            >>> loader.sampler.epoch
            5
        """
        if not isinstance(state, dict) or set(state) != {"sampler", "tally"}:
            raise ValueError(f"Expected `state` with keys ['sampler', 'tally'], but got {state!r}.")
        self.sampler.load_state_dict(state["sampler"])
        self.tally.load_state_dict(state["tally"])
