"""A quantized frozen base through diffusers' own quantization configs, with the LoRA trained on
top through peft (peft wraps quantized linears with its bitsandbytes / torchao LoRA layers).

`QUANTIZE` names the settings (``model.quantize`` in the training config):

- ``"none"``: the base in the run's dtype (bf16 on a GPU), as before;
- ``"int8"``: torchao int8 weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``), the one that
  also runs on the CPU (the tests use it on the tiny models);
- ``"fp8"``: torchao float8 weight-only (``Float8WeightOnlyConfig``; GPUs with float8 support,
  compute capability 8.9 or newer);
- ``"nf4"``: bitsandbytes 4-bit NormalFloat with double quantization, bf16 compute
  (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``; CUDA);
- ``"int8-bnb"``: bitsandbytes LLM.int8 (``BitsAndBytesConfig(load_in_8bit=True)``; CUDA).

Only the denoiser is quantized (the text encoders and the VAE stay as loaded). A pretrained base
is quantized while loading (`pipeline_quantization_config`: diffusers'
``PipelineQuantizationConfig`` for the ``transformer`` component); a model built in code (the tiny
random ones) goes through the same ``from_pretrained`` path from a temporary copy
(`quantize_transformer`). torchao is the ``quant`` extra (``pip install mosaic_kit[quant]``),
bitsandbytes the ``quant-gpu`` extra.

Example:
    >>> check_quantize("int8")
    'int8'
    >>> check_quantize("int4")
    Traceback (most recent call last):
    ...
    ValueError: Expected `quantize` to be one of ('none', 'int8', 'fp8', 'nf4', 'int8-bnb'), but got 'int4'.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn

__all__ = ["QUANTIZE", "check_quantize", "is_quantized", "pipeline_quantization_config", "quantization_config",
           "quantize_pipeline_transformer", "quantize_transformer", "quantized_loading_kwargs"]

QUANTIZE = ("none", "int8", "fp8", "nf4", "int8-bnb")
"""Allowed ``quantize`` values (see the module docstring)."""

_BACKEND = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes", "int8-bnb": "bitsandbytes"}
_EXTRA = {"torchao": "quant", "bitsandbytes": "quant-gpu"}


def check_quantize(quantize: Any) -> str:
    """Checks a ``quantize`` setting against `QUANTIZE` (see the module example)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"Expected `quantize` to be one of {QUANTIZE}, but got {quantize!r}.")
    return quantize


def _require(backend: str, quantize: str) -> None:
    import importlib.util

    if importlib.util.find_spec(backend) is None:
        raise ImportError(f"`quantize: {quantize}` needs {backend}: install it with `pip install {backend}` (the "
                          f"mosaic_kit extra `{_EXTRA[backend]}`).")


def quantization_config(quantize: str, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """diffusers' quantization config of a `QUANTIZE` setting (None for ``"none"``).

    Args:
        quantize: the setting.
        compute_dtype: the dtype bitsandbytes 4-bit layers compute in.

    Returns:
        A ``diffusers.TorchAoConfig`` or ``diffusers.BitsAndBytesConfig``, or None.

    Raises:
        ValueError: an unknown setting.
        ImportError: the backend is not installed (naming the extra).

    Example:
        >>> type(quantization_config("int8")).__name__, quantization_config("none")
        ('TorchAoConfig', None)
    """
    check_quantize(quantize)
    if quantize == "none":
        return None
    backend = _BACKEND[quantize]
    _require(backend, quantize)
    if backend == "torchao":
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig())
    from diffusers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def pipeline_quantization_config(quantize: str, compute_dtype: torch.dtype | None = torch.bfloat16) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` quantizing a pipeline's ``transformer`` while it
    loads (``Pipeline.from_pretrained(..., quantization_config=...)``), or None for ``"none"``."""
    config = quantization_config(quantize, compute_dtype or torch.bfloat16)
    if config is None:
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={"transformer": config})


def quantized_loading_kwargs(quantize: str, compute_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """The extra keyword arguments of a pipeline's ``from_pretrained`` that quantize its
    ``transformer`` while it loads: ``{"quantization_config": pipeline_quantization_config(...)}``,
    or ``{}`` for ``"none"``.

    Args:
        quantize: a `QUANTIZE` setting.
        compute_dtype: the dtype bitsandbytes 4-bit layers compute in (None: bf16).

    Returns:
        The keyword arguments (empty for ``"none"``).

    Raises:
        ValueError: an unknown setting.
        ImportError: the backend is not installed (naming the extra).

    Example:
        >>> quantized_loading_kwargs("none"), list(quantized_loading_kwargs("int8"))
        ({}, ['quantization_config'])
    """
    quantization = pipeline_quantization_config(quantize, compute_dtype)
    return {} if quantization is None else {"quantization_config": quantization}


def quantize_pipeline_transformer(pipe: Any, quantize: str) -> Any:
    """Replaces the ``transformer`` of a pipeline built in code by its quantized copy
    (`quantize_transformer`, registered with the pipeline's ``register_modules``); ``"none"``
    registers the transformer itself.

    Args:
        pipe: a diffusers ``DiffusionPipeline`` with a ``transformer`` component.
        quantize: a `QUANTIZE` setting.

    Returns:
        ``pipe`` itself.

    Raises:
        ValueError: an unknown setting.
        ImportError: the backend is not installed (naming the extra).

    Example:
        >>> from mosaic_kit.models.flux2 import Flux2Family
        >>> pipe = quantize_pipeline_transformer(Flux2Family.tiny().pipe, "int8")
        >>> is_quantized(pipe.transformer)
        True
    """
    pipe.register_modules(transformer=quantize_transformer(pipe.transformer, quantize))
    return pipe


def quantize_transformer(transformer: nn.Module, quantize: str, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """A quantized copy of a diffusers model built in code, through diffusers' own loading path:
    ``save_pretrained`` into a temporary folder, then ``from_pretrained(...,
    quantization_config=quantization_config(quantize))``. ``"none"`` returns ``transformer`` itself.

    Args:
        transformer: a diffusers ``ModelMixin`` (e.g. a tiny `Flux2Transformer2DModel`).
        quantize: a `QUANTIZE` setting.
        torch_dtype: dtype of the weights that stay unquantized (default: the model's).

    Returns:
        The quantized model (frozen; on the CPU unless the backend placed it).

    Example:
        >>> from diffusers import Flux2Transformer2DModel
        >>> from mosaic_kit.models.flux2.tiny import TINY_FLUX2_TRANSFORMER_CONFIG
        >>> model = quantize_transformer(Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER_CONFIG), "int8")
        >>> is_quantized(model), type(model.transformer_blocks[0].attn.to_q.weight).__name__
        (True, 'Int8Tensor')
    """
    config = quantization_config(quantize, torch_dtype or torch.bfloat16)
    if config is None:
        return transformer
    dtype = torch_dtype or next(transformer.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="mosaic-quantize-") as folder:
        transformer.save_pretrained(folder)
        quantized = type(transformer).from_pretrained(folder, quantization_config=config, torch_dtype=dtype)
    return quantized.requires_grad_(False)


def is_quantized(module: nn.Module) -> bool:
    """Whether a diffusers model was loaded with a quantization config (diffusers marks it)."""
    return bool(getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None) is not None)
