"""In-sequence capture processors (mosaic_kit.models.insequence) on tiny random diffusers DiTs.

For each model family: the processors idle give the stock output bit for bit; active, the
output is still the stock one, and the captured statistics equal a dense float64 computation
from queries and keys obtained independently (forward hooks on the attention's q/k norms plus
a plain RoPE written here); gradients reach the LoRA parameters and equal the dense twin's;
gradient checkpointing on and off give equal values, gradients and block counts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import (  # noqa: E402
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.models.attention_dispatch import AttentionBackendName  # noqa: E402
from peft import LoraConfig  # noqa: E402

from mosaic_kit.attention import RefTargetCapture, dense_ref_target_attention  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models import SequenceLayout, install_capture_processors  # noqa: E402

TEXT = 3
TGT, REF = 16, 4  # a 4x4 target and two 2x2 references (FLUX, FLUX.2, Qwen)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# -- a plain RoPE, written independently of diffusers' helpers ------------------------------------------
def _rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates consecutive pairs (x[2i], x[2i+1]) by the angle of pair i; x (B, S, H, D), cos/sin (S, D/2).

    In float32 whatever x's dtype, as diffusers' RoPE does (so a float64 model's post-RoPE q/k carry
    float32 rounding: the twin must see the same values the model's softmax sees).
    """
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    c, s = cos[None, :, None, :].float(), sin[None, :, None, :].float()
    return torch.stack([even * c - odd * s, odd * c + even * s], dim=-1).flatten(-2).to(x.dtype)


def _flux_rope(x, rotary, n_img):
    cos, sin = rotary  # (S_joint, D), each angle repeated for its pair
    return _rope_pairs(x, cos[-n_img:, 0::2], sin[-n_img:, 0::2])


def _qwen_rope(x, rotary, n_img):
    freqs = rotary[0][:n_img]  # image frequencies, complex (S_img, D/2)
    return _rope_pairs(x, freqs.real, freqs.imag)


# -- the four families ---------------------------------------------------------------------------------
def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().double()


def _flux_case(batch):
    model = _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)))
    gen = torch.Generator().manual_seed(1)
    ids = [torch.zeros(TGT, 3), torch.zeros(REF, 3), torch.zeros(REF, 3)]
    for i, (n, side) in enumerate(((TGT, 4), (REF, 2), (REF, 2))):  # Kontext: references at index 1
        ids[i][:, 0] = float(i > 0)
        ids[i][:, 1] = torch.arange(n).div(side, rounding_mode="floor").double()
        ids[i][:, 2] = torch.arange(n).remainder(side).double()
    inputs = dict(
        hidden_states=torch.randn(batch, TGT + 2 * REF, 8, generator=gen).double(),
        encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=gen).double(),
        pooled_projections=torch.randn(batch, 16, generator=gen).double(),
        timestep=torch.full((batch,), 0.5, dtype=torch.float64),
        img_ids=torch.cat(ids).double(), txt_ids=torch.zeros(TEXT, 3, dtype=torch.float64),
    )
    return model, inputs, TGT + 2 * REF, _flux_rope, 1


def _chroma_case(batch):
    """Chroma: FLUX.1's blocks and `FluxAttnProcessor`, a modulation approximator instead of the
    pooled text and guidance embeddings; the capture processors work on it unchanged."""
    model = _seeded(lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1))
    _, inputs, *rest = _flux_case(batch)
    del inputs["pooled_projections"]
    return (model, inputs, *rest)


