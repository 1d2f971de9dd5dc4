"""`RefTargetCapture.prepare`: building the indices ahead of the first `add` (what a compiled
block needs) changes nothing, a capture prepared for another dtype or device is rebuilt until a
block is fed, and bad arguments are refused."""

from __future__ import annotations

import pytest
import torch

from mosaic_kit.attention import RefTargetCapture
from mosaic_kit.correspondence import Correspondences


def _corr():
    return Correspondences.from_dicts([[{0: 1, 2: 3}, {1: 0}], [{1: 2}, {0: 0, 1: 3}]], ref_tokens=[3, 2], tgt_tokens=4)


@torch.no_grad()
def _feed(capture, blocks, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    for _ in range(blocks):
        capture.add(torch.randn(2, 3, 5, 4, generator=gen, dtype=dtype), torch.randn(2, 3, 4, 4, generator=gen, dtype=dtype))
    return capture.result()


@pytest.mark.parametrize("aggregate", ["points", "all", None])
def test_a_prepared_capture_gives_the_same_result(aggregate):
    plain = _feed(RefTargetCapture(_corr(), aggregate=aggregate, max_chunk_elements=16), 3)
    prepared = RefTargetCapture(_corr(), aggregate=aggregate, max_chunk_elements=16)
    prepared.prepare("cpu", torch.float64, heads=3)
    got = _feed(prepared, 3)
    assert torch.equal(got.pair_log_probs, plain.pair_log_probs)
    assert (got.ref_rows is None) == (plain.ref_rows is None)
    if got.ref_rows is not None:
        assert torch.equal(got.ref_rows, plain.ref_rows)
    assert (got.num_blocks, got.num_heads) == (3, 3)


def test_prepared_for_another_dtype_is_rebuilt_until_a_block_is_fed():
    capture = RefTargetCapture(_corr())
    capture.prepare("cpu", torch.float64)  # e.g. the model's parameters, while autocast feeds float32
    out = _feed(capture, 1, dtype=torch.float32)
    assert out.pair_log_probs.dtype == torch.float32
    capture.reset()
    with torch.no_grad(), pytest.raises(ValueError, match="float64"):  # fed in float32: a block may not switch
        capture.add(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 4, 4))
        capture.add(torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_prepare_refuses_bad_arguments():
    capture = RefTargetCapture(_corr())
    with pytest.raises(ValueError, match="dtype"):
        capture.prepare("cpu", torch.long)
    with pytest.raises(ValueError, match="heads"):
        capture.prepare("cpu", torch.float32, heads=0)
