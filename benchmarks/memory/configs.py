"""The measured configurations: the real models' transformer configs (with their sources), their
frozen encoders, the small configurations of the tests and the ready configurations of
``recipes/configs/gpu_*.yaml``."""

from __future__ import annotations

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
    "flux.1": [
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
    "qwen-image": [
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
    """One configuration: ``family`` is a registry name (`mosaic_kit.pipelines.get_family`)."""
    return {"family": family, "model": model or f"{family} (small)", "transformer": transformer, "size": size,
            "ref_size": ref_size, "refs": refs, "text_tokens": text_tokens, "rank": rank, "points": points,
            "encoders": encoders}


def _ready(name, quantize, live_encoders, recipe):
    """A ready configuration of ``recipes/configs/``: a real row with a fixed base and encoder setting."""
    return {**CONFIGS[name], "quantize": quantize, "live_encoders": live_encoders, "recipe": recipe,
            "model": CONFIGS[name]["model"]}


# Qwen-Image-Edit-Plus prompt: each reference is also shown to Qwen2.5-VL at 384² (196 vision tokens
# plus its "Picture k:" framing, about 200 tokens), plus about 64 tokens of template and prompt.
def _qwen_text_tokens(refs: int) -> int:
    return 64 + 200 * refs


CONFIGS = {
    "flux1-dev-k2": _config("flux1", FLUX1_DEV, 512, 512, 2, 512, 128, encoders="flux.1", model="FLUX.1-dev 12B"),
    "flux1-dev-k4": _config("flux1", FLUX1_DEV, 512, 512, 4, 512, 128, encoders="flux.1", model="FLUX.1-dev 12B"),
    "flux1-dev-k6": _config("flux1", FLUX1_DEV, 512, 512, 6, 512, 128, encoders="flux.1", model="FLUX.1-dev 12B"),
    "klein-4b-512": _config("flux2", FLUX2_KLEIN_4B, 1024, 512, 4, 512, 128, encoders="flux2-4b", model="FLUX.2 [klein] 4B"),
    "klein-4b-1024": _config("flux2", FLUX2_KLEIN_4B, 1024, 1024, 4, 512, 128, encoders="flux2-4b", model="FLUX.2 [klein] 4B"),
    "klein-9b-512": _config("flux2", FLUX2_KLEIN_9B, 1024, 512, 4, 512, 128, encoders="flux2-9b", model="FLUX.2 [klein] 9B"),
    "klein-9b-1024": _config("flux2", FLUX2_KLEIN_9B, 1024, 1024, 4, 512, 128, encoders="flux2-9b", model="FLUX.2 [klein] 9B"),
    "flux2-dev-512": _config("flux2", FLUX2_DEV, 1024, 512, 4, 512, 128, encoders="flux2-dev", model="FLUX.2 [dev] 32B"),
    "qwen-edit-plus-k3": _config("qwen_edit_plus", QWEN_IMAGE_EDIT_2509, 1024, 1024, 3, _qwen_text_tokens(3), 128,
                                 encoders="qwen-image", model="Qwen-Image-Edit-Plus 20B"),
    # small configurations: tests, smoke runs, the fake-vs-real check
    "tiny-flux1": _config("flux1", TINY_FLUX1, 64, 32, 2, 8, 4, points=4),
    "tiny-flux2": _config("flux2", TINY_FLUX2, 64, 32, 2, 8, 4, points=4),
    "tiny-qwen": _config("qwen_edit_plus", TINY_QWEN, 64, 32, 2, 8, 4, points=4),
    "small-flux2": _config("flux2", SMALL_FLUX2, 256, 256, 2, 64, 8, points=16),
    "small-flux1": _config("flux1", SMALL_FLUX1, 256, 256, 2, 64, 8, points=16),
    "real-width-flux2": _config("flux2", REAL_WIDTH_FLUX2, 128, 64, 2, 16, 16, points=8),
    "real-width-flux1": _config("flux1", REAL_WIDTH_FLUX1, 128, 64, 2, 16, 16, points=8),
}
READY = {
    "gpu-24gb": _ready("klein-4b-512", "int8", True, "recipes/configs/gpu_24gb.yaml"),
    "gpu-48gb": _ready("klein-9b-512", "int8", True, "recipes/configs/gpu_48gb.yaml"),
    "gpu-80gb": _ready("qwen-edit-plus-k3", "none", False, "recipes/configs/gpu_80gb.yaml"),
}
"""The ready configurations of ``recipes/configs/gpu_*.yaml``: a real row with the base quantized as
the config says (``model.quantize``) and the encoders live (``True``: kept on the GPU, their bf16
weights added to the step's peak) or cached (``data.cache_dir``: not held)."""
CONFIGS.update(READY)
REAL = [name for name in CONFIGS if not name.startswith(("tiny-", "small-", "real-width-", "gpu-"))]
MODES = ("plain", "mosaic", "dense")
QUANTIZE = ("none", "int8", "nf4")
"""Frozen-base layouts measured: bf16, torchao int8 weight-only, bitsandbytes NF4 (`quantized`)."""
QUANTIZED_SUBSET = ["klein-4b-512", "klein-4b-1024", "flux1-dev-k2", "qwen-edit-plus-k3"]
"""The rows measured with int8 and NF4 bases (``--configs quantized``)."""
EMA_DECAY = 0.999


