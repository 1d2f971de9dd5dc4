"""ResumableSampler and SkippingLoader: exact resume, bad samples skipped deterministically, workers."""

import functools

import pytest
import torch

from mosaic_kit.data import (
    BadDataTally,
    BadSample,
    MultiSubjectSample,
    ResumableSampler,
    SkippingLoader,
    collate_samples,
)


class Flaky(torch.utils.data.Dataset):
    """Items are their index; every 5th is bad, with a kind that rotates."""

    kinds = ("unreadable_image", "missing_coordinates", "empty_mask")

    def __init__(self, size: int = 23) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        if index % 5 == 4:
            raise BadSample(self.kinds[index // 5 % 3], f"item{index}", "broken on purpose")
        return index


class Images(Flaky):
    def __getitem__(self, index: int) -> MultiSubjectSample:
        value = super().__getitem__(index)
        image = torch.full((3, 32, 32), value / self.size)
        return MultiSubjectSample(f"item{index}", image, [image[:, :16, :16]], f"c{index}", [torch.tensor([[1.0, 1.0, 2.0, 2.0]])])


def test_sampler_orders_are_seeded_permutations_shared_by_ranks():
    sampler = ResumableSampler(10, seed=4)
    assert sorted(sampler.order(0)) == list(range(10)) and sampler.order(0) != sampler.order(1)
    assert ResumableSampler(10, seed=4).order(3) == sampler.order(3) and ResumableSampler(10, seed=5).order(0) != sampler.order(0)
    ranks = [ResumableSampler(10, seed=4, rank=r, world_size=3).order(2) for r in range(3)]
    assert sorted(i for rank in ranks for i in rank) == list(range(10)) and len(ranks[0]) == 4 and len(ranks[2]) == 3
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, rank=3, world_size=3)


def test_sampler_state_round_trip_continues_identically():
    reference = ResumableSampler(9, seed=2)
    uninterrupted = list(reference) + list(reference) + list(reference)[:4]
    sampler = ResumableSampler(9, seed=2)
    seen = list(sampler)
    iterator = iter(sampler)
    seen += [next(iterator) for _ in range(5)]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"], state["seed"]) == (1, 5, 2)
    resumed = ResumableSampler(9, seed=0)  # the seed comes back from the state
    resumed.load_state_dict(state)
    seen += list(resumed) + list(resumed)[:4]
    assert seen == uninterrupted
    for key, value in (("num_samples", 8), ("world_size", 2), ("shuffle", False)):
        with pytest.raises(ValueError, match=f"saved `{key}`"):
            ResumableSampler(9).load_state_dict(dict(state, **{key: value}))
    with pytest.raises(ValueError, match="position"):
        ResumableSampler(9).load_state_dict(dict(state, position=10))
    with pytest.raises(ValueError, match="keys"):
        ResumableSampler(9).load_state_dict({"epoch": 1})


def _run(loader: SkippingLoader, steps: int) -> list:
    iterator = iter(loader)
    return [next(iterator) for _ in range(steps)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_matches_an_uninterrupted_run(num_workers):
    data = Flaky()
    full_loader = SkippingLoader(data, batch_size=4, seed=9, num_workers=num_workers)
    full = _run(full_loader, 12)  # more than two epochs (18 good items each)
    first = SkippingLoader(data, batch_size=4, seed=9, num_workers=num_workers)
    iterator = iter(first)
    head = [next(iterator) for _ in range(7)]
    state = first.state_dict()  # what a checkpoint after step 7 saves
    del iterator  # the run is killed; workers had read ahead
    resumed = SkippingLoader(data, batch_size=4, seed=9, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = _run(resumed, 5)
    assert head + tail == full
    assert resumed.tally.state_dict() == full_loader.tally.state_dict()
    assert all(x % 5 != 4 for batch in full for x in batch)
    assert set(full_loader.tally.counts) == set(Flaky.kinds)


def test_loader_epochs_skip_bad_samples_without_replacement():
    data = Flaky(12)
    loader = SkippingLoader(data, batch_size=5, sampler=ResumableSampler(12, shuffle=False), max_epochs=2)
    batches = list(loader)
    flat = [x for batch in batches for x in batch]
    good = [i for i in range(12) if i % 5 != 4]
    assert flat == good + good and [len(b) for b in batches] == [5, 5, 5, 5]
    assert loader.tally.counts == {"unreadable_image": 2, "missing_coordinates": 2}
    assert loader.tally.ids["unreadable_image"] == ["item4", "item4"]
    dropping = SkippingLoader(data, batch_size=7, sampler=ResumableSampler(12, shuffle=False), max_epochs=1, drop_last=True)
    assert [len(b) for b in dropping] == [7]
    printed = str(loader.tally)
    assert printed.splitlines()[0] == "bad data skipped: 4"


def test_loader_with_collate_and_errors():
    data = Images(10)
    collate = functools.partial(collate_samples, target_size=32, ref_size=16)
    loader = SkippingLoader(data, batch_size=3, collate_fn=collate, seed=1, max_epochs=1)
    batches = list(loader)
    assert [b.batch_size for b in batches] == [3, 3, 2] and loader.tally.total == 2
    assert all(not sid.endswith(("4", "9")) for b in batches for sid in b.sample_ids)

    class AllBad(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            raise BadSample("empty_mask", f"x{index}", "empty")

    with pytest.raises(RuntimeError, match="Every sample of epoch 0 was bad"):
        next(iter(SkippingLoader(AllBad(), batch_size=1)))

    class Buggy(Flaky):
        def __getitem__(self, index):
            raise KeyError("a bug, not bad data")

    with pytest.raises(KeyError):
        next(iter(SkippingLoader(Buggy(), batch_size=1)))
    with pytest.raises(ValueError, match="num_samples"):
        SkippingLoader(data, batch_size=1, sampler=ResumableSampler(3))
    with pytest.raises(ValueError, match="batch_size"):
        SkippingLoader(data, batch_size=0)
    with pytest.raises(ValueError, match="keys"):
        SkippingLoader(data, batch_size=1).load_state_dict({"sampler": {}})
    assert BadDataTally().merge(loader.tally).total == 2
