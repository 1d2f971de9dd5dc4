"""collate_samples padding and masks, and seeded condition dropout."""

import pytest
import torch

from mosaic_kit.correspondence import TokenGrid, is_disjoint
from mosaic_kit.data import (
    MosaicBatch,
    MultiSubjectSample,
    apply_condition_dropout,
    collate_samples,
)


def _sample(name: str, num_refs: int, size: int = 64, ref_size: int = 32, with_masks: bool = True) -> MultiSubjectSample:
    g = torch.Generator().manual_seed(len(name) * 7 + num_refs)
    target = torch.rand(3, size, size, generator=g)
    references = [torch.rand(3, ref_size, ref_size, generator=g) for _ in range(num_refs)]
    pairs = []
    for k in range(num_refs):
        # One pair per reference, on distinct target tokens: (k*16 + 4, 4) → token k of a 64-pixel grid.
        pairs.append(torch.tensor([[4.0 + k, 4.0, 16.0 * k + 4, 4.0]]) * torch.tensor([ref_size / 32, ref_size / 32, size / 64, size / 64]))
    target_masks, reference_masks = [], []
    for k in range(num_refs):
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[:, k * size // 8:(k + 1) * size // 8] = True
        target_masks.append(mask if with_masks and k % 2 == 0 else None)
        reference_masks.append(torch.ones(ref_size, ref_size, dtype=torch.bool) if with_masks and k == 0 else None)
    return MultiSubjectSample(name, target, references, f"caption {name}", pairs, target_masks, reference_masks,
                              {"name": name})


def test_padding_shapes_and_masks():
    samples = [_sample("a", 1), _sample("bb", 3), _sample("ccc", 0), _sample("d", 2, with_masks=False)]
    batch = collate_samples(samples, target_size=64, ref_size=32)
    assert isinstance(batch, MosaicBatch) and (batch.batch_size, batch.num_refs) == (4, 3)
    assert tuple(batch.targets.shape) == (4, 3, 64, 64) and tuple(batch.references.shape) == (4, 3, 3, 32, 32)
    present = [[True, False, False], [True, True, True], [False, False, False], [True, True, False]]
    assert batch.reference_present.tolist() == present
    assert torch.equal(batch.corr.ref_present, batch.reference_present)
    assert batch.corr.ref_tokens == (4, 4, 4) and batch.corr.tgt_tokens == 16
    assert batch.corr.num_points.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]]
    for b, sample in enumerate(samples):
        assert torch.equal(batch.targets[b], sample.target)
        for k in range(3):
            if k < sample.num_refs:
                assert torch.equal(batch.references[b, k], sample.references[k])
            else:
                assert not bool(batch.references[b, k].any())  # black padding
    assert batch.target_mask_present.tolist() == [[True, False, False], [True, False, True], [False] * 3, [False] * 3]
    assert torch.equal(batch.target_masks[1, 2], samples[1].target_masks[2])
    assert not bool(batch.target_masks[1, 1].any()) and not bool(batch.target_masks[3].any())
    assert batch.reference_mask_present.tolist() == [[True, False, False], [True, False, False], [False] * 3, [False] * 3]
    assert batch.captions == ["caption a", "caption bb", "caption ccc", "caption d"]
    assert batch.sample_ids == ["a", "bb", "ccc", "d"] and batch.meta[1] == {"name": "bb"}
    assert batch.corr.to_dicts() == [[{0: 0}], [{0: 0}, {0: 1}, {0: 2}], [], [{0: 0}, {0: 1}]]
    assert batch.target_grid == TokenGrid(64, 64) and batch.ref_grid == TokenGrid(32, 32)
    assert not bool(batch.caption_dropped.any()) and not bool(batch.references_dropped.any())
    moved = batch.to("cpu")
    assert torch.equal(moved.targets, batch.targets) and moved.captions == batch.captions


def test_max_refs_resizing_and_errors():
    samples = [_sample("a", 1, size=128, ref_size=64), _sample("b", 2)]
    batch = collate_samples(samples, target_size=(32, 64), ref_size=16, max_refs=4)
    assert tuple(batch.references.shape) == (2, 4, 3, 16, 16) and tuple(batch.targets.shape) == (2, 3, 32, 64)
    assert tuple(batch.target_masks.shape) == (2, 4, 32, 64) and tuple(batch.reference_masks.shape) == (2, 4, 16, 16)
    # Pair (8, 8, 8, 8) in the 64/128 frames → (2, 2) in the 16-pixel reference, (4, 2) in the 64×32 target.
    assert batch.corr.to_dicts()[0] == [{0: 0}]
    assert batch.corr.num_refs == 4 and batch.reference_present.tolist() == [[True, False, False, False],
                                                                             [True, True, False, False]]
    with pytest.raises(ValueError, match=r"at most `max_refs` = 1 references per sample, but 'b' has 2"):
        collate_samples(samples, 64, 32, max_refs=1)
    with pytest.raises(ValueError, match="multiples of 16"):
        collate_samples(samples, 40, 32)
    with pytest.raises(ValueError, match="disjoint"):
        collate_samples(samples, 64, 32, disjoint="confidence")
    with pytest.raises(ValueError, match="non-empty list"):
        collate_samples([], 64, 32)
    outside = MultiSubjectSample("x", torch.rand(3, 64, 64), [torch.rand(3, 32, 32)], "", [torch.tensor([[1.0, 1.0, 64.0, 2.0]])])
    with pytest.raises(ValueError, match=r"inside its images \(samples \['x'\]\)"):
        collate_samples([outside], 64, 32)


