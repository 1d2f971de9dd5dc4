"""A quantized frozen base as its backend stores it, for the fake-tensor step (``--quantize``).

Every frozen ``nn.Linear`` of the transformer (peft's LoRA layers keep theirs as ``base_layer``;
the LoRA's own ``lora_A``/``lora_B`` stay fp32 and trainable) is replaced by a `QuantizedLinear`
holding the layout the backend keeps on the GPU, and computing each matmul through a dequantized
bf16 copy of its weight that lives only during that matmul, in the forward and again in the
backward (where only the input's gradient is needed):

- ``int8`` (torchao int8 weight-only, ``Int8WeightOnlyConfig``): an int8 ``(out, in)`` weight and
  one bf16 scale per output channel;
- ``nf4`` (bitsandbytes ``Linear4bit``, ``bnb_4bit_quant_type="nf4"``, blocksize 64, double
  quantization as `mosaic_kit.models.quantize` configures it): the 4-bit codes packed two per
  uint8 (``in · out / 2`` bytes), one uint8 absmax per block of 64 weights, and one float32 absmax
  (plus a float32 offset) per 256 of those blocks; the dequantization first expands the absmax
  to float32 (one value per block), then writes the bf16 weight.

Biases stay bf16. What is not modelled: the backends' kernels and workspaces (torchao's int8
matmul, bitsandbytes' dequantize kernels), and bitsandbytes' ``MatMul4Bit`` keeping its input
on ``ctx`` (not through ``save_for_backward``), which a non-reentrant checkpoint cannot drop: a
real NF4 run may hold more activations than this layout (the GPU check measures it).
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED_LAYOUTS = ("int8", "nf4")
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256


class _DequantizedMatmul(torch.autograd.Function):
    """``linear(x, dequantize(), bias)``; the backward dequantizes again for ``x``'s gradient."""

    @staticmethod
    def forward(ctx, x, bias, layer):  # type: ignore[override]
        ctx.layer, ctx.dtype = layer, x.dtype
        weight = layer.dequantize()
        return torch.nn.functional.linear(x, weight.to(x.dtype) if not torch.is_autocast_enabled(x.device.type)
                                          else weight, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight = ctx.layer.dequantize()
        return torch.matmul(grad.to(weight.dtype), weight).to(ctx.dtype), None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer stored as ``layout`` (``"int8"`` or ``"nf4"``, see the module docstring).

    Args:
        linear: the layer it replaces (meta or real; only its shape and bias are used).
        layout: one of `QUANTIZED_LAYOUTS`.

    Raises:
        ValueError: an unknown layout, or an ``nf4`` weight whose size is not a multiple of 64.
    """

    def __init__(self, linear: nn.Linear, layout: str) -> None:
        super().__init__()
        if layout not in QUANTIZED_LAYOUTS:
            raise ValueError(f"Expected `layout` in {QUANTIZED_LAYOUTS}, but got {layout!r}.")
        self.in_features, self.out_features, self.layout = linear.in_features, linear.out_features, layout
        device, numel = linear.weight.device, linear.in_features * linear.out_features

        def frozen(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        if layout == "int8":
            self.qweight = frozen(self.out_features, self.in_features, dtype=torch.int8)
            self.scale = frozen(self.out_features, dtype=torch.bfloat16)
        else:
            if numel % NF4_BLOCK:
                raise ValueError(f"Expected a weight size that is a multiple of {NF4_BLOCK} for nf4, but got {numel}.")
            blocks = numel // NF4_BLOCK
            nested = -(-blocks // NF4_NESTED_BLOCK)
            self.qweight = frozen(numel // 2, 1, dtype=torch.uint8)
            self.absmax = frozen(blocks, dtype=torch.uint8)
            self.nested_absmax = frozen(nested, dtype=torch.float32)
            self.nested_offset = frozen(1, dtype=torch.float32)
        self.bias = None if linear.bias is None else frozen(self.out_features, dtype=torch.bfloat16)

    @property
    def weight(self) -> torch.Tensor:
        """An empty bf16 tensor: what code that reads ``layer.weight.dtype`` sees (the backends'
        weights report their compute dtype too); the storage is `qweight` and its scales."""
        return self.qweight.new_empty(0, dtype=torch.bfloat16)

    def dequantize(self) -> torch.Tensor:
        """The bf16 ``(out, in)`` weight, a fresh tensor (what the backend materialises per matmul)."""
        if self.layout == "int8":
            return self.qweight.to(torch.bfloat16).mul_(self.scale[:, None])
        absmax = self.absmax.float()  # the first level of the double quantization, per block of 64
        del absmax
        return self.qweight.new_empty(self.out_features, self.in_features, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedMatmul.apply(x, self.bias, self)


def quantize_linears(module: nn.Module, layout: str) -> int:
    """Replaces every frozen ``nn.Linear`` of ``module`` (not peft's ``lora_*`` layers) by a
    `QuantizedLinear` of ``layout``, in place; returns how many were replaced."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad and "lora_" not in name:
                setattr(parent, name, QuantizedLinear(child, layout))
                count += 1
    return count