def _flux2_case(batch):
    model = _seeded(lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False))
    gen = torch.Generator().manual_seed(2)
    ids = []
    for i, (n, side) in enumerate(((TGT, 4), (REF, 2), (REF, 2))):  # T = 0 for the target, 10(i+1) for ref i
        block = torch.zeros(n, 4)
        block[:, 0] = 10.0 * i
        block[:, 1] = torch.arange(n).div(side, rounding_mode="floor").float()
        block[:, 2] = torch.arange(n).remainder(side).float()
        ids.append(block)
    txt_ids = torch.zeros(TEXT, 4)
    txt_ids[:, 3] = torch.arange(TEXT).float()
    inputs = dict(
        hidden_states=torch.randn(batch, TGT + 2 * REF, 8, generator=gen).double(),
        encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=gen).double(),
        timestep=torch.full((batch,), 0.5, dtype=torch.float64),
        img_ids=torch.cat(ids).double(), txt_ids=txt_ids.double(),
    )
    return model, inputs, TGT + 2 * REF, _flux_rope, 1


def _sd3_case(batch, dual=(0,)):
    """Target and two references side by side on one canvas (the in-context layout)."""
    model = _seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=dual))
    gen = torch.Generator().manual_seed(3)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 8, 24, generator=gen).double(),  # 4x12 tokens: three 4x4 boxes
        encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=gen).double(),
        pooled_projections=torch.randn(batch, 16, generator=gen).double(),
        timestep=torch.full((batch,), 500.0, dtype=torch.float64),
    )
    return model, inputs, 48, None, 2


def _qwen_case(batch):
    model = _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), zero_cond_t=True))
    gen = torch.Generator().manual_seed(4)
    inputs = dict(
        hidden_states=torch.randn(batch, TGT + 2 * REF, 16, generator=gen).double(),
        encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=gen).double(),
        encoder_hidden_states_mask=torch.ones(batch, TEXT, dtype=torch.long),
        timestep=torch.full((batch,), 0.5, dtype=torch.float64),
        img_shapes=[[(1, 4, 4), (1, 2, 2), (1, 2, 2)]] * batch,
    )
    return model, inputs, TGT + 2 * REF, _qwen_rope, 1


def _sd3_layout():
    return SequenceLayout.from_canvas((4, 12), target=(0, 0, 4, 4), references=[(0, 4, 4, 4), (0, 8, 4, 4)])


def _explicit_positions(layout_name, batch):
    """Per sample: the target's image positions and each reference's, written out by hand."""
    if layout_name == "canvas":  # 4x12 canvas, boxes at columns 0, 4, 8
        box = lambda left: [r * 12 + left + c for r in range(4) for c in range(4)]  # noqa: E731
        return [(box(0), [box(4), box(8)])] * batch
    target, ref1, ref2 = list(range(TGT)), list(range(TGT, TGT + REF)), list(range(TGT + REF, TGT + 2 * REF))
    if layout_name == "swapped":  # sample 1 holds its references in the other order
        return [(target, [ref1, ref2]), (target, [ref2, ref1])][:batch]
    return [(target, [ref1, ref2])] * batch


def _layout(layout_name, batch):
    if layout_name == "canvas":
        return _sd3_layout()
    if layout_name == "swapped":
        rows = [SequenceLayout(torch.tensor([t]), torch.tensor([r1 + r2]), (REF, REF), TGT + 2 * REF)
                for t, (r1, r2) in _explicit_positions("swapped", batch)]
        return SequenceLayout.stack(rows)
    return SequenceLayout.concatenated(TGT, [REF, REF])


CASES = {
    "flux": (_flux_case, "concatenated"),
    "chroma": (_chroma_case, "concatenated"),
    "flux2": (_flux2_case, "swapped"),
    "sd3": (_sd3_case, "canvas"),
    "qwen": (_qwen_case, "concatenated"),
}


def _sizes(name):
    """(N_tgt, N_ref) per reference of each case: SD3's canvas boxes are 4x4 tokens."""
    return (16, 16) if name == "sd3" else (TGT, REF)


def _corr(batch, n_tgt, n_ref):
    gen = torch.Generator().manual_seed(5)
    samples = []
    for _ in range(batch):
        refs = []
        for _k in range(2):
            u = torch.randperm(n_ref, generator=gen)[:3].tolist()
            v = torch.randperm(n_tgt, generator=gen)[:3].tolist()
            refs.append(dict(zip(u, v)))
        samples.append(refs)
    return Correspondences.from_dicts(samples, ref_tokens=[n_ref, n_ref], tgt_tokens=n_tgt)


