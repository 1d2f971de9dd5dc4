"""DINOv2 patch features (transformers)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checks import check_int, check_size
from ._checks import require
from .base import FeatureExtractor

__all__ = ["DINOv2"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Model types `from_pretrained` accepts (their patch tokens follow CLS and register tokens).
_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


class DINOv2(FeatureExtractor):
    """Patch tokens of a DINOv2 vision transformer (Oquab et al., 2023) as dense features.

    The images are resized bilinearly (antialiased) to `input_size`, normalised with the ImageNet
    mean and standard deviation, and run through `model`; the tokens of hidden layer `layer` minus
    the CLS token and any register tokens are the patch features, reshaped to the
    `(input_h / patch, input_w / patch)` patch grid and resized bilinearly to `grid_size`.

    Args:
        model: a `transformers.Dinov2Model` (or `Dinov2WithRegistersModel`), or any module with a
            `config` holding `patch_size` and `num_hidden_layers` whose call
            `model(pixel_values=..., output_hidden_states=True)` returns `hidden_states`. It is put in
            eval mode; inputs are moved to its device and dtype.
        layer: index into the model's `hidden_states` (0 is the patch embedding, `i` the output of
            block `i`, -1 the last block); defaults to -1.
        input_size: side of the model input in pixels, an int, `(height, width)` (each a multiple of
            the patch size), or None to keep each image's size rounded to the nearest multiple of the
            patch size; defaults to 448 (a 32×32 patch grid at patch size 14).
        grid_size: cells of the output grid, an int or `(gh, gw)`; defaults to 64.
        layernorm: apply the model's final layer norm to the tokens, as its `last_hidden_state`
            does (so `layer=-1` gives exactly the model's output tokens); defaults to True.

    Shape:
        - Input: `(B, 3, H, W)` float in [0, 1].
        - Output: `(B, hidden_size, gh, gw)` float32, on the model's device.

    Raises:
        ValueError: if `layer` is out of range or `input_size` is not a multiple of the patch size.

    Example:
        >>> from transformers import Dinov2Config, Dinov2Model
        >>> config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                       intermediate_size=64, patch_size=8, image_size=64)
        >>> extractor = DINOv2(Dinov2Model(config), input_size=64, grid_size=(16, 8))
        >>> extractor(torch.rand(2, 3, 100, 50)).shape
        torch.Size([2, 32, 16, 8])
    """

    name = "dinov2"

    def __init__(
        self,
        model: nn.Module,
        layer: int = -1,
        *,
        input_size: int | tuple[int, int] | None = 448,
        grid_size: int | tuple[int, int] = 64,
        layernorm: bool = True,
    ) -> None:
        super().__init__(grid_size)
        config = getattr(model, "config", None)
        if not isinstance(model, nn.Module) or not hasattr(config, "patch_size") or not hasattr(config, "num_hidden_layers"):
            raise ValueError(
                "Expected `model` to be a transformers Dinov2Model (a module with `config.patch_size` and "
                f"`config.num_hidden_layers`), but got {type(model).__name__}."
            )
        self.model = model.eval()
        self.patch_size = check_int("model.config.patch_size", config.patch_size, minimum=1)
        num_states = config.num_hidden_layers + 1
        self.layer = check_int("layer", layer)
        if not -num_states <= self.layer < num_states:
            raise ValueError(
                f"Expected `layer` in [{-num_states}, {num_states - 1}] (the model has {num_states} hidden states), "
                f"but got {layer}."
            )
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        if input_size is None:
            self.input_size = None
        else:
            self.input_size = check_size("input_size", input_size)
            if any(side % self.patch_size for side in self.input_size):
                raise ValueError(
                    f"Expected `input_size` to be a multiple of the patch size {self.patch_size}, "
                    f"but got {input_size!r}."
                )
        if not isinstance(layernorm, bool):
            raise ValueError(f"Expected `layernorm` to be a bool, but got {layernorm!r}.")
        if layernorm and not isinstance(getattr(model, "layernorm", None), nn.Module):
            raise ValueError("Expected `model` with a `layernorm` module when `layernorm=True`, but it has none.")
        self.layernorm = layernorm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        layer: int = -1,
        input_size: int | tuple[int, int] | None = 448,
        grid_size: int | tuple[int, int] = 64,
        layernorm: bool = True,
        **model_kwargs: Any,
    ) -> DINOv2:
        """Loads a DINOv2 checkpoint from a local folder or a hub id (e.g. `"facebook/dinov2-base"`).

        Args:
            path_or_id: local folder or hub id of a `Dinov2Model` or `Dinov2WithRegistersModel`.
            layer: see `DINOv2`.
            input_size: see `DINOv2`.
            grid_size: see `DINOv2`.
            layernorm: see `DINOv2`.
            **model_kwargs: passed to `transformers.AutoModel.from_pretrained` (e.g. `dtype`,
                `revision`, `local_files_only`); `trust_remote_code` is refused.

        Returns:
            The extractor, its model in eval mode.

        Raises:
            ImportError: if transformers is not installed (`pip install mosaic_kit[flux]`).
            ValueError: if the checkpoint is not a DINOv2 model, or `trust_remote_code` is given.

        Example:
            >>> import tempfile
            >>> from transformers import Dinov2Config, Dinov2Model
            >>> config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...                       intermediate_size=64, patch_size=8, image_size=64)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     Dinov2Model(config).save_pretrained(folder)
            ...     extractor = DINOv2.from_pretrained(folder, input_size=64, grid_size=8)
            >>> extractor(torch.rand(1, 3, 64, 64)).shape
            torch.Size([1, 32, 8, 8])
        """
        transformers = require("transformers", "DINOv2.from_pretrained")
        if "trust_remote_code" in model_kwargs:
            raise ValueError("Expected no `trust_remote_code` (only stock transformers models load), but got it.")
        model = transformers.AutoModel.from_pretrained(path_or_id, **model_kwargs)
        model_type = getattr(model.config, "model_type", None)
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"Expected a checkpoint with model_type in {list(_MODEL_TYPES)}, but got {model_type!r}.")
        return cls(model, layer, input_size=input_size, grid_size=grid_size, layernorm=layernorm)

    def _model_input_size(self, height: int, width: int) -> tuple[int, int]:
        if self.input_size is not None:
            return self.input_size
        patch = self.patch_size
        return max(patch, round(height / patch) * patch), max(patch, round(width / patch) * patch)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the chosen layer on the patch grid.

        Args:
            images: `(B, 3, H, W)` float images with values in [0, 1].

        Returns:
            `(B, hidden_size, input_h / patch_size, input_w / patch_size)` float32 features.

        Example:
            >>> from transformers import Dinov2Config, Dinov2Model
            >>> config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            ...                       intermediate_size=64, patch_size=8, image_size=64)
            >>> DINOv2(Dinov2Model(config), input_size=(32, 48)).extract(torch.rand(1, 3, 20, 30)).shape
            torch.Size([1, 32, 4, 6])
        """
        parameter = next(self.model.parameters())
        height, width = self._model_input_size(*images.shape[-2:])
        pixels = images.to(device=parameter.device, dtype=torch.float32)
        if tuple(pixels.shape[-2:]) != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        pixels = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        output = self.model(pixel_values=pixels.to(parameter.dtype), output_hidden_states=True)
        tokens = output.hidden_states[self.layer]
        if self.layernorm:
            tokens = self.model.layernorm(tokens)
        patch_tokens = tokens[:, self.num_prefix_tokens :]
        rows, cols = height // self.patch_size, width // self.patch_size
        if patch_tokens.shape[1] != rows * cols:
            raise ValueError(
                f"Expected {rows} × {cols} = {rows * cols} patch tokens after {self.num_prefix_tokens} prefix tokens, "
                f"but the model returned {patch_tokens.shape[1]}."
            )
        return patch_tokens.float().transpose(1, 2).reshape(images.shape[0], -1, rows, cols)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, layer={self.layer}, input_size={self.input_size}, "
            f"patch_size={self.patch_size}, layernorm={self.layernorm}"
        )
