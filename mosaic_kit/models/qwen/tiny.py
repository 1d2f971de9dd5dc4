"""A tiny random Qwen-Image-Edit-Plus pipeline built entirely in code (tests, CPU runs).

Nothing is downloaded: the `QwenImageTransformer2DModel`, the `AutoencoderKLQwenImage`, the
Qwen2.5-VL text encoder, its byte-level BPE tokenizer and its processor are built from small
configs and seeded random weights. The geometry matches the real model where the pipeline depends
on it: the autoencoder downsamples 8× (three downsampling levels) and its latents are packed 2×2
(one token covers 16×16 pixels), the transformer's ``in_channels`` is ``4 · z_dim``, the
autoencoder normalises with non-trivial per-channel latent statistics, the config's vision token
ids are the tokenizer's, and the tokenizer turns the pipeline's system prompt into exactly 64
tokens, the prefix the pipeline drops (``prompt_template_encode_start_idx``), as the real one does.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import torch
from transformers import Qwen2VLProcessor

from ..pixel import PixelAutoencoder, _EncoderOutput, _LatentDistribution

__all__ = ["TINY_QWEN_TRANSFORMER_CONFIG", "ImageOnlyQwen2VLProcessor", "QwenPixelAutoencoder",
           "tiny_qwen_edit_plus_components", "tiny_qwen_vl_tokenizer"]

TINY_QWEN_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 16, "axes_dims_rope": (4, 6, 6), "zero_cond_t": True,
}
"""Config of the tiny `diffusers.QwenImageTransformer2DModel`: two blocks, two 16-dim heads, 16
input channels (4 latent channels packed 2×2); ``zero_cond_t=True`` as Qwen-Image-Edit-2511
(references at timestep 0); ``{"zero_cond_t": False}`` as an override gives 2509's transformer."""

