"""The fused pair path against the chunked torch path (the reference)."""

import pytest
import torch
from helpers import random_corr, random_qk

from mosaic_kit.attention import RefTargetCapture
from mosaic_kit.correspondence import Correspondences


def _pairs(corr, queries, keys, backend):
    capture = RefTargetCapture(corr, aggregate=None, backend=backend)
    for q, k in zip(queries, keys):
        capture.add(q, k)
    return capture.result().pair_log_probs


def _compare(corr, queries, keys, rtol, atol, grad_rtol):
    reference = _pairs(corr, queries, keys, "torch")
    fused = _pairs(corr, queries, keys, "fused")
    torch.testing.assert_close(fused, reference, rtol=rtol, atol=atol)
    weights = torch.linspace(-1, 1, reference.numel(), dtype=reference.dtype, device=reference.device).view_as(reference)
    g_ref = torch.autograd.grad((reference * weights).sum(), queries + keys)
    g_fused = torch.autograd.grad((fused * weights).sum(), queries + keys)
    for a, b in zip(g_fused, g_ref):
        scale = b.double().abs().max().clamp_min(1e-30)
        assert ((a.double() - b.double()).abs().max() / scale).item() < grad_rtol


@pytest.mark.parametrize("seed, batch, refs, blocks, heads, dim", [(0, 1, 1, 1, 1, 4), (1, 2, 4, 2, 3, 8), (2, 3, 6, 3, 2, 16)])
def test_fused_equals_torch_float64(seed, batch, refs, blocks, heads, dim):
    corr = random_corr(seed, batch, refs)
    queries, keys = random_qk(corr, blocks, heads, dim, seed=seed)
    _compare(corr, queries, keys, rtol=1e-10, atol=1e-12, grad_rtol=1e-10)


def test_fused_gradcheck_and_bf16():
    corr = random_corr(4, 2, 3, tgt_tokens=6)
    queries, keys = random_qk(corr, 2, 2, 4)

    def fn(*tensors):
        return _pairs(corr, tensors[:2], tensors[2:], "fused")

    assert torch.autograd.gradcheck(fn, tuple(queries + keys), eps=1e-6, atol=1e-7)
    queries, keys = random_qk(corr, 2, 2, 8, dtype=torch.bfloat16, scale=40.0)
    out = _pairs(corr, queries, keys, "fused")
    grads = torch.autograd.grad(out.sum(), queries + keys)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_fused_needs_pairs_only():
    corr = random_corr(0, 1, 2)
    with pytest.raises(ValueError, match="`aggregate=None` with backend 'fused'"):
        RefTargetCapture(corr, aggregate="points", backend="fused")
    with pytest.raises(ValueError, match=r"`backend` to be one of \['torch', 'fused', 'auto'\]"):
        RefTargetCapture(corr, backend="xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_on_cuda(dtype):
    """Runs torch's efficient-attention kernel, or xformers' when installed."""
    corr = random_corr(5, 2, 4, tgt_tokens=64).to("cuda")
    queries, keys = random_qk(corr, 2, 4, 64, dtype=torch.float32)
    queries = [q.detach().to("cuda", dtype).requires_grad_() for q in queries]
    keys = [k.detach().to("cuda", dtype).requires_grad_() for k in keys]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    _compare(corr, queries, keys, rtol=tolerance, atol=tolerance, grad_rtol=tolerance)


def test_fused_without_points_returns_zeros():
    corr = Correspondences.from_dicts([[{}, {}], []], [2, 3], 4)
    queries, keys = random_qk(corr, 2, 2, 4)
    out = _pairs(corr, queries, keys, "fused")
    assert out.shape == (2, 2, 0)
    padded = Correspondences.from_dicts([[{0: 1}, {}], [{}]], [2, 3], 4).with_point_mask(torch.zeros(2, 2, 1, dtype=torch.bool))
    assert torch.equal(_pairs(padded, queries, keys, "fused"), torch.zeros(2, 2, 1, dtype=torch.float64))
