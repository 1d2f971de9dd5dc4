"""The components of a tiny random FLUX.1 pipeline, built entirely in code (tests, smoke runs, CPU
demos); they live with their family (`MosaicFluxFamily.tiny`).

Nothing is downloaded: the transformer, VAE, both text encoders and both tokenizers are built
from small configs and random weights, deterministically from a seed. The geometry matches real
FLUX.1 where the pipelines depend on it: the VAE downsamples 8× (four levels), latents are packed
2×2 (so one token covers 16×16 pixels), the transformer has guidance embeddings and 3-axis RoPE,
the CLIP tokenizer pads to 77 tokens and the T5 tokenizer to 512, and the scheduler has FLUX's
resolution-dependent shift.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "TINY_CLIP_TEXT_CONFIG",
    "TINY_T5_CONFIG",
    "TINY_TRANSFORMER_CONFIG",
    "TINY_VAE_CONFIG",
    "tiny_clip_tokenizer",
    "tiny_flux_components",
    "tiny_t5_tokenizer",
]

# Hidden sizes shared between the text encoders and the transformer's input projections.
_CLIP_HIDDEN = 32
_T5_HIDDEN = 32
_LATENT_CHANNELS = 4

TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * _LATENT_CHANNELS,  # 2×2 packed latents
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _T5_HIDDEN,
    "pooled_projection_dim": _CLIP_HIDDEN,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
"""Config of the tiny `diffusers.FluxTransformer2DModel`: two double and two single blocks, two
16-dim heads, 16 input channels (4 latent channels packed 2×2), guidance embeddings, RoPE axes
(4, 6, 6). Build one with `FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)`."""

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),  # four levels: 8× downsampling like FLUX
    "layers_per_block": 1,
    "latent_channels": _LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.3611,  # FLUX.1's values
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
"""Config of the tiny `diffusers.AutoencoderKL`: four levels (8× downsampling, as
`FluxPipeline.vae_scale_factor = 2 ** (len(block_out_channels) - 1)` expects), 4 latent channels,
FLUX.1's `scaling_factor` and `shift_factor`, no quant convs."""

TINY_CLIP_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": _CLIP_HIDDEN,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": _CLIP_HIDDEN,
    "hidden_act": "quick_gelu",
}
"""Config of the tiny `transformers.CLIPTextModel` (vocabulary and special-token ids come from
`tiny_clip_tokenizer`)."""

TINY_T5_CONFIG: dict[str, Any] = {
    "d_model": _T5_HIDDEN,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
}
"""Config of the tiny `transformers.T5EncoderModel` (vocabulary size and special-token ids come
from `tiny_t5_tokenizer`)."""

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"


def _require_flux_deps() -> None:
    try:
        import diffusers  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The tiny FLUX pipeline needs diffusers, transformers and tokenizers; install them with "
            "`pip install mosaic_kit[flux]`."
        ) from error


