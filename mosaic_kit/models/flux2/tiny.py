"""A tiny random FLUX.2 [klein] pipeline built entirely in code (tests, CPU runs, benchmarks).

Nothing is downloaded: the `Flux2Transformer2DModel`, the `AutoencoderKLFlux2`, the Qwen3 text
encoder and its byte-level BPE tokenizer are built from small configs and seeded random weights.
The geometry matches FLUX.2 where the pipelines depend on it: the autoencoder downsamples 8× (four
levels) and its latents are patchified 2×2 (one token covers 16×16 pixels), the transformer
takes 4-axis (T, H, W, L) RoPE ids, the prompt embedding stacks hidden states of several encoder
layers (``text_encoder_out_layers``), the tokenizer applies a Qwen-style chat template, and the
scheduler has FLUX.2's resolution-dependent exponential shift. The autoencoder's latent
batch-norm statistics are set to seeded non-trivial values, so the pipeline's latent
normalisation is exercised (a fresh ``BatchNorm2d`` would be the identity).
"""

from __future__ import annotations

from typing import Any

import torch

from ..pixel import PixelAutoencoder

__all__ = [
    "Flux2PixelAutoencoder",
    "TINY_FLUX2_TEXT_CONFIG",
    "TINY_FLUX2_TEXT_OUT_LAYERS",
    "TINY_FLUX2_TRANSFORMER_CONFIG",
    "TINY_FLUX2_VAE_CONFIG",
    "tiny_flux2_components",
    "tiny_flux2_pipeline",
    "tiny_qwen_tokenizer",
]

_LATENT_CHANNELS = 4
_TEXT_HIDDEN = 32

TINY_FLUX2_TEXT_OUT_LAYERS: tuple[int, ...] = (1, 2, 3)
"""Encoder layers whose hidden states form the tiny prompt embedding (the real [klein] default
is ``(9, 18, 27)``); pass it as ``text_encoder_out_layers`` to the pipeline call."""

TINY_FLUX2_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * _LATENT_CHANNELS,  # 2×2 patchified latents
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _TEXT_HIDDEN * len(TINY_FLUX2_TEXT_OUT_LAYERS),
    "timestep_guidance_channels": 32,
    "axes_dims_rope": (4, 4, 4, 4),
    "guidance_embeds": False,  # FLUX.2 [klein] is guidance-distilled without a guidance embedding
}
"""Config of the tiny `diffusers.Flux2Transformer2DModel`: one double-stream and two parallel
single-stream blocks, two 16-dim heads, 16 input channels (4 latent channels patchified 2×2),
4-axis RoPE, no guidance embedding (as [klein])."""

TINY_FLUX2_VAE_CONFIG: dict[str, Any] = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),  # four levels: 8× downsampling as the real one
    "layers_per_block": 1,
    "latent_channels": _LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 32,
}
"""Config of the tiny `diffusers.AutoencoderKLFlux2`: four levels (8×), 4 latent channels."""

TINY_FLUX2_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": _TEXT_HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
}
"""Config of the tiny `transformers.Qwen3ForCausalLM` (the vocabulary size comes from
`tiny_qwen_tokenizer`)."""

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen_tokenizer(model_max_length: int = 512) -> Any:
    """A Qwen2 byte-level BPE tokenizer with a tiny vocabulary and a chat template, built in code.

    The vocabulary holds the 256 byte-level symbols and a few merges (``"Ġa"``, ``"th"``, ...), so
    any text tokenizes; ``<|endoftext|>`` pads (and is the unknown token), ``<|im_start|>`` and
    ``<|im_end|>`` are special tokens, ``<think>`` and ``</think>`` ordinary ones, as in Qwen3.
    The chat template writes Qwen's ``<|im_start|>role\\ncontent<|im_end|>`` turns and honours
    ``enable_thinking=False`` (the FLUX.2 [klein] prompt encoding passes it).

    Args:
        model_max_length: the tokenizer's ``model_max_length``.

    Returns:
        A `transformers.Qwen2TokenizerFast`.

    Raises:
        ValueError: if ``model_max_length`` is not an int >= 2.

    Example:
        >>> tokenizer = tiny_qwen_tokenizer()
        >>> text = tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
        ...     add_generation_prompt=True, enable_thinking=False)
        >>> text.startswith("<|im_start|>user\\na cat<|im_end|>")
        True
        >>> tokenizer.decode(tokenizer("a cat").input_ids)
        'a cat'
    """
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
        raise ValueError(f"Expected `model_max_length` to be an int >= 2, but got {model_max_length!r}.")
    from tokenizers import pre_tokenizers
    from transformers import AddedToken, Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges = [("Ġ", "a"), ("t", "h"), ("Ġ", "th"), ("e", "r"), ("i", "n")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken("<|im_start|>", special=True, normalized=False),
        AddedToken("<|im_end|>", special=True, normalized=False),
    ]})
    tokenizer.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


