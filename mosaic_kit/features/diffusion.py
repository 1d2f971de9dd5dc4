"""Diffusion features in the manner of DIFT (Tang et al., 2023), from a diffusers UNet."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checks import check_int, check_size, shape_str
from ._checks import require
from .base import FeatureExtractor

__all__ = ["DiffusionFeatures"]

# Keyword arguments of `from_pretrained` that also go to `load_config` (where to find the files).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")


class _Captured(Exception):
    """Raised by the capture hook to stop the UNet once the chosen block has run."""


def _default_scheduler(conditional: bool) -> Any:
    """The DDPM noise schedule used when none is given, built in code (no download).

    Args:
        conditional: True for a latent `UNet2DConditionModel` (Stable Diffusion's schedule:
            `scaled_linear` betas from 0.00085 to 0.012), False for a pixel-space `UNet2DModel`
            (DDPM's: `linear` betas from 1e-4 to 0.02). Both have 1000 training timesteps.

    Returns:
        A `diffusers.DDPMScheduler`.
    """
    diffusers = require("diffusers", "DiffusionFeatures")
    if conditional:
        return diffusers.DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _encode_images(
    images: torch.Tensor, size: tuple[int, int], vae: nn.Module | None
) -> torch.Tensor:
    """Images in [0, 1] → model input at ``size``: ``(B, C_latent, h, w)`` latents of ``vae``
    (the mode, shifted and scaled by its config), or pixels in [-1, 1] without one."""
    pixels = images.float()
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    pixels = pixels * 2 - 1
    if vae is None:
        return pixels
    parameter = next(vae.parameters())
    latents = vae.encode(pixels.to(device=parameter.device, dtype=parameter.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    return (latents - shift) * scale


def _run_until(model: nn.Module, block: nn.Module, call: Any) -> torch.Tensor:
    """Calls ``call()`` (a forward of ``model``) and returns the output of ``block``, stopping the
    forward right after it through a hook registered for the call and removed after."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Captured

    handle = block.register_forward_hook(hook)
    try:
        call()
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"The chosen block of {type(model).__name__} did not run during its forward.")
    return captured[0]


def _noise_ensemble(
    latents: torch.Tensor, scheduler: Any, timestep: int, ensemble_size: int, seed: int, run: Any
) -> torch.Tensor:
    """Mean of ``run(noisy, timesteps)`` over ``ensemble_size`` seeded noise draws at ``timestep``.

    Each draw has the shape of one latent and is shared by the batch, so an image's features do
    not depend on the other images of its batch."""
    batch = latents.shape[0]
    timesteps = torch.full((batch,), timestep, dtype=torch.long, device=latents.device)
    generator = torch.Generator().manual_seed(seed)
    total: torch.Tensor | None = None
    for _ in range(ensemble_size):
        noise = torch.randn((1, *latents.shape[1:]), generator=generator, dtype=torch.float32)
        noise = noise.to(device=latents.device, dtype=latents.dtype).expand_as(latents)
        features = run(scheduler.add_noise(latents, noise, timesteps), timesteps).float()
        total = features if total is None else total + features
    return total / ensemble_size


