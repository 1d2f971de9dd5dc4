"""Peak memory of one training step at real model scale, without a GPU: fake tensors + MemTracker.

Every configuration builds its real-size transformer through mosaic_kit's own code path (the
FLUX.1 `MosaicFluxTransformer` with the released multi-branch references, the FLUX.2
`Flux2Denoiser` the trainer wraps, or a stock `QwenImageTransformer2DModel` with mosaic_kit's
in-sequence capture processors), on the ``meta`` device: the LoRA is added and the base cast to
bf16 there (``.to()`` cannot swap fake parameters), then every parameter and buffer becomes a
fake CPU tensor (``torch._subclasses.fake_tensor.FakeTensorMode``: shape, dtype and device, no
storage). One whole training step then runs under torch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``), which records the live bytes of every tensor by
category and the peak:

    forward (bf16 autocast, non-reentrant gradient checkpointing) → flow-matching loss
    (+ SCAL and MDL) → backward into the LoRA → grad-norm clipping → AdamW step in steady state
    (its moments exist before the step) → EMA of the LoRA weights

as `mosaic_kit.training.MosaicTrainer.training_step` and its loop do it (bf16 frozen base, fp32
LoRA, AdamW with ``foreach`` as on a GPU, EMA decay 0.999). Three modes per configuration:

- ``plain``: the same step without MOSAIC (flow matching only, no capture fed);
- ``mosaic``: `RefTargetCapture` fed from the capture blocks, SCAL and MDL (the paper preset with
  Jensen-Shannon MDL over annotated points);
- ``dense``: the released code's capture restated (``bench_capture.ReleasedStyleCapture``: per
  block and reference the head-averaged softmax map over the target keys is kept for the loss;
  SCAL as a per-point loop, MDL as JSD over all tokens).

The same step runs again under ``torch.utils.flop_counter.FlopCounterMode`` (matrix products
and attention, the checkpoint's recomputation included; not during the memory measurement, since
its module tracking keeps activations alive), which bounds the capture's share of the step's
time at real scale until a GPU measures it.

What CPU fake tensors change and how it is handled (checked facts, see the project's notes on
real-scale memory): CUDA autocast runs softmax, layer norm, exp, sums and a few more ops in
float32 where CPU autocast keeps bf16, so `GpuAutocastPolicy` (a ``TorchFunctionMode``, active for
the whole step so that a checkpoint's recomputation in backward sees it too) gives those ops
CUDA's float32 policy; MemTracker's gradient hooks go on trainable parameters only; the small
index tensors of the capture are built as real constants before the step.

Not modelled: the CUDA context (about 0.5-1 GiB), the caching allocator's rounding and
fragmentation, cuBLAS and attention workspaces; the encoders (text encoder and autoencoder) are
outside the step: the ``encoders`` column gives their weights in bf16 from their configs (kept on
the GPU during training unless offloaded or cached), measured the same way (meta → parameter
bytes). Quantised bases (int8, NF4) are not measured: diffusers' quantisers need bitsandbytes or
torchao, which this environment does not install.

Real configurations (transformer ``config.json`` values, cited per constant below) and sizes:
FLUX.1-dev 12B at 512² with K = 2, 4, 6 references of 512² (released design: LoRA rank 128 on the
reference branch, capture on the 19 double blocks, 512 T5 tokens); FLUX.2 [klein] 4B and 9B at
1024² with 4 references of 512² or 1024² (LoRA rank 128 on every attention and MLP projection,
capture on every block, 512 Qwen3 tokens); FLUX.2 [dev] 32B at 1024² with 4 references of 512²;
Qwen-Image-Edit-Plus (2509) 20B at 1024² with 3 references at the pipeline's 1024² VAE size.
Batch 1, 256 annotated points per reference.

Usage::

    python benchmarks/bench_memory.py --configs klein-4b-512,flux1-dev-k2      # chosen rows
    python benchmarks/bench_memory.py --configs all                            # every row (long)
    python benchmarks/bench_memory.py --configs tiny-flux2 --modes plain,mosaic # seconds
    python benchmarks/bench_memory.py --list                                   # the configurations
    python benchmarks/bench_memory.py --configs klein-4b-512 --device cuda     # measured on a GPU

With ``--device cuda`` the same step runs with real (uninitialised) weights on the GPU and the
peak is ``torch.cuda.max_memory_allocated``; the report then also gives the ratio of the
measured peak to the fake one (``--fake-report``: a JSON of this program to compare against).
Each measurement runs in a fresh process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30

# ------------------------------------------------------------------------------ real configurations
FLUX1_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""FLUX.1-dev transformer (``black-forest-labs/FLUX.1-dev``, ``transformer/config.json``; the same values
as Black Forest Labs' ``flux-dev`` parameters: in_channels 64, vec_in_dim 768, context_in_dim 4096,
hidden 3072 = 24 × 128, depth 19 + 38, axes_dim (16, 56, 56), guidance_embed true)."""

FLUX2_KLEIN_4B = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}
"""FLUX.2 [klein] 4B (``black-forest-labs/FLUX.2-klein-4B``): diffusers'
``scripts/convert_flux2_to_diffusers.py``, ``get_flux2_transformer_config("klein-4b")``."""

FLUX2_KLEIN_9B = {**FLUX2_KLEIN_4B, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                  "joint_attention_dim": 12288}
"""FLUX.2 [klein] 9B (``black-forest-labs/FLUX.2-klein-9B``): the same script, ``"klein-9b"``
(8 + 24 blocks, 32 heads, Qwen3-8B's 3 × 4096 text width)."""