class Flux2PixelAutoencoder(PixelAutoencoder):
    """Pixel space behind the interface the FLUX.2 pipelines use of ``AutoencoderKLFlux2``.

    `mosaic_kit.models.PixelAutoencoder` (lossless pixel unshuffling, ``3·factor²`` channels at
    ``1/factor`` resolution) plus the latent batch-norm statistics the FLUX.2 pipelines normalise
    with, here the identity (mean 0, variance 1, ``batch_norm_eps`` 0). With FLUX.2's 2×2
    patchify one token covers ``2·factor`` pixels, as in the FLUX.1 pixel-space world.

    Args:
        factor: pixels per latent cell along each side (a power of two).

    Example:
        >>> ae = Flux2PixelAutoencoder(factor=2)
        >>> x = torch.rand(1, 3, 8, 8) * 2 - 1
        >>> torch.equal(ae.decode(ae.encode(x).latent_dist.mode(), return_dict=False)[0], x)
        True
        >>> ae.bn.num_features, ae.config.batch_norm_eps
        (48, 0.0)
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__(factor)
        self.config.batch_norm_eps = 0.0
        self.bn = torch.nn.BatchNorm2d(4 * self.config.latent_channels, affine=False, eps=0.0).eval()


def tiny_flux2_components(seed: int = 0, transformer_overrides: dict[str, Any] | None = None,
                          pixel_space: int | None = None) -> dict[str, Any]:
    """The components of a tiny random `diffusers.Flux2KleinPipeline`, deterministic in ``seed``.

    Args:
        seed: seed of every random weight (and of the autoencoder's latent statistics).
        transformer_overrides: entries of `TINY_FLUX2_TRANSFORMER_CONFIG` to change (e.g.
            ``{"num_layers": 2}``); ``joint_attention_dim`` must stay 96 (the text encoder's).
        pixel_space: a factor for a `Flux2PixelAutoencoder` instead of the random autoencoder
            (``in_channels`` becomes ``4 · 3 · factor²``), or None.

    Returns:
        ``{"scheduler", "vae", "text_encoder", "tokenizer", "transformer"}`` for
        ``Flux2KleinPipeline(**components)``, every module in float32 and eval mode.

    Raises:
        ValueError: if ``transformer_overrides`` is not a dict of known config keys.

    Example:
        >>> from diffusers import Flux2KleinPipeline
        >>> pipe = Flux2KleinPipeline(**tiny_flux2_components(seed=0))
        >>> pipe.vae_scale_factor, pipe.transformer.config.in_channels
        (8, 16)
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    overrides = dict(transformer_overrides or {})
    unknown = sorted(set(overrides) - set(TINY_FLUX2_TRANSFORMER_CONFIG) - {"mlp_ratio", "rope_theta", "out_channels"})
    if not isinstance(transformer_overrides, (dict, type(None))) or unknown:
        raise ValueError(
            f"Expected `transformer_overrides` with keys of TINY_FLUX2_TRANSFORMER_CONFIG, but got "
            f"{transformer_overrides!r}."
        )
    tokenizer = tiny_qwen_tokenizer()
    config = {**TINY_FLUX2_TRANSFORMER_CONFIG, **overrides}
    if pixel_space is not None:
        vae = Flux2PixelAutoencoder(pixel_space)
        config["in_channels"] = vae.bn.num_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**config)
        if pixel_space is None:
            vae = AutoencoderKLFlux2(**TINY_FLUX2_VAE_CONFIG)
            channels = vae.bn.num_features
            vae.bn.running_mean.copy_(0.2 * torch.randn(channels))
            vae.bn.running_var.copy_(0.5 + torch.rand(channels))
        text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), **TINY_FLUX2_TEXT_CONFIG))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential",
    )
    for module in (transformer, vae, text_encoder):
        module.eval()
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "transformer": transformer}


def tiny_flux2_pipeline(seed: int = 0) -> Any:
    """A tiny random `diffusers.Flux2KleinPipeline` (progress bar off).

    Call it with ``text_encoder_out_layers=TINY_FLUX2_TEXT_OUT_LAYERS``.

    Args:
        seed: seed of the components (`tiny_flux2_components`).

    Returns:
        The pipeline, on the CPU in float32.

    Example:
        >>> pipe = tiny_flux2_pipeline()
        >>> out = pipe(prompt="a cat", height=32, width=32, num_inference_steps=1, output_type="pt",
        ...     text_encoder_out_layers=TINY_FLUX2_TEXT_OUT_LAYERS, max_sequence_length=16)
        >>> tuple(out.images.shape)
        (1, 3, 32, 32)
    """
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(**tiny_flux2_components(seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