def _stock_output(build, inputs, trained):
    """The same model (weights and LoRA of ``trained``) with its stock processors."""
    model, *_ = build(inputs["hidden_states"].shape[0])
    _add_lora(model)
    model.load_state_dict(trained.state_dict())
    return _output(model, inputs)


def _output(model, inputs):
    out = model(**inputs, return_dict=False)[0]
    return out


def _hooked_qk(model, handle, n_img, rope, seq_dim):
    """Post-RoPE image q/k of every feeding block, from forward hooks (not from the processors)."""
    records, hooks = {}, []
    for block in handle.block_names:
        attn = model.get_submodule(block).attn
        rec = records.setdefault(block, {})

        def pre(module, args, kwargs, rec=rec):
            rec["rotary"] = kwargs.get("image_rotary_emb")

        def grab(name, rec=rec):
            def hook(module, args, output):
                rec[name] = output
            return hook

        hooks += [attn.register_forward_pre_hook(pre, with_kwargs=True),
                  attn.norm_q.register_forward_hook(grab("q")), attn.norm_k.register_forward_hook(grab("k"))]

    def finish():
        for h in hooks:
            h.remove()
        out = []
        for block in handle.block_names:
            rec = records[block]
            q, k = rec["q"], rec["k"]
            if seq_dim == 2:  # SD3: (B, H, S_img, D), no RoPE
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            else:
                q, k = q[:, -n_img:] if rope is _flux_rope else q, k[:, -n_img:] if rope is _flux_rope else k
                q, k = rope(q, rec["rotary"], n_img), rope(k, rec["rotary"], n_img)
            out.append((q, k))  # (B, S_img, H, D)
        return out

    return finish


def _dense_stats(qk, positions, corr):
    """Dense A (eq. 8) over blocks from hooked q/k, then the pairs' log-probabilities and the mean rows."""
    queries, keys = [], []
    for q, k in qk:
        queries.append(torch.stack([q[b, sum(refs, [])] for b, (_, refs) in enumerate(positions)]).transpose(1, 2))
        keys.append(torch.stack([k[b, tgt] for b, (tgt, _) in enumerate(positions)]).transpose(1, 2))
    attention = dense_ref_target_attention(queries, keys)  # (B, N_ref_total, N_tgt)
    rows = corr.global_rows.clamp_min(0)
    pairs = attention.gather(1, rows.flatten(1)[..., None].expand(-1, -1, corr.tgt_tokens))
    pairs = pairs.gather(2, corr.tgt_index.flatten(1)[..., None]).view(corr.point_mask.shape)
    pair_log = torch.where(corr.point_mask, pairs.log(), torch.zeros_like(pairs))
    mean_rows = torch.stack([
        torch.stack([
            attention[b, rows[b, k][corr.point_mask[b, k]]].mean(0) for k in range(corr.num_refs)
        ]) for b in range(corr.batch_size)
    ])
    return pair_log, mean_rows


