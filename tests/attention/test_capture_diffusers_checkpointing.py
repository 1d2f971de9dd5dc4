"""A capture fed inside a tiny real diffusers model with `enable_gradient_checkpointing()`
(non-reentrant, diffusers' default): equal values, gradients and block counts with checkpointing
on and off; with reentrant checkpointing the first `add` raises. The processor here is a test
stand-in (it recomputes the image stream's q and k and then runs the stock processor); the
library's own processors are in `mosaic_kit.models`."""

import functools

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch.utils.checkpoint import checkpoint

from mosaic_kit.attention import RefTargetCapture
from mosaic_kit.correspondence import Correspondences

TARGET = 12  # image tokens 0..11 stand for the target, 12..15 for two references of 2 tokens


class FeedingProcessor(JointAttnProcessor2_0):
    """The stock SD3 processor, plus: post-norm q of the reference tokens and k of the target
    tokens go to ``capture.add`` inside the (checkpointed) block."""

    def __init__(self, capture):
        super().__init__()
        self.capture = capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch = hidden_states.shape[0]
        query = attn.norm_q(attn.to_q(hidden_states).view(batch, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2))
        key = attn.norm_k(attn.to_k(hidden_states).view(batch, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2))
        self.capture.add(query[:, :, TARGET:], key[:, :, :TARGET])
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def _model():
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm",
    ).double()


def _step(model, corr, inputs):
    capture = RefTargetCapture(corr, aggregate="all")
    model.set_attn_processor(FeedingProcessor(capture))
    out = model(**inputs).sample
    result = capture.result()
    loss = out.square().mean() + result.pair_log_probs.sum() + result.ref_rows.square().sum()
    blocks_forward = capture.num_blocks
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), result, grads, (blocks_forward, capture.num_blocks)


def test_diffusers_gradient_checkpointing_gives_equal_values_gradients_and_block_counts():
    corr = Correspondences.from_dicts([[{0: 3, 1: 5}, {1: 10}]], ref_tokens=[2, 2], tgt_tokens=TARGET)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=gen).double(),
        encoder_hidden_states=torch.randn(1, 3, 16, generator=gen).double(),
        pooled_projections=torch.randn(1, 16, generator=gen).double(),
        timestep=torch.tensor([500.0]),
    )
    plain_model, checked_model = _model(), _model()
    checked_model.enable_gradient_checkpointing()  # diffusers: torch.utils.checkpoint, use_reentrant=False
    checked_model.train()
    plain_model.train()
    plain = _step(plain_model, corr, inputs)
    checked = _step(checked_model, corr, inputs)
    assert plain[3] == checked[3] == (2, 2)
    torch.testing.assert_close(checked[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(checked[1].pair_log_probs, plain[1].pair_log_probs, rtol=0, atol=0)
    assert plain[2].keys() == checked[2].keys() and any("attn.to_q" in name for name in plain[2])
    for name, grad in plain[2].items():
        torch.testing.assert_close(checked[2][name], grad, rtol=1e-12, atol=1e-12, msg=name)

    reentrant_model = _model()
    reentrant_model.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=True))
    reentrant_model.train()
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        _step(reentrant_model, corr, inputs)
