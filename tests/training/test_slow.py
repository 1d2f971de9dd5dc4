"""Longer checks, run with `pytest -m slow`."""

import pytest
import torch
from helpers import random_corr, random_qk

from mosaic_kit.attention import RefTargetCapture, dense_ref_target_attention
from mosaic_kit.losses.functional import mdl, scal


@pytest.mark.slow
@pytest.mark.parametrize("aggregate", ["points", "all"])
def test_medium_size_capture_with_default_chunking_equals_dense(aggregate):
    """Hundreds of target tokens, many chunks from the default budget, float64."""
    corr = random_corr(21, 2, 5, tgt_tokens=400, ref_token_range=(40, 140), max_points=40)
    queries, keys = random_qk(corr, 4, 6, 32, seed=21)
    capture = RefTargetCapture(corr, aggregate=aggregate)
    for q, k in zip(queries, keys):
        capture.add(q, k)
    out = capture.result()
    dense = dense_ref_target_attention(queries, keys)
    for fn, kwargs in ((scal, {}), (mdl, {"aggregate": aggregate})):
        fast, slow = fn(out, corr, **kwargs), fn(dense, corr, **kwargs)
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)
        fast_grads = torch.autograd.grad(fast, queries + keys, retain_graph=True)
        slow_grads = torch.autograd.grad(slow, queries + keys, retain_graph=True)
        for a, b in zip(fast_grads, slow_grads):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