def _add_lora(model):
    """A LoRA on q and k with random (non-zero) A and B, the same for every call."""
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model.add_adapter(config)
    model.double()
    return [p for n, p in model.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("name", list(CASES))
def test_idle_processors_give_the_stock_output_and_remove_restores(name):
    build, layout_name = CASES[name]
    model, inputs, *_ = build(2)
    with torch.no_grad():
        stock = _output(model, inputs)
        before = dict(model.attn_processors)
        handle = install_capture_processors(model)
        idle = _output(model, inputs)
        corr = _corr(2, *_sizes(name))
        with handle.capture(RefTargetCapture(corr), _layout(layout_name, 2)) as capture:
            active = _output(model, inputs)
        after_capture = _output(model, inputs)
        handle.remove()
    assert torch.equal(idle, stock)
    assert torch.equal(active, stock)  # the active copy of the stock body is exact too
    assert torch.equal(after_capture, stock)
    assert capture.num_blocks == len(handle.block_names)
    assert all(model.attn_processors[n] is p for n, p in before.items())


@pytest.mark.parametrize("name", list(CASES))
def test_captured_statistics_and_gradients_equal_the_dense_twin(name):
    build, layout_name = CASES[name]
    batch = 2
    model, inputs, n_img, rope, seq_dim = build(batch)
    params = _add_lora(model)
    handle = install_capture_processors(model)
    corr = _corr(batch, *_sizes(name))
    finish = _hooked_qk(model, handle, n_img, rope, seq_dim)
    with handle.capture(RefTargetCapture(corr, aggregate="points"), _layout(layout_name, batch)) as capture:
        _output(model, inputs)
    out = capture.result()
    pair_log, rows = _dense_stats(finish(), _explicit_positions(layout_name, batch), corr)
    assert out.num_blocks == len(handle.block_names)
    torch.testing.assert_close(out.pair_log_probs, pair_log, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.ref_rows, rows, rtol=1e-9, atol=1e-10)
    weights = torch.linspace(0.5, 1.5, rows.shape[-1], dtype=rows.dtype)
    grads = torch.autograd.grad(-out.pair_log_probs.sum() + (out.ref_rows * weights).sum(), params, retain_graph=True)
    dense_grads = torch.autograd.grad(-pair_log.sum() + (rows * weights).sum(), params)
    assert all(bool(g.abs().sum() > 0) for g in grads)
    # the models' RoPE runs in float32 (diffusers casts), so its backward carries float32 rounding
    # that the twin's own float32 RoPE reproduces only to float32 precision, relative to the gradient's
    # size; SD3 has no RoPE and agrees elementwise to 1e-8
    for got, want in zip(grads, dense_grads):
        if rope is None:
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)
        else:
            assert float((got - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("backward_inside", [True, False], ids=["backward-inside-with", "backward-after-with"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradient_checkpointing_gives_equal_values_and_gradients(name, backward_inside):
    build, layout_name = CASES[name]
    batch = 2
    results = []
    for checkpointing in (False, True):
        model, inputs, *_ = build(batch)
        params = _add_lora(model)
        if checkpointing:
            model.enable_gradient_checkpointing()
        handle = install_capture_processors(model)
        corr = _corr(batch, *_sizes(name))
        with handle.capture(RefTargetCapture(corr, aggregate="all"), _layout(layout_name, batch)) as capture:
            output = _output(model, inputs)
            out = capture.result()
            loss = -out.pair_log_probs.sum() + out.ref_rows.square().sum() + output.square().mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:  # the recomputation runs after the `with`: the processors replay the feed
            loss.backward()
        with torch.no_grad():  # and the processors are idle again afterwards
            assert torch.equal(_output(model, inputs), _stock_output(build, inputs, model))
        # a later step without MOSAIC (e.g. its weights are 0): forward and backward stay stock
        blocks = capture.num_blocks
        _output(model, inputs).square().mean().backward()
        assert capture.num_blocks == blocks
        results.append((out.pair_log_probs.detach(), out.ref_rows.detach(), [p.grad.clone() for p in params],
                        capture.num_blocks))
    (pairs0, rows0, grads0, blocks0), (pairs1, rows1, grads1, blocks1) = results
    assert blocks0 == blocks1 == len(handle.block_names)
    torch.testing.assert_close(pairs1, pairs0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows1, rows0, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads1, grads0):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sd35_dual_attention_feeds_once_per_block():
    model, inputs, *_ = _sd3_case(1, dual=(0, 1))
    attn2 = [model.transformer_blocks[i].attn2.processor for i in range(2)]
    handle = install_capture_processors(model)
    corr = _corr(1, 16, 16)
    with torch.no_grad(), handle.capture(RefTargetCapture(corr), _sd3_layout()) as capture:
        _output(model, inputs)
    assert handle.block_names == ("transformer_blocks.0", "transformer_blocks.1")
    assert capture.num_blocks == 2
    # attn2 runs the stock JointAttnProcessor2_0 too (set_attn_processor would reach it): left as it was
    assert all(model.transformer_blocks[i].attn2.processor is attn2[i] for i in range(2))


def test_chosen_blocks_feed_and_the_others_keep_their_processors():
    model, inputs, *_ = _flux_case(1)
    before = dict(model.attn_processors)
    handle = install_capture_processors(model, blocks=["single_transformer_blocks.0"])
    assert handle.block_names == ("single_transformer_blocks.0",)
    assert model.attn_processors["transformer_blocks.0.attn.processor"] is before["transformer_blocks.0.attn.processor"]
    corr = _corr(1, TGT, REF)
    with torch.no_grad(), handle.capture(RefTargetCapture(corr), _layout("concatenated", 1)) as capture:
        _output(model, inputs)
    assert capture.num_blocks == 1
    handle.remove()
    handle = install_capture_processors(model, blocks=lambda block: block.startswith("transformer_blocks"))
    assert handle.block_names == ("transformer_blocks.0",)


def test_bad_input_is_refused_with_the_argument_named():
    model, inputs, *_ = _flux_case(1)
    with pytest.raises(ValueError, match="blocks"):
        install_capture_processors(model, blocks=["transformer_blocks.7"])
    handle = install_capture_processors(model)
    corr = _corr(1, TGT, REF)
    with pytest.raises(ValueError, match="ref_tokens"):
        handle.set_capture(RefTargetCapture(corr), SequenceLayout.concatenated(TGT, [REF, REF + 1]))
    with pytest.raises(ValueError, match="scale"), torch.no_grad():
        with handle.capture(RefTargetCapture(corr, scale=0.5), _layout("concatenated", 1)):
            _output(model, inputs)
    with pytest.raises(ValueError, match="image_tokens"), torch.no_grad():
        with handle.capture(RefTargetCapture(corr), SequenceLayout.concatenated(TGT, [REF, REF], image_tokens=30)):
            _output(model, inputs)
    with pytest.raises(ValueError, match="stock processor"):
        install_capture_processors(model)  # already installed: not the stock processors
    for bad in (
        dict(target_index=torch.tensor([[0, 1]]), ref_index=torch.tensor([[1, 2]]), ref_tokens=(2,), image_tokens=4),
        dict(target_index=torch.tensor([[0, 1]]), ref_index=torch.tensor([[2, 9]]), ref_tokens=(2,), image_tokens=4),
        dict(target_index=torch.tensor([[0, 1]]), ref_index=torch.tensor([[2, 3]]), ref_tokens=(3,), image_tokens=4),
    ):
        with pytest.raises(ValueError):
            SequenceLayout(**bad)
    with pytest.raises(ValueError, match="references\\[0\\]"):
        SequenceLayout.from_canvas((2, 4), target=(0, 0, 2, 2), references=[(0, 3, 2, 2)])


def test_layout_gather_matches_explicit_indexing():
    """`SequenceLayout.split` against plain Python indexing, for shared, canvas and per-sample layouts."""
    gen = torch.Generator().manual_seed(6)
    for layout_name, batch in (("concatenated", 2), ("canvas", 2), ("swapped", 2)):
        layout = _layout(layout_name, batch)
        positions = _explicit_positions(layout_name, batch)
        n_img = layout.image_tokens
        for seq_dim, offset in ((1, 3), (2, 0)):
            shape = (batch, n_img + offset, 2, 4) if seq_dim == 1 else (batch, 2, n_img + offset, 4)
            q, k = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
            ref_q, tgt_k = layout.split(q, k, offset, seq_dim)
            qs = q if seq_dim == 1 else q.transpose(1, 2)
            ks = k if seq_dim == 1 else k.transpose(1, 2)
            want_q = torch.stack([qs[b, [offset + i for i in sum(refs, [])]] for b, (_, refs) in enumerate(positions)])
            want_k = torch.stack([ks[b, [offset + i for i in tgt]] for b, (tgt, _) in enumerate(positions)])
            assert torch.equal(ref_q, want_q.transpose(1, 2))
            assert torch.equal(tgt_k, want_k.transpose(1, 2))


@given(data=st.data())
def test_layout_split_is_the_explicit_gather_for_any_placement(data):
    """Any placement of the target and K references in the image stream, shared or per sample."""
    refs = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3), label="ref_tokens")
    n_tgt = data.draw(st.integers(1, 5), label="tgt_tokens")
    spare = data.draw(st.integers(0, 3), label="other image tokens")
    batch = data.draw(st.integers(1, 3), label="B")
    shared = data.draw(st.booleans(), label="shared")
    n_img = n_tgt + sum(refs) + spare
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n_img, generator=gen) for _ in range(1 if shared else batch)]
    layout = SequenceLayout(
        target_index=torch.stack([p[:n_tgt] for p in perms]),
        ref_index=torch.stack([p[n_tgt:n_tgt + sum(refs)] for p in perms]),
        ref_tokens=tuple(refs), image_tokens=n_img,
    )
    offset = data.draw(st.integers(0, 3), label="text tokens before the image")
    query = torch.randn(batch, offset + n_img, 2, 3, generator=gen)
    key = torch.randn(batch, offset + n_img, 2, 3, generator=gen)
    ref_q, tgt_k = layout.split(query, key, offset, seq_dim=1)
    for b in range(batch):
        p = perms[0 if shared else b].tolist()
        assert torch.equal(ref_q[b], query[b, [offset + i for i in p[n_tgt:n_tgt + sum(refs)]]].transpose(0, 1))
        assert torch.equal(tgt_k[b], key[b, [offset + i for i in p[:n_tgt]]].transpose(0, 1))