_TEMPLATE = (  # diffusers' QwenImageEditPlusPipeline.prompt_template_encode (0.42)
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>")


def tiny_qwen_vl_tokenizer() -> Any:
    """A Qwen2 byte-level BPE tokenizer with a tiny vocabulary, built in code: the 256 byte
    symbols, one token per word of the edit pipeline's system prompt (so that prompt is 64 tokens,
    as with the real tokenizer), and Qwen2.5-VL's special tokens (``<|vision_start|>``,
    ``<|image_pad|>``, ...).

    Returns:
        A `transformers.Qwen2TokenizerFast`.

    Example:
        >>> tokenizer = tiny_qwen_vl_tokenizer()
        >>> len(tokenizer(_TEMPLATE.split("{}")[0]).input_ids)  # the prefix the pipeline drops
        64
        >>> tokenizer.decode(tokenizer("Picture 1: <|vision_start|><|image_pad|><|vision_end|>a cat").input_ids)
        'Picture 1: <|vision_start|><|image_pad|><|vision_end|>a cat'
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, Qwen2TokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    probe = Qwen2TokenizerFast(vocab=dict(vocab), merges=[], unk_token="<|endoftext|>")
    split = probe.backend_tokenizer.pre_tokenizer
    words = [w for part in re.split(r"<\|im_\w+\|>|\{\}", _TEMPLATE) for w, _ in split.pre_tokenize_str(part)]
    for word in words:  # merge the word's current pieces left to right until it is one token
        while True:
            bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
            pieces = bpe.model.tokenize(word)
            if len(pieces) == 1:
                break
            left, right = pieces[0].value, pieces[1].value
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
    for token in _SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", bos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(token, special=True, normalized=False) for token in _SPECIAL[1:]]})
    return tokenizer


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`transformers.Qwen2VLProcessor` without a video processor: transformers 5 type-checks every
    sub-processor, and Qwen2-VL's video processor needs torchvision. Text and images are processed
    exactly as by the stock processor.

    Example:
        >>> from transformers import Qwen2VLImageProcessorPil
        >>> processor = ImageOnlyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(),
        ...     tokenizer=tiny_qwen_vl_tokenizer(), video_processor=None)
        >>> processor.video_processor is None
        True
    """

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class QwenPixelAutoencoder(PixelAutoencoder):
    """Pixel space behind the interface `QwenImageEditPlusPipeline` uses of ``AutoencoderKLQwenImage``.

    `mosaic_kit.models.PixelAutoencoder` (lossless pixel unshuffling, ``3·factor²`` channels at
    ``1/factor`` resolution) on the video autoencoder's 5-d tensors ``(B, C, frames, H, W)``,
    each frame folded on its own, with the config entries the pipeline reads: ``z_dim`` (the
    channels), the identity latent statistics (``latents_mean`` 0, ``latents_std`` 1) and
    ``temperal_downsample`` (one entry per halving: the pipeline's ``vae_scale_factor`` is
    ``2 ** len(temperal_downsample)``, here ``factor``). With the 2×2 packing one token covers
    ``2·factor`` pixels, as in the FLUX.1 and FLUX.2 pixel-space worlds.

    Args:
        factor: pixels per latent cell along each side (a power of two).

    Raises:
        ValueError: a bad ``factor``, or a tensor that is not 5-d.

    Example:
        >>> ae = QwenPixelAutoencoder(factor=2)
        >>> x = torch.rand(1, 3, 1, 8, 8) * 2 - 1
        >>> z = ae.encode(x).latent_dist.mode()
        >>> tuple(z.shape), torch.equal(ae.decode(z, return_dict=False)[0], x)
        ((1, 12, 1, 4, 4), True)
        >>> ae.config.z_dim, len(ae.temperal_downsample)
        (12, 1)
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__(factor)
        channels = self.config.latent_channels
        self.config.z_dim = channels
        self.config.latents_mean, self.config.latents_std = [0.0] * channels, [1.0] * channels
        self.temperal_downsample = [False] * (factor.bit_length() - 1)

    @staticmethod
    def _per_frame(function: Any, video: torch.Tensor, name: str) -> torch.Tensor:
        """``function`` over every frame of ``video`` ``(B, C, T, H, W)``, stacked back to 5-d."""
        if not isinstance(video, torch.Tensor) or video.ndim != 5:
            raise ValueError(f"Expected `{name}` of shape (B, C, frames, H, W), but got "
                             f"{getattr(video, 'shape', type(video))}.")
        out = function(video.transpose(1, 2).flatten(0, 1))
        return out.unflatten(0, (video.shape[0], video.shape[2])).transpose(1, 2)

    def encode(self, images: torch.Tensor, return_dict: bool = True):
        """``(B, 3, T, H, W)`` in ``[-1, 1]`` → latents ``(B, 3·f², T, H/f, W/f)``."""
        latents = self._per_frame(lambda frames: super(QwenPixelAutoencoder, self).encode(frames).latent_dist.mode(),
                                  images, "images")
        out = _EncoderOutput(_LatentDistribution(latents))
        return out if return_dict else (out.latent_dist,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        """Latents ``(B, 3·f², T, h, w)`` → ``(B, 3, T, h·f, w·f)`` images."""
        images = self._per_frame(lambda frames: super(QwenPixelAutoencoder, self).decode(frames).sample,
                                 latents, "latents")
        return SimpleNamespace(sample=images) if return_dict else (images,)


def tiny_qwen_edit_plus_components(seed: int = 0, transformer_overrides: dict[str, Any] | None = None,
                                   pixel_space: int | None = None) -> dict[str, Any]:
    """The components of a tiny random `diffusers.QwenImageEditPlusPipeline`, deterministic in ``seed``.

    Args:
        seed: seed of every random weight.
        transformer_overrides: entries of `TINY_QWEN_TRANSFORMER_CONFIG` to change (e.g.
            ``{"zero_cond_t": False}`` for Qwen-Image-Edit-2509, ``{"num_layers": 1}``).
        pixel_space: a factor for a `QwenPixelAutoencoder` instead of the random autoencoder
            (``in_channels`` becomes ``4 · 3 · factor²`` and ``out_channels`` ``3 · factor²``), or None.

    Returns:
        ``{"scheduler", "vae", "text_encoder", "tokenizer", "processor", "transformer"}``, every
        module in float32 and eval mode.

    Raises:
        ValueError: if ``transformer_overrides`` is not a dict of keys of the tiny config.

    Example:
        >>> from diffusers import QwenImageEditPlusPipeline
        >>> pipe = QwenImageEditPlusPipeline(**tiny_qwen_edit_plus_components())
        >>> pipe.vae_scale_factor, pipe.transformer.config.in_channels
        (8, 16)
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    overrides = transformer_overrides or {}
    if not isinstance(overrides, dict) or set(overrides) - set(TINY_QWEN_TRANSFORMER_CONFIG):
        raise ValueError(f"Expected `transformer_overrides` with keys of TINY_QWEN_TRANSFORMER_CONFIG "
                         f"{sorted(TINY_QWEN_TRANSFORMER_CONFIG)}, but got {transformer_overrides!r}.")
    tokenizer = tiny_qwen_vl_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL}
    text_config = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1e6,
                   "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                   "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    vision_config = {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                     "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, vocab_size=len(tokenizer),
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    transformer_config = {**TINY_QWEN_TRANSFORMER_CONFIG, **overrides}
    if pixel_space is not None:
        vae = QwenPixelAutoencoder(pixel_space)
        transformer_config.update(in_channels=4 * vae.config.z_dim, out_channels=vae.config.z_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**transformer_config)
        if pixel_space is None:
            vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                         temperal_downsample=[False, True, True],
                                         latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 1.0, 2.0])
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192,
                                                time_shift_type="exponential")
    for module in (transformer, vae, text_encoder):
        module.eval()
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "processor": processor, "transformer": transformer}