class _NoisedImageFeatures(FeatureExtractor):
    """What `DiffusionFeatures` and `DiTFeatures` share: encode the images (pixels or VAE
    latents), noise them to one timestep with several seeded draws, average a subclass's
    `_features(noisy, timesteps)` over the draws."""

    def _setup_noising(
        self,
        model_arg: str,
        model_kind: str,
        model: nn.Module,
        model_factor: int,
        vae: nn.Module | None,
        scheduler: Any,
        conditional_schedule: bool,
        timestep: int,
        ensemble_size: int,
        seed: int,
        input_size: int | tuple[int, int] | None,
    ) -> None:
        self.model_kind = model_kind
        self.vae = vae.eval() if vae is not None else None
        expected_channels = 3 if vae is None else vae.config.latent_channels
        if model.config.in_channels != expected_channels:
            source = "images (no `vae`)" if vae is None else "the VAE's latents"
            raise ValueError(
                f"Expected `{model_arg}` with in_channels={expected_channels} to denoise {source}, "
                f"but got in_channels={model.config.in_channels}."
            )
        self.downsample_factor = model_factor
        if vae is not None:
            self.downsample_factor *= 2 ** (len(vae.config.block_out_channels) - 1)
        self.scheduler = _default_scheduler(conditional_schedule) if scheduler is None else scheduler
        num_timesteps = self.scheduler.config.num_train_timesteps
        self.timestep = check_int("timestep", timestep, minimum=0)
        if self.timestep >= num_timesteps:
            raise ValueError(f"Expected `timestep` in [0, {num_timesteps}), but got {timestep}.")
        self.ensemble_size = check_int("ensemble_size", ensemble_size, minimum=1)
        self.seed = check_int("seed", seed)
        self.input_size = (
            None if input_size is None else self._check_divisible("input_size", check_size("input_size", input_size))
        )

    def _check_divisible(self, name: str, size: tuple[int, int]) -> tuple[int, int]:
        if any(side % self.downsample_factor for side in size):
            raise ValueError(
                f"Expected `{name}` divisible by the {self.model_kind}'s downsampling factor {self.downsample_factor}, "
                f"but got {size[0]} × {size[1]}."
            )
        return size

    def _model_input(self, images: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Images in [0, 1] → the model's input (latents or pixels in [-1, 1]) on its device and dtype."""
        size = self.input_size or self._check_divisible("images (no `input_size` given)", tuple(images.shape[-2:]))
        parameter = next(model.parameters())
        return _encode_images(images, size, self.vae).to(device=parameter.device, dtype=parameter.dtype)

    def _features(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _ensemble(self, latents: torch.Tensor) -> torch.Tensor:
        return _noise_ensemble(latents, self.scheduler, self.timestep, self.ensemble_size, self.seed, self._features)


class DiffusionFeatures(_NoisedImageFeatures):
    """Intermediate UNet features of a noised image, as in DIFT (Tang et al., 2023).

    Steps, for `(B, 3, H, W)` images in [0, 1]:

    1. resize to `input_size` (bilinear, antialiased; None keeps the size) and map to [-1, 1];
    2. with a `vae`, encode to latents (the mode of the latent distribution, shifted and scaled by
       the VAE config's `shift_factor` and `scaling_factor`); without one, the UNet works on pixels;
    3. for each of `ensemble_size` noise draws from a generator seeded with `seed`, noise the
       latents to `timestep` with `scheduler.add_noise` and run the UNet, capturing the output of
       `unet.up_blocks[up_block]` with a forward hook (registered for the call and removed after;
       the UNet stops right after that block, as DIFT's modified UNet does);
    4. average the captured features over the draws and resize them bilinearly to `grid_size`.

    The noise has the shape of one latent and is shared by the images of a batch, so an image's
    features do not depend on the other images of its batch, and two calls give the same features.

    A `UNet2DConditionModel` gets `encoder_hidden_states` (e.g. the text encoder's embedding of an
    empty prompt, as DIFT uses), or zeros of shape `(B, 1, cross_attention_dim)` when none is given.
    DIFT's setting for Stable Diffusion 2.1 is `timestep=261, up_block=1, ensemble_size=8` at
    `input_size=768`.

    Args:
        unet: a `diffusers.UNet2DModel` (pixel space) or `diffusers.UNet2DConditionModel`; put in eval mode.
        timestep: noise level in `[0, num_train_timesteps)`; defaults to 261.
        up_block: index of the up block whose output is the feature map; defaults to 1.
        vae: an `AutoencoderKL` whose latents the UNet denoises, or None for a pixel-space UNet.
        scheduler: an object with `add_noise(sample, noise, timesteps)` and
            `config.num_train_timesteps`, e.g. a `diffusers.DDPMScheduler`; None builds a
            `DDPMScheduler` with 1000 timesteps in code: Stable Diffusion's `scaled_linear` betas
            (0.00085 to 0.012) for a conditional UNet, DDPM's `linear` betas (1e-4 to 0.02) for a
            pixel-space one.
        encoder_hidden_states: conditioning of a `UNet2DConditionModel`, `(S, D)` or `(1 or B, S, D)`;
            None gives zeros. Refused for a UNet without cross-attention.
        ensemble_size: noise draws averaged; defaults to 8.
        seed: seed of the noise generator; defaults to 0.
        input_size: side of the UNet's image input in pixels (int or `(height, width)`), or None
            to keep the images' size; either way it must be divisible by the UNet's (and VAE's)
            total downsampling factor.
        grid_size: cells of the output grid, an int or `(gh, gw)`; defaults to 64.

    Shape:
        - Input: `(B, 3, H, W)` float in [0, 1].
        - Output: `(B, C, gh, gw)` float32 with `C` the output channels of `up_blocks[up_block]`,
          on the UNet's device.

    Raises:
        ValueError: for an out-of-range `timestep` or `up_block`, input channels that do not match
            (3 without a VAE, the VAE's latent channels with one), or a size not divisible by the
            downsampling factor.
        ImportError: if `scheduler` is None and diffusers is not installed.

    Example:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        ...                    layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
        >>> extractor = DiffusionFeatures(unet, timestep=100, up_block=0, ensemble_size=2, grid_size=(8, 4))
        >>> images = torch.rand(2, 3, 32, 32)
        >>> features = extractor(images)
        >>> features.shape
        torch.Size([2, 16, 8, 4])
        >>> torch.equal(features, extractor(images))  # seeded noise: the same features every call
        True
    """

    name = "dift"

    def __init__(
        self,
        unet: nn.Module,
        timestep: int = 261,
        up_block: int = 1,
        *,
        vae: nn.Module | None = None,
        scheduler: Any = None,
        encoder_hidden_states: torch.Tensor | None = None,
        ensemble_size: int = 8,
        seed: int = 0,
        input_size: int | tuple[int, int] | None = None,
        grid_size: int | tuple[int, int] = 64,
    ) -> None:
        super().__init__(grid_size)
        config = getattr(unet, "config", None)
        up_blocks = getattr(unet, "up_blocks", None)
        if not isinstance(unet, nn.Module) or config is None or not isinstance(up_blocks, nn.ModuleList):
            raise ValueError(
                "Expected `unet` to be a diffusers UNet2DModel or UNet2DConditionModel (a module with `config` "
                f"and `up_blocks`), but got {type(unet).__name__}."
            )
        self.unet = unet.eval()
        self.cross_attention_dim = getattr(config, "cross_attention_dim", None)
        self.conditional = self.cross_attention_dim is not None
        self._setup_noising(
            "unet", "UNet", unet, 2 ** (len(unet.down_blocks) - 1), vae, scheduler, self.conditional,
            timestep, ensemble_size, seed, input_size,
        )
        self.up_block = check_int("up_block", up_block, minimum=0)
        if self.up_block >= len(up_blocks):
            raise ValueError(
                f"Expected `up_block` in [0, {len(up_blocks)}) (the UNet has {len(up_blocks)} up blocks), "
                f"but got {up_block}."
            )

        if encoder_hidden_states is not None:
            if not self.conditional:
                raise ValueError(
                    "Expected no `encoder_hidden_states` for a UNet without cross-attention, but got a tensor."
                )
            if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.ndim not in (2, 3):
                got = shape_str(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, torch.Tensor) else type(encoder_hidden_states).__name__
                raise ValueError(f"Expected `encoder_hidden_states` of shape (S, D) or (B, S, D), but got {got}.")
            if encoder_hidden_states.ndim == 2:
                encoder_hidden_states = encoder_hidden_states[None]
            if encoder_hidden_states.shape[-1] != self.cross_attention_dim:
                raise ValueError(
                    f"Expected `encoder_hidden_states` with D = cross_attention_dim = {self.cross_attention_dim}, "
                    f"but got {shape_str(encoder_hidden_states.shape)}."
                )
        self.register_buffer("encoder_hidden_states", encoder_hidden_states, persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        subfolder: str | None = "unet",
        *,
        vae_subfolder: str | None = "vae",
        timestep: int = 261,
        up_block: int = 1,
        ensemble_size: int = 8,
        seed: int = 0,
        input_size: int | tuple[int, int] | None = 768,
        grid_size: int | tuple[int, int] = 64,
        encoder_hidden_states: torch.Tensor | None = None,
        scheduler: Any = None,
        **model_kwargs: Any,
    ) -> DiffusionFeatures:
        """Loads a diffusers UNet (and its VAE) from a local folder or a hub id.

        The class is read from the UNet's config: a `UNet2DConditionModel` is loaded with the
        `AutoencoderKL` in `vae_subfolder` (e.g. `"stabilityai/stable-diffusion-2-1"`, DIFT's
        model), a `UNet2DModel` works on pixels without a VAE (e.g. `"google/ddpm-celebahq-256"`
        with `subfolder=None, input_size=256`). The noise schedule is built in code (see
        `DiffusionFeatures`) unless `scheduler` is given.

        Args:
            path_or_id: local folder or hub id of a diffusers model or pipeline.
            subfolder: folder of the UNet inside it; defaults to `"unet"` (None for the root).
            vae_subfolder: folder of the VAE for a conditional UNet, or None to load no VAE.
            timestep: see `DiffusionFeatures`.
            up_block: see `DiffusionFeatures`.
            ensemble_size: see `DiffusionFeatures`.
            seed: see `DiffusionFeatures`.
            input_size: see `DiffusionFeatures`; defaults to 768, DIFT's size for Stable Diffusion 2.1.
            grid_size: see `DiffusionFeatures`.
            encoder_hidden_states: see `DiffusionFeatures`.
            scheduler: see `DiffusionFeatures`.
            **model_kwargs: passed to the models' `from_pretrained` (e.g. `torch_dtype`, `revision`,
                `local_files_only`).

        Returns:
            The extractor, its models in eval mode.

        Raises:
            ImportError: if diffusers is not installed (`pip install mosaic_kit[flux]`).
            ValueError: if the UNet's class is not `UNet2DModel` or `UNet2DConditionModel`.

        Example:
            >>> import tempfile
            >>> from diffusers import UNet2DModel
            >>> unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16),
            ...                    layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
            ...                    up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     unet.save_pretrained(f"{folder}/unet")
            ...     extractor = DiffusionFeatures.from_pretrained(folder, input_size=32, ensemble_size=1, grid_size=4)
            >>> extractor(torch.rand(1, 3, 48, 48)).shape
            torch.Size([1, 8, 4, 4])
        """
        diffusers = require("diffusers", "DiffusionFeatures.from_pretrained")
        if "trust_remote_code" in model_kwargs:
            raise ValueError("Expected no `trust_remote_code` (only stock diffusers models load), but got it.")
        hub_kwargs = {key: model_kwargs[key] for key in _HUB_KWARGS if key in model_kwargs}
        config = diffusers.UNet2DConditionModel.load_config(path_or_id, subfolder=subfolder, **hub_kwargs)
        class_name = config.get("_class_name")
        if class_name not in ("UNet2DModel", "UNet2DConditionModel"):
            raise ValueError(
                f"Expected a UNet of class 'UNet2DModel' or 'UNet2DConditionModel' in {path_or_id!r} "
                f"(subfolder {subfolder!r}), but got {class_name!r}."
            )
        unet = getattr(diffusers, class_name).from_pretrained(path_or_id, subfolder=subfolder, **model_kwargs)
        vae = None
        if class_name == "UNet2DConditionModel" and vae_subfolder is not None:
            vae = diffusers.AutoencoderKL.from_pretrained(path_or_id, subfolder=vae_subfolder, **model_kwargs)
        return cls(
            unet,
            timestep,
            up_block,
            vae=vae,
            scheduler=scheduler,
            encoder_hidden_states=encoder_hidden_states,
            ensemble_size=ensemble_size,
            seed=seed,
            input_size=input_size,
            grid_size=grid_size,
        )

    def _conditioning(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if not self.conditional:
            return {}
        states = self.encoder_hidden_states
        if states is None:
            states = torch.zeros(1, 1, self.cross_attention_dim)
        if states.shape[0] not in (1, batch):
            raise ValueError(
                f"Expected `encoder_hidden_states` with batch 1 or {batch} (the images'), "
                f"but got {shape_str(states.shape)}."
            )
        return {"encoder_hidden_states": states.to(device=device, dtype=dtype).expand(batch, -1, -1)}

    def _features(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Runs the UNet up to `up_blocks[up_block]` and returns that block's output."""
        conditioning = self._conditioning(noisy.shape[0], noisy.device, noisy.dtype)
        block = self.unet.up_blocks[self.up_block]
        return _run_until(self.unet, block, lambda: self.unet(noisy, timesteps, **conditioning))

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """UNet features averaged over the noise draws, at the up block's resolution.

        Args:
            images: `(B, 3, H, W)` float images with values in [0, 1].

        Returns:
            `(B, C, h, w)` float32 features, `h × w` the resolution of `up_blocks[up_block]`'s output.

        Example:
            >>> from diffusers import UNet2DModel
            >>> unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16),
            ...                    layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
            ...                    up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
            >>> DiffusionFeatures(unet, up_block=0, ensemble_size=1).extract(torch.rand(1, 3, 32, 32)).shape
            torch.Size([1, 16, 32, 32])
        """
        return self._ensemble(self._model_input(images, self.unet))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, timestep={self.timestep}, up_block={self.up_block}, "
            f"ensemble_size={self.ensemble_size}, seed={self.seed}, input_size={self.input_size}, "
            f"latent={self.vae is not None}"
        )