@pytest.mark.parametrize("before_install", [True, False], ids=["backend-set-before", "backend-set-after"])
def test_the_attention_backend_is_respected(before_install):
    """A backend chosen with `set_attention_backend` (before or after installing) is the one the
    active path dispatches to: its output equals the stock model's under the same backend."""
    model, inputs, *_ = _qwen_case(1)
    stock_model, *_ = _qwen_case(1)
    stock_model.set_attention_backend("_native_math")
    if before_install:
        model.set_attention_backend("_native_math")
    handle = install_capture_processors(model)
    if not before_install:
        model.set_attention_backend("_native_math")
    assert all(AttentionBackendName(p._attention_backend) is AttentionBackendName._NATIVE_MATH
               for p in handle.processors.values())
    corr = _corr(1, TGT, REF)
    with torch.no_grad():
        with handle.capture(RefTargetCapture(corr), _layout("concatenated", 1)) as capture:
            active = _output(model, inputs)
        assert torch.equal(active, _output(stock_model, inputs))
    assert capture.num_blocks == 2


def test_sd3_without_qk_norm_feeds_the_plain_projections():
    """SD3-medium has no q/k norm: the softmax sees the projections themselves (hooked on to_q/to_k)."""
    model = _seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16))
    _, inputs, *_ = _sd3_case(1)
    with torch.no_grad():
        stock = _output(model, inputs)
    handle = install_capture_processors(model)
    records = {}
    hooks = [
        getattr(model.get_submodule(block).attn, name).register_forward_hook(
            lambda module, args, output, key=(block, name): records.__setitem__(key, output))
        for block in handle.block_names for name in ("to_q", "to_k")
    ]
    corr = _corr(1, 16, 16)
    with torch.no_grad(), handle.capture(RefTargetCapture(corr), _sd3_layout()) as capture:
        active = _output(model, inputs)
    for hook in hooks:
        hook.remove()
    assert torch.equal(active, stock)
    qk = [tuple(records[(block, name)].unflatten(-1, (2, 8)) for name in ("to_q", "to_k")) for block in handle.block_names]
    pair_log, rows = _dense_stats(qk, _explicit_positions("canvas", 1), corr)
    out = capture.result()
    torch.testing.assert_close(out.pair_log_probs, pair_log, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.ref_rows, rows, rtol=1e-9, atol=1e-10)