def tiny_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A CLIP tokenizer with a tiny byte-level vocabulary, built in code.

    The vocabulary holds the 256 byte-level symbols, each also with CLIP's end-of-word suffix
    `</w>`, and no merges, so any text (any language, any characters) tokenizes into one token per
    byte; `<|startoftext|>` and `<|endoftext|>` come last (ids 512 and 513), as in real CLIP where
    the end-of-text token has the highest id. Padding uses `<|endoftext|>`, like the FLUX.1 CLIP
    tokenizer. The result is the same object every call (no randomness involved).

    Args:
        model_max_length: length that `padding="max_length"` pads to (FluxPipeline reads it as
            `tokenizer_max_length`); defaults to 77, CLIP's length.

    Returns:
        A `transformers.CLIPTokenizer` with 514 tokens.

    Raises:
        ValueError: if `model_max_length` is not an int >= 2.

    Example:
        >>> tokenizer = tiny_clip_tokenizer()
        >>> ids = tokenizer("a dog", padding="max_length", max_length=8, truncation=True).input_ids
        >>> ids == [512, 320, 67, 78, 326, 513, 513, 513]
        True
        >>> len(tokenizer), tokenizer.model_max_length
        (514, 77)
    """
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
        raise ValueError(f"Expected `model_max_length` to be an int >= 2, but got {model_max_length!r}.")
    _require_flux_deps()
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token=_CLIP_EOS,
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,
        model_max_length=model_max_length,
    )


def tiny_t5_tokenizer(model_max_length: int = 512) -> Any:
    """A T5 (Unigram, SentencePiece-style) tokenizer with a tiny vocabulary, built in code.

    Ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>` as in T5; then the word-start marker `▁`, the
    printable ASCII characters and the same characters prefixed by `▁`. Any English prompt
    tokenizes (mostly one token per character); characters outside printable ASCII become
    `<unk>`. Every sequence ends with `</s>`, padding uses `<pad>`. There are no sentinel tokens.
    The result is the same every call (no randomness involved).

    Args:
        model_max_length: the tokenizer's `model_max_length`; defaults to 512, the length
            FluxPipeline pads T5 prompts to (`max_sequence_length`).

    Returns:
        A `transformers.T5Tokenizer` (tokenizers backend) with 192 tokens.

    Raises:
        ValueError: if `model_max_length` is not an int >= 2.

    Example:
        >>> tokenizer = tiny_t5_tokenizer()
        >>> tokenizer.convert_ids_to_tokens(tokenizer("a dog").input_ids)
        ['▁a', '▁d', 'o', 'g', '</s>']
        >>> tokenizer("é", padding="max_length", max_length=4).input_ids  # ▁, <unk>, </s>, <pad>
        [3, 2, 1, 0]
    """
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
        raise ValueError(f"Expected `model_max_length` to be an int >= 2, but got {model_max_length!r}.")
    _require_flux_deps()
    from transformers import T5Tokenizer

    characters = [chr(code) for code in range(33, 127)]
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(character, -2.0) for character in characters]
    vocab += [("▁" + character, -1.0) for character in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_flux_components(
    seed: int = 0, transformer_overrides: dict[str, Any] | None = None, pixel_space: int | None = None
) -> dict[str, Any]:
    """The components of a tiny random FLUX.1 pipeline, built in code without downloads.

    Returns the keyword arguments of `diffusers.FluxPipeline.__init__`, so
    `FluxPipeline(**tiny_flux_components())` is a working (random, meaningless) text-to-image
    pipeline. Weights are drawn under `torch.manual_seed(seed)` inside a forked RNG, so the global
    RNG state is untouched and equal seeds give equal weights. All models are float32, on CPU,
    in eval mode.

    - `transformer`: `FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)`.
    - `vae`: `AutoencoderKL(**TINY_VAE_CONFIG)`, 8× downsampling, so height and width must be
      multiples of 16 (the smallest image is 16×16, one token; 32×32 gives 2×2 tokens).
    - `text_encoder`, `tokenizer`: a tiny `CLIPTextModel` and `tiny_clip_tokenizer()` (77 tokens).
    - `text_encoder_2`, `tokenizer_2`: a tiny `T5EncoderModel` and `tiny_t5_tokenizer()` (512
      tokens; pass a smaller `max_sequence_length` to the pipeline for speed).
    - `scheduler`: `FlowMatchEulerDiscreteScheduler` with FLUX.1's settings (shift 3.0, dynamic
      shifting with base/max shift 0.5/1.15 between 256 and 4096 image tokens).

    Args:
        seed: seed of the random weights; defaults to 0.
        transformer_overrides: entries of `TINY_TRANSFORMER_CONFIG` to change (layers, heads, ...).
        pixel_space: when given, a `mosaic_kit.models.PixelAutoencoder` with this factor replaces
            the VAE (no learned weights; the transformer's ``in_channels`` follows, ``12·factor²``).

    Returns:
        A dict with exactly the keys `scheduler`, `vae`, `text_encoder`, `tokenizer`,
        `text_encoder_2`, `tokenizer_2`, `transformer`.

    Raises:
        ValueError: if `seed` is not a non-negative int.
        ImportError: if diffusers, transformers or tokenizers is missing (extra `flux`).

    Example:
        >>> components = tiny_flux_components(seed=0)
        >>> sorted(components)
        ['scheduler', 'text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2', 'transformer', 'vae']
        >>> components["transformer"].config.in_channels, components["vae"].config.latent_channels
        (16, 4)
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Expected `seed` to be a non-negative int, but got {seed!r}.")
    _require_flux_deps()
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CLIP_TEXT_CONFIG,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        **TINY_T5_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = {**TINY_TRANSFORMER_CONFIG, **(transformer_overrides or {})}
        if pixel_space is not None:
            from ..pixel import PixelAutoencoder

            vae = PixelAutoencoder(pixel_space)
            config["in_channels"] = 4 * vae.config.latent_channels
        else:
            vae = AutoencoderKL(**TINY_VAE_CONFIG)
        transformer = FluxTransformer2DModel(**config)
        text_encoder = CLIPTextModel(clip_config)
        text_encoder_2 = T5EncoderModel(t5_config)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "scheduler": scheduler,
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer.eval(),
    }