FLUX2_DEV = {**FLUX2_KLEIN_4B, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48,
             "joint_attention_dim": 15360, "guidance_embeds": True}
"""FLUX.2 [dev] 32B (``black-forest-labs/FLUX.2-dev``): the same script, ``"flux2-dev"`` (8 + 48
blocks, 48 heads, Mistral-Small's 3 × 5120 text width; guidance-distilled, so guidance_embeds
keeps diffusers' default True)."""

QWEN_IMAGE_EDIT_2509 = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
    "zero_cond_t": False,
}
"""Qwen-Image-Edit-2509 (``Qwen/Qwen-Image-Edit-2509``, ``transformer/config.json``): the Qwen-Image
MMDiT (60 double-stream blocks, 24 × 128, Qwen2.5-VL-7B's 3584 text width; diffusers'
`QwenImageTransformer2DModel` defaults); ``zero_cond_t`` came with Qwen-Image-Edit-2511."""

ENCODERS = {
    # family: [(name, transformers/diffusers class, config)], weights counted in bf16 (meta → bytes)
    "flux1": [
        ("T5-XXL encoder (google/t5-v1_1-xxl)", "T5EncoderModel",
         {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}),
        ("CLIP-L text (openai/clip-vit-large-patch14)", "CLIPTextModel",
         {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}),
        ("FLUX.1 autoencoder", "AutoencoderKL",
         {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
          "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "use_quant_conv": False, "use_post_quant_conv": False}),
    ],
    "flux2-4b": [
        ("Qwen3-4B (FLUX.2-klein-4B text_encoder)", "Qwen3ForCausalLM",
         {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}),
        ("FLUX.2 autoencoder", "AutoencoderKLFlux2", {}),
    ],
    "flux2-9b": [
        ("Qwen3-8B (FLUX.2-klein-9B text_encoder)", "Qwen3ForCausalLM",
         {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False}),
        ("FLUX.2 autoencoder", "AutoencoderKLFlux2", {}),
    ],
    "flux2-dev": [
        ("Mistral-Small-3.2-24B text tower (FLUX.2-dev text_encoder; its ~0.4 B vision tower not counted)",
         "MistralForCausalLM",
         {"vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False}),
        ("FLUX.2 autoencoder", "AutoencoderKLFlux2", {}),
    ],
    "qwen": [
        ("Qwen2.5-VL-7B text model (Qwen-Image-Edit text_encoder)", "Qwen2ForCausalLM",
         {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
          "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}),
        ("Qwen2.5-VL-7B vision tower", "Qwen2_5_VisionTransformerPretrainedModel",
         {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
          "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112}),
        ("Qwen-Image autoencoder", "AutoencoderKLQwenImage", {}),
    ],
}
"""Frozen encoders of each family (their configs' sizes: Qwen3-4B/8B, T5-XXL, CLIP-L, Mistral-Small
3.x text tower, Qwen2.5-VL-7B), counted as bf16 weights; diffusers' autoencoder defaults are the
released ones (FLUX.1: ``AutoencoderKL`` with 16 latent channels; FLUX.2 ``AutoencoderKLFlux2``;
``AutoencoderKLQwenImage``)."""

TINY_FLUX1 = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
              "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)}
TINY_FLUX2 = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_guidance_channels": 32,
              "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": False}
TINY_QWEN = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 1, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6)}
REAL_WIDTH_FLUX2 = {**FLUX2_KLEIN_4B, "num_layers": 1, "num_single_layers": 1}
"""FLUX.2 [klein] 4B at real width (24 heads × 128, MLP 9216, text width 7680) with 1 double and
1 single block: the configuration the fake measurement is checked against a real CPU run on."""
REAL_WIDTH_FLUX1 = {**FLUX1_DEV, "num_layers": 1, "num_single_layers": 1}
SMALL_FLUX2 = {**TINY_FLUX2, "num_attention_heads": 4, "attention_head_dim": 64, "joint_attention_dim": 128,
               "axes_dims_rope": (16, 16, 16, 16)}
SMALL_FLUX1 = {**TINY_FLUX1, "num_attention_heads": 4, "attention_head_dim": 64, "joint_attention_dim": 128,
               "pooled_projection_dim": 64, "axes_dims_rope": (16, 24, 24)}


def _config(family, transformer, size, ref_size, refs, text_tokens, rank, points=256, encoders=None, model=None):
    return {"family": family, "model": model or f"{family} (small)", "transformer": transformer, "size": size,
            "ref_size": ref_size, "refs": refs, "text_tokens": text_tokens, "rank": rank, "points": points,
            "encoders": encoders}


# Qwen-Image-Edit-Plus prompt: each reference is also shown to Qwen2.5-VL at 384² (196 vision tokens
# plus its "Picture k:" framing, about 200 tokens), plus about 64 tokens of template and prompt.
def _qwen_text_tokens(refs: int) -> int:
    return 64 + 200 * refs


CONFIGS = {
    "flux1-dev-k2": _config("flux1", FLUX1_DEV, 512, 512, 2, 512, 128, encoders="flux1", model="FLUX.1-dev 12B"),
    "flux1-dev-k4": _config("flux1", FLUX1_DEV, 512, 512, 4, 512, 128, encoders="flux1", model="FLUX.1-dev 12B"),
    "flux1-dev-k6": _config("flux1", FLUX1_DEV, 512, 512, 6, 512, 128, encoders="flux1", model="FLUX.1-dev 12B"),
    "klein-4b-512": _config("flux2", FLUX2_KLEIN_4B, 1024, 512, 4, 512, 128, encoders="flux2-4b", model="FLUX.2 [klein] 4B"),
    "klein-4b-1024": _config("flux2", FLUX2_KLEIN_4B, 1024, 1024, 4, 512, 128, encoders="flux2-4b", model="FLUX.2 [klein] 4B"),
    "klein-9b-512": _config("flux2", FLUX2_KLEIN_9B, 1024, 512, 4, 512, 128, encoders="flux2-9b", model="FLUX.2 [klein] 9B"),
    "klein-9b-1024": _config("flux2", FLUX2_KLEIN_9B, 1024, 1024, 4, 512, 128, encoders="flux2-9b", model="FLUX.2 [klein] 9B"),
    "flux2-dev-512": _config("flux2", FLUX2_DEV, 1024, 512, 4, 512, 128, encoders="flux2-dev", model="FLUX.2 [dev] 32B"),
    "qwen-edit-plus-k3": _config("qwen", QWEN_IMAGE_EDIT_2509, 1024, 1024, 3, _qwen_text_tokens(3), 128,
                                 encoders="qwen", model="Qwen-Image-Edit-Plus 20B"),
    # small configurations: tests, smoke runs, the fake-vs-real check
    "tiny-flux1": _config("flux1", TINY_FLUX1, 64, 32, 2, 8, 4, points=4),
    "tiny-flux2": _config("flux2", TINY_FLUX2, 64, 32, 2, 8, 4, points=4),
    "tiny-qwen": _config("qwen", TINY_QWEN, 64, 32, 2, 8, 4, points=4),
    "small-flux2": _config("flux2", SMALL_FLUX2, 256, 256, 2, 64, 8, points=16),
    "small-flux1": _config("flux1", SMALL_FLUX1, 256, 256, 2, 64, 8, points=16),
    "real-width-flux2": _config("flux2", REAL_WIDTH_FLUX2, 128, 64, 2, 16, 16, points=8),
    "real-width-flux1": _config("flux1", REAL_WIDTH_FLUX1, 128, 64, 2, 16, 16, points=8),
}
REAL = [name for name in CONFIGS if not name.startswith(("tiny-", "small-", "real-width-"))]
MODES = ("plain", "mosaic", "dense")
EMA_DECAY = 0.999


# --------------------------------------------------------------------------------- GPU autocast policy
def _gpu_fp32_functions():
    import torch
    import torch.nn.functional as F

    # CUDA autocast's float32 list (the ops that matter in these models and losses): CPU autocast
    # keeps them in bf16. "dtype" ops take a float32 output dtype instead of an input cast, as CUDA's
    # fp32_set_opt_dtype policy does.
    cast = {F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm, torch.exp, torch.Tensor.exp,
            torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt,
            torch.Tensor.rsqrt, torch.logsumexp, torch.Tensor.logsumexp, F.mse_loss, torch.norm, torch.Tensor.norm,
            torch.linalg.vector_norm}
    with_dtype = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
                  torch.Tensor.log_softmax, torch.sum, torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum,
                  torch.prod, torch.Tensor.prod}
    return cast, with_dtype


class GpuAutocastPolicy:
    """A ``TorchFunctionMode`` giving CUDA autocast's float32 policy to the ops CPU autocast runs in
    bf16 (softmax, log-softmax, layer and group norm, exp, log, pow, rsqrt, sums, logsumexp, norms),
    while CPU autocast is on: inputs of the float32-list ops are cast to float32, and the
    ``dtype``-taking ops get ``dtype=torch.float32`` (their output is float32, as on CUDA).

    Keep it active for the whole step: a non-reentrant checkpoint recomputes blocks during the
    backward, under the forward's autocast state."""

    def __new__(cls):
        import torch
        from torch.overrides import TorchFunctionMode

        cast, with_dtype = _gpu_fp32_functions()

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if torch.is_autocast_enabled("cpu") and (func in cast or func in with_dtype):
                    def up(x):
                        return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

                    with torch.autocast("cpu", enabled=False):
                        if func in cast:
                            return func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
                        first = args[0] if args else None
                        if (isinstance(first, torch.Tensor) and first.dtype in (torch.bfloat16, torch.float16)
                                and kwargs.get("dtype") is None):
                            kwargs = dict(kwargs, dtype=torch.float32)
                        return func(*args, **kwargs)
                return func(*args, **kwargs)

        return _Mode()


def _policy_checkpoint(function, *args):
    """``torch.utils.checkpoint(..., use_reentrant=False)`` whose function runs under
    `GpuAutocastPolicy`, in the forward and in the recomputation alike."""
    from torch.utils.checkpoint import checkpoint

    def run(*inner):
        with GpuAutocastPolicy():
            return function(*inner)

    return checkpoint(run, *args, use_reentrant=False)


# ------------------------------------------------------------------------------------ fake tensors
def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _real():
    """Suspends fake mode (small index and bookkeeping tensors are real constants)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def materialise(module, fake_mode=None, device: str = "cpu"):
    """Replaces every meta parameter and buffer of ``module`` by a tensor of the same shape, dtype
    and ``requires_grad`` on ``device``: a fake tensor under ``fake_mode``, else real and
    uninitialised (``torch.empty``). Shared tensors stay shared."""
    import torch

    memo = {}

    def new(t):
        if id(t) not in memo:
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device=device)
        return memo[id(t)]

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type == "meta":
                sub._parameters[name] = torch.nn.Parameter(new(param), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                sub._buffers[name] = new(buffer)
    return module


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class TrainableMemTracker(MemTracker):
        """MemTracker whose gradient hooks go on trainable parameters only (registering a hook on a
        frozen parameter raises)."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            frozen = [p for p in module.parameters() if not p.requires_grad]
            for param in frozen:  # no hook: mark them as seen
                self._param_to_grad_hook_handles.setdefault(param, (_NoHandle(), _NoHandle()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state):
            # the step's peak only: MemTracker would also walk every tracked module after every op
            # for per-module peaks (thousands of modules here), which this benchmark does not report
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    return TrainableMemTracker


class _NoHandle:
    def remove(self) -> None:
        pass


# ---------------------------------------------------------------------------------------- building
def build_model(cfg: dict, device: str = "cpu", fake_mode=None):
    """The configuration's denoiser with its LoRA, base in bf16 and LoRA in fp32, gradient
    checkpointing on: built on meta, then materialised (fake under ``fake_mode``).

    Returns ``(model, transformer, forward)`` where ``forward(inputs, capture)`` returns the
    target's prediction and feeds ``capture`` (a list of captures or None)."""
    import torch
    from diffusers.training_utils import cast_training_params

    family, config = cfg["family"], dict(cfg["transformer"])
    with torch.device("meta"):
        if family == "flux1":
            from diffusers import FluxTransformer2DModel

            from mosaic_kit.models import MosaicFluxTransformer, add_reference_lora

            transformer = FluxTransformer2DModel(**config)
            add_reference_lora(transformer, rank=cfg["rank"])
        elif family == "flux2":
            from diffusers import Flux2Transformer2DModel

            from mosaic_kit.models.flux2 import add_flux2_lora

            transformer = Flux2Transformer2DModel(**config)
            add_flux2_lora(transformer, cfg["rank"])
        else:
            from diffusers import QwenImageTransformer2DModel
            from peft import LoraConfig

            transformer = QwenImageTransformer2DModel(**config)
            targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
            transformer.add_adapter(LoraConfig(r=cfg["rank"], lora_alpha=cfg["rank"], target_modules=targets),
                                    adapter_name="mosaic")
    transformer.requires_grad_(False)
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_" in name)
    transformer.to(torch.bfloat16)
    cast_training_params(transformer, dtype=torch.float32)  # trainable weights train in fp32 (as the trainer)
    if family == "qwen":
        # QwenEmbedRope keeps its frequency tables as plain (complex) attributes: real, on the device
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

        with _real():
            transformer.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(config["axes_dims_rope"]),
                                                  scale_rope=True)
            transformer.pos_embed.pos_freqs = transformer.pos_embed.pos_freqs.to(device)
            transformer.pos_embed.neg_freqs = transformer.pos_embed.neg_freqs.to(device)
    materialise(transformer, fake_mode, device)
    # non-reentrant checkpointing as diffusers' default; on the CPU the recomputation enters the
    # GPU autocast policy itself (a backward pass does not see a mode entered around the forward)
    transformer.enable_gradient_checkpointing(_policy_checkpoint if device == "cpu" else None)
    transformer.train()
    if family == "flux1":
        model = MosaicFluxTransformer(transformer, capture_blocks="double")  # released: the 19 double blocks

        def forward(inputs, captures):
            return model(**inputs, capture=captures)
    elif family == "flux2":
        from mosaic_kit.models.flux2 import Flux2Denoiser

        model = Flux2Denoiser(transformer, capture_blocks="all")
        layout = model.layout = _layout_cache()

        def forward(inputs, captures):
            inputs = dict(inputs)
            sequence_layout = layout(inputs.pop("tgt_tokens"), inputs.pop("ref_tokens"))
            return model(**inputs, sequence_layout=sequence_layout, capture=captures)
    else:
        from mosaic_kit.models.insequence import install_capture_processors

        model = transformer
        handle = install_capture_processors(transformer)
        layout = model.layout = _layout_cache()

        def forward(inputs, captures):
            inputs = dict(inputs)
            n_tgt, ref_tokens = inputs.pop("tgt_tokens"), inputs.pop("ref_tokens")
            context = contextlib.nullcontext()
            if captures:
                fed = captures[0] if len(captures) == 1 and _is_capture(captures[0]) else _FanOut(captures)
                context = handle.capture(fed, layout(n_tgt, ref_tokens))
            with context:
                out = transformer(**inputs, return_dict=False)[0]
            return out[:, :n_tgt]
    return model, transformer, forward


def _layout_cache():
    """A ``layout(n_tgt, ref_tokens)`` function that builds the concatenated ``SequenceLayout`` as
    the in-sequence family's encoding does, once per token counts, and returns the same object
    for the same counts afterwards."""
    from mosaic_kit.models.insequence import SequenceLayout

    layouts = {}

    def layout(n_tgt, ref_tokens):
        key = (n_tgt, tuple(ref_tokens))
        if key not in layouts:
            layouts[key] = SequenceLayout.concatenated(n_tgt, ref_tokens)
        return layouts[key]

    return layout


def _is_capture(obj) -> bool:
    from mosaic_kit.attention import RefTargetCapture

    return isinstance(obj, RefTargetCapture)


def _fan_out_class():
    from mosaic_kit.attention import RefTargetCapture

    class FanOut(RefTargetCapture):
        """Feeds any ``add(query, key)`` object from the in-sequence processors (which take a
        `RefTargetCapture`); its correspondences fix the layout check."""

        def __init__(self, captures):  # no super().__init__: nothing is stored here
            self.captures = list(captures)
            self.corr = self.captures[0].corr
            self.scale = None

        def add(self, query, key):
            for capture in self.captures:
                capture.add(query, key)

    return FanOut


def _FanOut(captures):  # noqa: N802 - a factory standing in for the class (diffusers imported lazily)
    return _fan_out_class()(captures)


def _flux2_counts(cfg: dict) -> tuple[int, tuple[int, ...]]:
    n_tgt, n_ref = token_counts(cfg)
    return n_tgt, (n_ref,) * cfg["refs"]


def token_counts(cfg: dict) -> tuple[int, int]:
    """``(N_tgt, N^(k))``: target and per-reference image tokens (16 px per token)."""
    return (cfg["size"] // 16) ** 2, (cfg["ref_size"] // 16) ** 2


def correspondences(cfg: dict, seed: int = 0):
    """``points`` random annotated pairs per reference, target tokens disjoint across references (eq. 2)."""
    from mosaic_kit.correspondence import Correspondences

    n_tgt, n_ref = token_counts(cfg)
    refs, points = cfg["refs"], min(cfg["points"], n_ref)
    rng = random.Random(seed)
    targets = rng.sample(range(n_tgt), min(n_tgt, refs * points))
    dicts = []
    for k in range(refs):
        sources = rng.sample(range(n_ref), points)
        dicts.append({u: targets[(k * points + j) % len(targets)] for j, u in enumerate(sources)})
    return dicts, Correspondences.from_dicts([dicts], [n_ref] * refs, n_tgt)


def build_inputs(cfg: dict, transformer, device: str = "cpu") -> dict:
    """The denoiser's keyword arguments for one sample (random values; under fake mode, fake),
    laid out as each family's pipelines lay them out."""
    import torch

    family, conf = cfg["family"], transformer.config
    n_tgt, n_ref = token_counts(cfg)
    refs, text = cfg["refs"], cfg["text_tokens"]
    dtype = torch.bfloat16
    if family == "flux1":
        from mosaic_kit.models import latent_image_ids, reference_position_ids

        with _real():
            target_ids = latent_image_ids(cfg["size"] // 16, cfg["size"] // 16).to(device)
            reference_ids = reference_position_ids([(cfg["ref_size"], cfg["ref_size"])] * refs).to(device)
            text_ids = torch.zeros(text, 3, device=device)
        return {
            "target_tokens": torch.randn(1, n_tgt, conf.in_channels, device=device, dtype=dtype),
            "text_embeddings": torch.randn(1, text, conf.joint_attention_dim, device=device, dtype=dtype),
            "pooled_embeddings": torch.randn(1, conf.pooled_projection_dim, device=device, dtype=dtype),
            "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "target_ids": target_ids, "text_ids": text_ids,
            "reference_tokens": torch.randn(1, refs * n_ref, conf.in_channels, device=device, dtype=dtype),
            "reference_ids": reference_ids, "reference_token_counts": (n_ref,) * refs,
            "guidance": torch.full((1,), 1.0, device=device, dtype=dtype) if conf.guidance_embeds else None,
        }
    if family == "flux2":
        from mosaic_kit.models.flux2 import FLUX2_REFERENCE_TIME_SCALE

        def grid(t, side):
            return torch.cartesian_prod(torch.tensor([t]), torch.arange(side), torch.arange(side), torch.tensor([0]))

        with _real():
            parts = [grid(0, cfg["size"] // 16)]
            parts += [grid(FLUX2_REFERENCE_TIME_SCALE * (k + 1), cfg["ref_size"] // 16) for k in range(refs)]
            img_ids = torch.cat(parts)[None].to(device)
            txt_ids = torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                                           torch.arange(text))[None].to(device)
        return {
            "hidden_states": torch.randn(1, n_tgt + refs * n_ref, conf.in_channels, device=device, dtype=dtype),
            "img_ids": img_ids,
            "encoder_hidden_states": torch.randn(1, text, conf.joint_attention_dim, device=device, dtype=dtype),
            "txt_ids": txt_ids, "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "guidance": torch.full((1,), 4.0, device=device) if conf.guidance_embeds else None,
            "tgt_tokens": n_tgt, "ref_tokens": (n_ref,) * refs,
        }
    side, ref_side = cfg["size"] // 16, cfg["ref_size"] // 16
    return {
        "hidden_states": torch.randn(1, n_tgt + refs * n_ref, conf.in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, text, conf.joint_attention_dim, device=device, dtype=dtype),
        "encoder_hidden_states_mask": None,
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "img_shapes": [[(1, side, side)] + [(1, ref_side, ref_side)] * refs],
        "tgt_tokens": n_tgt, "ref_tokens": (n_ref,) * refs,
    }


def _released_capture_class():
    """``bench_capture.ReleasedStyleCapture`` (the released code's capture, restated), with the
    correspondences the in-sequence processors check the layout against."""
    import importlib.util

    name = "bench_capture"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "bench_capture.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)

    class DenseMaps(module.ReleasedStyleCapture):
        def __init__(self, corr):
            super().__init__(corr.ref_tokens)
            self.corr = corr

    return DenseMaps


# -------------------------------------------------------------------------------------- one step
class Step:
    """One training step of a configuration, built once (model, inputs, optimiser, EMA)."""

    def __init__(self, cfg: dict, device: str = "cpu", fake: bool = True) -> None:
        import torch
        from diffusers.training_utils import EMAModel

        self.cfg, self.device = cfg, device
        self.fake_mode = _fake_mode() if fake else None
        self.model, self.transformer, self.model_forward = build_model(cfg, device, self.fake_mode)
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        with self.fake_mode if fake else contextlib.nullcontext():
            torch.manual_seed(0)
            self.inputs = build_inputs(cfg, self.transformer, device)
            n_tgt = token_counts(cfg)[0]
            channels = self.transformer.config.out_channels or self.transformer.config.in_channels
            if cfg["family"] == "qwen":
                channels = self.transformer.config.in_channels  # packed 2×2: out_channels · 4
            self.latents = torch.randn(1, n_tgt, channels, device=device)
            self.noise = torch.randn(1, n_tgt, channels, device=device)
            # AdamW in steady state: its moments exist before the measured step (foreach, as on a GPU)
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2,
                                               foreach=True)
            for p in self.params:
                self.optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}
            self.ema = EMAModel(self.params, decay=EMA_DECAY)
        if cfg["family"] != "flux1":
            # the capture processors' layout: real index constants, built (and its gathers cached)
            # before the step; the processors take the image stream after the text (FLUX.2) or alone (Qwen)
            with _real():
                layout = self.model.layout(*_flux2_counts(cfg))
                offset = cfg["text_tokens"] if cfg["family"] == "flux2" else 0
                probe = torch.zeros(1, offset + layout.image_tokens, 1, 1, device=device)
                layout.split(probe, probe, offset, 1)
        self.dicts, corr = correspondences(cfg)
        self.corr = corr.to(device) if not fake else corr

    def base_bytes(self) -> tuple[int, int]:
        """``(frozen base, trainable)`` parameter bytes."""
        frozen = trainable = 0
        for p in self.transformer.parameters():
            size = p.numel() * p.element_size()
            if p.requires_grad:
                trainable += size
            else:
                frozen += size
        return frozen, trainable

    def captures(self, mode: str) -> list:
        import torch

        from mosaic_kit.attention import RefTargetCapture

        if mode == "plain":
            return []
        if mode == "mosaic":
            with _real():  # its block counter and index tensors: real constants, built before the step
                capture = RefTargetCapture(self.corr, aggregate="points")
                capture.prepare(torch.device(self.device), torch.float32, self.transformer.config.num_attention_heads)
            return [capture]
        with _real():  # its block counter: a real constant
            return [_released_capture_class()(self.corr)]

    def loss(self, mode: str, prediction, captures):
        import torch

        from mosaic_kit.losses import MosaicObjective, flow_matching_loss

        if mode == "dense":
            flow = torch.nn.functional.mse_loss(prediction.float(), self.noise - self.latents)
            return flow + captures[0].loss(self.dicts, scal_weight=0.1, mdl_weight=1.0)
        objective = MosaicObjective.from_preset("paper", mdl_divergence="jsd")
        if mode == "plain":  # the trainer without a capture: flow matching alone
            return flow_matching_loss(prediction.float(), self.noise, self.latents)
        result = captures[0].result()
        return objective(prediction.float(), self.noise, self.latents, result, self.corr, step=0).loss

    def run(self, mode: str) -> None:
        """Forward, loss, backward, clipping, optimiser step, EMA (what MemTracker measures)."""
        import torch

        from mosaic_kit import finite_checks

        with finite_checks(False):  # a step past the trainer's first ones (check_finite_steps): no syncs
            self._run(mode)

    def _run(self, mode: str) -> None:
        import torch

        captures = self.captures(mode)
        with torch.autocast(self.device, dtype=torch.bfloat16):
            prediction = self.model_forward(self.inputs, captures or None)
        loss = self.loss(mode, prediction, captures)
        del prediction
        loss.backward()
        del loss, captures
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.params)

    def policy(self):
        """CUDA's autocast policy for the CPU run (a no-op on CUDA, which has it)."""
        return GpuAutocastPolicy() if self.device == "cpu" else contextlib.nullcontext()


def measure_fake(cfg: dict, mode: str, flops: bool = True) -> dict:
    """Peak of one step by category (MemTracker over fake tensors), and its FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    began = time.perf_counter()
    step = Step(cfg, "cpu", fake=True)
    frozen, trainable = step.base_bytes()
    tracker = _tracker_class()()
    tracker.track_external(step.transformer, step.optimizer, step.ema.shadow_params, *step.inputs_tensors())
    with step.fake_mode, step.policy():
        with tracker:
            step.run(mode)
        if flops:  # a second step: FlopCounterMode's module tracking keeps activations alive, so not under MemTracker
            counter = FlopCounterMode(display=False)
            with counter:
                step.run(mode)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    result = {"mode": mode, "peak_bytes": int(peak["Total"]),
              "by_category": {str(k): int(v) for k, v in peak.items() if k != "Total"},
              "base_bytes": frozen, "lora_bytes": trainable, "seconds": time.perf_counter() - began}
    if flops:
        result["flops"] = int(counter.get_total_flops())
    return result


def _inputs_tensors(self) -> list:
    import torch

    return [v for v in list(self.inputs.values()) + [self.latents, self.noise] if isinstance(v, torch.Tensor)]


Step.inputs_tensors = _inputs_tensors


def measure_real(cfg: dict, mode: str, device: str = "cpu") -> dict:
    """The same step on real tensors: on CUDA ``torch.cuda.max_memory_allocated`` (everything the
    step holds, weights included), on the CPU MemTracker over real tensors and, independently,
    the allocator's own accounting through torch's profiler (``profile_memory``)."""
    import torch

    began = time.perf_counter()
    step = Step(cfg, device, fake=False)
    # the weights stay uninitialised: values do not change what a step allocates
    frozen, trainable = step.base_bytes()
    result = {"mode": mode, "base_bytes": frozen, "lora_bytes": trainable}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with step.policy():
            step.run(mode)
        torch.cuda.synchronize()
        result["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        tracker = _tracker_class()()
        tracker.track_external(step.transformer, step.optimizer, step.ema.shadow_params, *step.inputs_tensors())
        before = _allocated_cpu_bytes(step)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, step.policy(), tracker:
            step.run(mode)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        result["peak_bytes"] = int(peak["Total"])
        result["by_category"] = {str(k): int(v) for k, v in peak.items() if k != "Total"}
        result["held_bytes"] = before  # what the step holds before it runs
        result["allocator_peak_bytes"] = before + _profiler_peak(prof)
    result["seconds"] = time.perf_counter() - began
    return result


def _allocated_cpu_bytes(step) -> int:
    """Bytes of every tensor the step holds before it runs (weights, optimiser state, EMA, inputs)."""
    seen, total = set(), 0
    tensors = list(step.transformer.parameters()) + list(step.transformer.buffers()) + step.inputs_tensors()
    tensors += list(step.ema.shadow_params)
    for state in step.optimizer.state.values():
        tensors += [v for v in state.values() if hasattr(v, "untyped_storage")]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _profiler_peak(prof) -> int:
    """The allocator's peak above the start of profiling: the running sum of the CPU allocator's
    allocation and free events (``profile_memory=True``), in time order."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def encoder_bytes(key: str | None) -> list[dict]:
    """Parameter bytes in bf16 of the family's frozen encoders, built on meta from their configs."""
    import torch

    rows = []
    for name, cls_name, config in ENCODERS.get(key or "", []):
        with torch.device("meta"):
            if cls_name.startswith("Autoencoder"):
                import diffusers

                module = getattr(diffusers, cls_name)(**config)
            elif cls_name == "Qwen2_5_VisionTransformerPretrainedModel":
                from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
                from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

                module = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**config))
            else:
                import transformers

                model_cls = getattr(transformers, cls_name)
                config_cls = model_cls.config_class
                module = model_cls(config_cls(**config))
        seen, params = set(), 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
        rows.append({"name": name, "parameters": params, "bytes_bf16": 2 * params})
    return rows


# ------------------------------------------------------------------------------------------ parent
def _worker(args) -> dict:
    cfg = CONFIGS[args.config]
    if args.worker == "fake":
        return measure_fake(cfg, args.mode, flops=not args.no_flops)
    if args.worker == "real":
        return measure_real(cfg, args.mode, args.device)
    return {"encoders": encoder_bytes(cfg["encoders"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="klein-4b-512",
                        help=f"comma-separated configurations, or 'all' (the real ones): {', '.join(CONFIGS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: fake tensors (no GPU needed); cuda: the real step on a GPU")
    parser.add_argument("--fake-report", type=Path, default=None,
                        help="with --device cuda: a JSON of a fake run, for the measured / fake ratio")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    parser.add_argument("--no-encoders", action="store_true", help="skip the encoders' weights")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="print the docs table (markdown) of a report written by this program, and exit")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: benchmarks/results/memory-<device>.json)")
    parser.add_argument("--same-process", action="store_true",
                        help="measure in this process instead of one fresh process per row (fake tensors "
                             "only: MemTracker sees only the step's own tensors, so nothing else pollutes the peak)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(_worker(args)))
        return {}
    if args.markdown is not None:
        print(format_markdown(json.loads(args.markdown.read_text())))
        return {}
    if args.list:
        for name, cfg in CONFIGS.items():
            print(f"{name:20s} {_describe(cfg)}")
        return {}
    names = REAL if args.configs == "all" else [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)} or 'all'")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: expected a comma-separated subset of {MODES}, but got {args.modes!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device")
        if args.same_process:
            parser.error("--same-process: fake tensors only (--device cpu); a GPU peak needs a fresh process per row")
    fake_rows = {}
    if args.fake_report is not None:
        for row in json.loads(args.fake_report.read_text())["results"]:
            fake_rows[(row["config"], row["mode"])] = row

    from mosaic_kit.reporting import hardware_info, run_in_fresh_process, write_report

    def measure(worker_args: list[str]) -> dict:
        if not args.same_process:
            return run_in_fresh_process(__file__, worker_args)
        return _worker(parser.parse_args(worker_args))

    began = time.perf_counter()
    report = {"device": args.device, "method": "fake tensors + MemTracker" if args.device == "cpu" else
              "torch.cuda.max_memory_allocated", "hardware": hardware_info(args.device),
              "settings": {"batch": 1, "base_dtype": "bfloat16", "lora_dtype": "float32", "optimizer": "AdamW (foreach)",
                           "ema_decay": EMA_DECAY, "gradient_checkpointing": "non-reentrant", "grad_clip": 1.0},
              "configs": {n: _jsonable(CONFIGS[n]) for n in names}, "results": [], "encoders": {}}
    for name in names:
        cfg = CONFIGS[name]
        if not args.no_encoders and cfg["encoders"] and cfg["encoders"] not in report["encoders"]:
            report["encoders"][cfg["encoders"]] = measure(["--worker", "encoders", "--config", name])["encoders"]
        for mode in modes:
            worker = ["--worker", "fake" if args.device == "cpu" else "real", "--config", name, "--mode", mode,
                      "--device", args.device] + (["--no-flops"] if args.no_flops else [])
            row = {"config": name, **measure(worker)}
            fake = fake_rows.get((name, mode))
            if fake is not None:
                row["fake_peak_bytes"] = fake["peak_bytes"]
                row["ratio_to_fake"] = row["peak_bytes"] / fake["peak_bytes"]
            report["results"].append(row)
            print(f"  {name} {mode}: {row['peak_bytes'] / GIB:.2f} GiB ({row['seconds']:.0f} s)", flush=True)
    report["overhead"] = _overheads(report["results"])
    report["total_seconds"] = time.perf_counter() - began
    print()
    print(format_report(report))
    write_report(report, args.out or RESULTS / f"memory-{args.device}.json")
    return report


def _describe(cfg: dict) -> str:
    t = cfg["transformer"]
    blocks = f"{t['num_layers']}+{t.get('num_single_layers', 0)} blocks"
    return (f"{cfg['family']}, {blocks}, {t['num_attention_heads']}x{t['attention_head_dim']}, "
            f"{cfg['size']}² target, {cfg['refs']} x {cfg['ref_size']}² refs, {cfg['text_tokens']} text tokens, "
            f"LoRA rank {cfg['rank']}")


def _jsonable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=list))


def _overheads(rows: list[dict]) -> list[dict]:
    """Per configuration: MOSAIC's and the dense maps' peak over the plain step's."""
    by = {(r["config"], r["mode"]): r for r in rows}
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        plain = by.get((name, "plain"))
        if plain is None:
            continue
        entry = {"config": name, "plain_bytes": plain["peak_bytes"]}
        for mode in ("mosaic", "dense"):
            row = by.get((name, mode))
            if row is not None:
                extra = row["peak_bytes"] - plain["peak_bytes"]
                entry[f"{mode}_extra_bytes"] = extra
                entry[f"{mode}_extra_pct"] = 100 * extra / plain["peak_bytes"]
                if "flops" in row and "flops" in plain:
                    entry[f"{mode}_flops_pct"] = 100 * (row["flops"] / plain["flops"] - 1)
        out.append(entry)
    return out


def format_report(report: dict) -> str:
    """The table of a report: one row per configuration, peaks per mode, encoders, FLOPs."""
    from mosaic_kit.reporting import format_table

    by = {(r["config"], r["mode"]): r for r in report["results"]}
    ratio = any("ratio_to_fake" in r for r in report["results"])
    header = ["configuration", "base (GiB)", "LoRA (GiB)", "plain (GiB)", "+ MOSAIC", "+ dense maps",
              "encoders (GiB)", "MOSAIC FLOPs"]
    if ratio:
        header.append("measured / fake")
    rows = [header]
    for name in dict.fromkeys(r["config"] for r in report["results"]):
        plain, mosaic, dense = (by.get((name, m)) for m in MODES)
        first = plain or mosaic or dense
        cells = [name, f"{first['base_bytes'] / GIB:.2f}", f"{first['lora_bytes'] / GIB:.2f}"]
        cells.append(f"{plain['peak_bytes'] / GIB:.2f}" if plain else "-")
        for row in (mosaic, dense):
            if row is None:
                cells.append("-")
            elif plain is None:
                cells.append(f"{row['peak_bytes'] / GIB:.2f}")
            else:
                cells.append(f"{row['peak_bytes'] / GIB:.2f} ({_signed_bytes(row['peak_bytes'] - plain['peak_bytes'])})")
        encoders = report.get("encoders", {}).get(report["configs"][name].get("encoders") or "", [])
        cells.append(f"{sum(e['bytes_bf16'] for e in encoders) / GIB:.2f}" if encoders else "-")
        if plain and mosaic and "flops" in plain and "flops" in mosaic:
            cells.append(f"{100 * (mosaic['flops'] / plain['flops'] - 1):+.2f} %")
        else:
            cells.append("-")
        if ratio:
            cells.append(" / ".join(f"{by[(name, m)]['ratio_to_fake']:.3f}" for m in MODES
                                    if (name, m) in by and "ratio_to_fake" in by[(name, m)]))
        rows.append(cells)
    return format_table(rows)


def format_markdown(report: dict) -> str:
    """The docs table of a report (GiB; the extra of MOSAIC and of the dense maps over the plain
    step in parentheses; the encoders' bf16 weights, which a step with cached encodings does not hold)."""
    by = {(r["config"], r["mode"]): r for r in report["results"]}
    lines = ["| configuration | LoRA step | + MOSAIC (capture, SCAL, MDL) | + dense maps (released style) | "
             "encoders, bf16 | MOSAIC FLOPs |", "| --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["config"] for r in report["results"]):
        plain, mosaic, dense = (by.get((name, m)) for m in MODES)
        cells = [_describe_short(report["configs"][name]), f"{plain['peak_bytes'] / GIB:.2f} GiB" if plain else "-"]
        for row in (mosaic, dense):
            if row is None or plain is None:
                cells.append("-")
            else:
                cells.append(f"{row['peak_bytes'] / GIB:.2f} GiB ({_signed_bytes(row['peak_bytes'] - plain['peak_bytes'])})")
        encoders = report.get("encoders", {}).get(report["configs"][name].get("encoders") or "", [])
        cells.append(f"{sum(e['bytes_bf16'] for e in encoders) / GIB:.2f} GiB" if encoders else "-")
        cells.append(f"{100 * (mosaic['flops'] / plain['flops'] - 1):+.1f} %"
                     if plain and mosaic and "flops" in plain and "flops" in mosaic else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _describe_short(cfg: dict) -> str:
    return f"{cfg['model']}, {cfg['size']}² target, {cfg['refs']} × {cfg['ref_size']}² refs"


def _signed_bytes(value: int) -> str:
    if abs(value) >= GIB / 10:
        return f"{value / GIB:+.2f} GiB"
    return f"{value / 2**20:+.1f} MiB"


if __name__ == "__main__":
    main()