def test_no_references_at_all():
    batch = collate_samples([_sample("a", 0), _sample("b", 0)], 64, 32)
    assert tuple(batch.references.shape) == (2, 0, 3, 32, 32) and batch.corr.num_refs == 0
    assert tuple(batch.target_masks.shape) == (2, 0, 64, 64)
    out = apply_condition_dropout(batch, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert out.captions == ["", ""] and out.references_dropped.tolist() == [True, True]


def test_collate_enforces_eq2_at_its_own_grid():
    # Two references whose target points are 8 pixels apart: distinct tokens at 64 px, one token at 32 px.
    sample = MultiSubjectSample(
        "s", torch.rand(3, 64, 64), [torch.rand(3, 32, 32)] * 2, "",
        [torch.tensor([[4.0, 4.0, 4.0, 4.0]]), torch.tensor([[4.0, 4.0, 20.0, 4.0]])],
    )
    assert collate_samples([sample], 64, 32).corr.num_points.tolist() == [[1, 1]]
    coarse = collate_samples([sample], 32, 32)
    assert coarse.corr.num_points.tolist() == [[0, 0]] and bool(is_disjoint(coarse.corr).all())
    assert collate_samples([sample], 32, 32, disjoint="first").corr.num_points.tolist() == [[1, 0]]
    assert not bool(is_disjoint(collate_samples([sample], 32, 32, disjoint="none").corr).all())
    with pytest.raises(ValueError, match="eq. 2"):
        collate_samples([sample], 32, 32, disjoint="strict")


def test_condition_dropout_is_seeded_and_complete():
    batch = collate_samples([_sample(str(i) * (i + 1), 1 + i % 3) for i in range(16)], 64, 32)
    first = apply_condition_dropout(batch, 0.3, 0.4, torch.Generator().manual_seed(7))
    second = apply_condition_dropout(batch, 0.3, 0.4, torch.Generator().manual_seed(7))
    assert first.captions == second.captions
    assert torch.equal(first.references, second.references)
    assert torch.equal(first.references_dropped, second.references_dropped)
    # The draws: B for captions, then B for references, whatever the probabilities.
    draws = torch.rand(32, generator=torch.Generator().manual_seed(7))
    assert first.caption_dropped.tolist() == (draws[:16] < 0.3).tolist()
    assert first.references_dropped.tolist() == (draws[16:] < 0.4).tolist()
    generator = torch.Generator().manual_seed(7)
    apply_condition_dropout(batch, 0.0, 0.0, generator)
    assert torch.equal(torch.rand(1, generator=generator), torch.rand(33, generator=torch.Generator().manual_seed(7))[32:])
    for b in range(16):
        dropped_caption, dropped_refs = bool(first.caption_dropped[b]), bool(first.references_dropped[b])
        assert first.captions[b] == ("" if dropped_caption else batch.captions[b])
        if dropped_refs:
            assert not bool(first.references[b].any()) and not bool(first.reference_present[b].any())
            assert not bool(first.corr.ref_present[b].any()) and not bool(first.corr.point_mask[b].any())
            assert not bool(first.reference_masks[b].any()) and not bool(first.reference_mask_present[b].any())
        else:
            assert torch.equal(first.references[b], batch.references[b])
            assert torch.equal(first.corr.point_mask[b], batch.corr.point_mask[b])
        assert torch.equal(first.targets[b], batch.targets[b])
    assert 0 < int(first.caption_dropped.sum()) < 16 and 0 < int(first.references_dropped.sum()) < 16
    nothing = apply_condition_dropout(batch, 0.0, 0.0, torch.Generator().manual_seed(1))
    assert nothing.captions == batch.captions and torch.equal(nothing.references, batch.references)
    everything = apply_condition_dropout(batch, 1.0, 1.0, torch.Generator().manual_seed(1), empty_caption="<empty>")
    assert set(everything.captions) == {"<empty>"} and not bool(everything.reference_present.any())
    assert int(everything.corr.num_points.sum()) == 0
    # Drops accumulate over calls.
    twice = apply_condition_dropout(first, 0.3, 0.4, torch.Generator().manual_seed(8))
    assert bool((twice.references_dropped >= first.references_dropped).all())
    for value, message in ((1.5, "caption_p"), (-0.1, "caption_p")):
        with pytest.raises(ValueError, match=message):
            apply_condition_dropout(batch, value, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="image_p"):
        apply_condition_dropout(batch, 0.0, True, torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        apply_condition_dropout(batch, 0.1, 0.1, 7)
