"""Diffusion features in the manner of DIFT, from a diffusers DiT (diffusion transformer)."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from ..utils.checks import check_int
from ._checks import require
from .diffusion import _HUB_KWARGS, _NoisedImageFeatures, _run_until

__all__ = ["DiTFeatures"]


class DiTFeatures(_NoisedImageFeatures):
    """Intermediate DiT tokens of a noised image, as DIFT does with a UNet (Tang et al., 2023).

    Steps, for ``(B, 3, H, W)`` images in [0, 1]:

    1. resize to ``input_size`` and map to [-1, 1]; with a ``vae``, encode to latents (the mode,
       shifted and scaled by the VAE's config);
    2. for each of ``ensemble_size`` seeded noise draws, noise the latents to ``timestep`` with
       ``scheduler.add_noise`` and run the transformer, capturing the output tokens of
       ``transformer_blocks[layer]`` with a forward hook (the forward stops right after it);
    3. average over the draws, lay the ``(h/p)·(w/p)`` tokens out on their patch grid
       (``p = patch_size``), and resize bilinearly to ``grid_size``.

    Works with diffusers' class-conditional ``DiTTransformer2DModel`` (e.g. ``facebook/DiT-XL-2-256``
    with its VAE). ``class_label`` defaults to the null class (``num_embeds_ada_norm``), which the
    model learned for classifier-free guidance, so features are not biased towards one class.

    Args:
        transformer: a ``diffusers.DiTTransformer2DModel`` (a module with ``config`` and
            ``transformer_blocks``); put in eval mode.
        timestep: noise level in ``[0, num_train_timesteps)``; defaults to 261.
        layer: index of the block whose output tokens are the features; defaults to the middle
            block (``num_layers // 2``).
        vae: an ``AutoencoderKL`` whose latents the DiT denoises, or None for a pixel-space DiT.
        scheduler: an object with ``add_noise`` and ``config.num_train_timesteps``; None builds
            DDPM's ``linear`` schedule (1e-4 to 0.02, 1000 steps), as DiT was trained with.
        class_label: the class fed to the model, in ``[0, num_embeds_ada_norm]``; None: the null class.
        ensemble_size: noise draws averaged; defaults to 8.
        seed: seed of the noise; defaults to 0.
        input_size: side of the model's image input in pixels (int or ``(height, width)``), or
            None to keep the images' size; it must be divisible by the patch size (times the VAE's
            downsampling factor).
        grid_size: cells of the output grid, an int or ``(gh, gw)``; defaults to 64.

    Shape:
        - Input: ``(B, 3, H, W)`` float in [0, 1].
        - Output: ``(B, D, gh, gw)`` float32, ``D`` the transformer's inner dimension.

    Example:
        >>> from diffusers import DiTTransformer2DModel
        >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6,
        ...                             num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10)
        >>> extractor = DiTFeatures(dit, timestep=100, ensemble_size=2, grid_size=4)
        >>> images = torch.rand(2, 3, 16, 16)
        >>> features = extractor(images)
        >>> features.shape, torch.equal(features, extractor(images))  # seeded noise: repeatable
        (torch.Size([2, 16, 4, 4]), True)
    """

    name = "dit"

    def __init__(
        self,
        transformer: nn.Module,
        timestep: int = 261,
        layer: int | None = None,
        *,
        vae: nn.Module | None = None,
        scheduler: Any = None,
        class_label: int | None = None,
        ensemble_size: int = 8,
        seed: int = 0,
        input_size: int | tuple[int, int] | None = None,
        grid_size: int | tuple[int, int] = 64,
    ) -> None:
        super().__init__(grid_size)
        config = getattr(transformer, "config", None)
        blocks = getattr(transformer, "transformer_blocks", None)
        if not isinstance(transformer, nn.Module) or config is None or not isinstance(blocks, nn.ModuleList):
            raise ValueError(
                "Expected `transformer` to be a diffusers DiTTransformer2DModel (a module with `config` and "
                f"`transformer_blocks`), but got {type(transformer).__name__}."
            )
        self.transformer = transformer.eval()
        self.patch_size = int(config.patch_size)
        self._setup_noising(
            "transformer", "DiT", transformer, self.patch_size, vae, scheduler, False,
            timestep, ensemble_size, seed, input_size,
        )
        self.layer = len(blocks) // 2 if layer is None else check_int("layer", layer, minimum=0)
        if self.layer >= len(blocks):
            raise ValueError(f"Expected `layer` in [0, {len(blocks)}) (the DiT has {len(blocks)} blocks), but got {layer}.")
        classes = getattr(config, "num_embeds_ada_norm", None)
        if classes is None:
            raise ValueError("Expected a class-conditional DiT (`num_embeds_ada_norm` in its config), but got None.")
        self.class_label = classes if class_label is None else check_int("class_label", class_label, minimum=0)
        if self.class_label > classes:
            raise ValueError(f"Expected `class_label` in [0, {classes}] ({classes} is the null class), but got {class_label}.")

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        subfolder: str | None = "transformer",
        *,
        vae_subfolder: str | None = "vae",
        timestep: int = 261,
        layer: int | None = None,
        class_label: int | None = None,
        ensemble_size: int = 8,
        seed: int = 0,
        input_size: int | tuple[int, int] | None = 256,
        grid_size: int | tuple[int, int] = 64,
        scheduler: Any = None,
        **model_kwargs: Any,
    ) -> DiTFeatures:
        """Loads a diffusers DiT (and its VAE) from a local folder or a hub id, e.g.
        ``"facebook/DiT-XL-2-256"``.

        Args:
            path_or_id: local folder or hub id of a diffusers DiT pipeline or model.
            subfolder: folder of the transformer inside it; defaults to ``"transformer"``.
            vae_subfolder: folder of the VAE, or None for a pixel-space DiT.
            timestep: see `DiTFeatures`.
            layer: see `DiTFeatures`.
            class_label: see `DiTFeatures`.
            ensemble_size: see `DiTFeatures`.
            seed: see `DiTFeatures`.
            input_size: see `DiTFeatures`; defaults to 256.
            grid_size: see `DiTFeatures`.
            scheduler: see `DiTFeatures`.
            **model_kwargs: passed to the models' ``from_pretrained`` (e.g. ``torch_dtype``).

        Returns:
            The extractor, its models in eval mode.

        Example:
            >>> import tempfile
            >>> from diffusers import DiTTransformer2DModel
            >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3,
            ...                             out_channels=6, num_layers=2, sample_size=16, patch_size=2,
            ...                             num_embeds_ada_norm=10)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     dit.save_pretrained(f"{folder}/transformer")
            ...     extractor = DiTFeatures.from_pretrained(folder, vae_subfolder=None, input_size=16, grid_size=8)
            >>> extractor(torch.rand(1, 3, 32, 32)).shape
            torch.Size([1, 16, 8, 8])
        """
        diffusers = require("diffusers", "DiTFeatures.from_pretrained")
        if "trust_remote_code" in model_kwargs:
            raise ValueError("Expected no `trust_remote_code` (only stock diffusers models load), but got it.")
        hub_kwargs = {key: model_kwargs[key] for key in _HUB_KWARGS if key in model_kwargs}
        config = diffusers.DiTTransformer2DModel.load_config(path_or_id, subfolder=subfolder, **hub_kwargs)
        if config.get("_class_name") not in ("DiTTransformer2DModel", "Transformer2DModel"):
            raise ValueError(
                f"Expected a DiT ('DiTTransformer2DModel') in {path_or_id!r} (subfolder {subfolder!r}), "
                f"but got {config.get('_class_name')!r}."
            )
        transformer = diffusers.DiTTransformer2DModel.from_pretrained(path_or_id, subfolder=subfolder, **model_kwargs)
        vae = None
        if vae_subfolder is not None:
            vae = diffusers.AutoencoderKL.from_pretrained(path_or_id, subfolder=vae_subfolder, **model_kwargs)
        return cls(
            transformer,
            timestep,
            layer,
            vae=vae,
            scheduler=scheduler,
            class_label=class_label,
            ensemble_size=ensemble_size,
            seed=seed,
            input_size=input_size,
            grid_size=grid_size,
        )

    def _features(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Runs the DiT up to ``transformer_blocks[layer]``; returns its tokens on their patch grid."""
        labels = torch.full_like(timesteps, self.class_label)
        block = self.transformer.transformer_blocks[self.layer]
        tokens = _run_until(self.transformer, block, lambda: self.transformer(sample, timestep=timesteps, class_labels=labels))
        rows, cols = sample.shape[-2] // self.patch_size, sample.shape[-1] // self.patch_size
        return rearrange(tokens, "b (h w) d -> b d h w", h=rows, w=cols)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """DiT tokens averaged over the noise draws, on the patch grid.

        Args:
            images: ``(B, 3, H, W)`` float images with values in [0, 1].

        Returns:
            ``(B, D, h/p, w/p)`` float32 features (``h × w`` the model input's size).
        """
        return self._ensemble(self._model_input(images, self.transformer))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, timestep={self.timestep}, layer={self.layer}, class_label={self.class_label}, "
            f"ensemble_size={self.ensemble_size}, seed={self.seed}, input_size={self.input_size}, "
            f"latent={self.vae is not None}"
        )
