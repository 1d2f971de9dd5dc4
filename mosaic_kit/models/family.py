"""The model boundary: what a model family implements so the trainer, the inference pipeline and
the evaluation can use it without reaching past it.

A *model family* (FLUX.1 with multi-branch references, FLUX.2 with in-sequence references, ...)
owns everything model-specific between a batch of images and prompts and the loss:

- **encoding** (`ModelFamily.encode_batch`): images, prompts and references → `ModelInputs`,
  the model's conditioning plus the clean packed target latents (VAE scale and shift, packing,
  position ids, dtype casting all live here, once);
- **the token layout** (`ModelFamily.token_layout`, `TokenLayout`): the target's token grid and
  each reference's grid and token range, for correspondences and the attention capture;
- **noising** (`ModelFamily.sample_sigmas` with the family's `ModelFamily.shift_mu`,
  `ModelFamily.noise`): the flow-matching noise levels and the noisy latents; the loss stays on
  the objective side;
- **the forward** (`ModelFamily.forward`): noisy target + timestep → prediction, feeding an
  optional capture (`mosaic_kit.attention.RefTargetCapture`) with reference queries and target keys;
- **trainable parameters** (`ModelFamily.set_trainable`, `ModelFamily.trainable_parameters`,
  ``trainable in TRAINABLE``: the LoRA only or every weight) and the LoRA file
  (`ModelFamily.add_lora`, `ModelFamily.save_lora`, `ModelFamily.load_lora`);
- **decoding** (`ModelFamily.decode`): packed latents → images in ``[0, 1]``.

Code above the boundary (training, pipelines, eval) calls only these methods and the module in
`ModelFamily.model` (what an accelerator wraps); `ModelFamily.model_kwargs` gives the keyword
arguments for calling that module directly (e.g. through a DDP wrapper).

Example (the FLUX.1 family on a tiny random pipeline):

    >>> import torch
    >>> from mosaic_kit.models import MosaicFluxFamily
    >>> from mosaic_kit.pipelines import tiny_mosaic_pipeline
    >>> from mosaic_kit.data import SyntheticWorld, SyntheticWorldConfig, collate_samples
    >>> family = MosaicFluxFamily(tiny_mosaic_pipeline(), max_sequence_length=16)
    >>> world = SyntheticWorld(SyntheticWorldConfig(image_size=32, ref_size=32, min_refs=2, max_refs=2))
    >>> batch = collate_samples([world.sample(0)], 32, 32, vae_scale_factor=family.vae_scale_factor)
    >>> inputs = family.encode_batch(batch)
    >>> inputs.target.shape, inputs.layout.reference_token_counts
    (torch.Size([1, 4, 16]), (4, 4))
    >>> g = torch.Generator().manual_seed(0)
    >>> sigmas = family.sample_sigmas(1, g, inputs.layout)
    >>> noise = torch.randn(inputs.target.shape, generator=g)
    >>> prediction = family.forward(inputs, family.noise(inputs.target, noise, sigmas), sigmas, guidance=3.5)
    >>> prediction.shape == inputs.target.shape
    True
    >>> family.decode(inputs.target, 32, 32).shape  # (B, 3, H, W) in [0, 1]
    torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..correspondence.grid import TokenGrid

TRAINABLE = ("lora", "all")
"""Allowed values of ``trainable``: the reference LoRA only, or every weight of the denoiser (the
LoRA too, when there is one)."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the target's and each reference's tokens are, for correspondences and the capture.

    Attributes:
        target_grid: the target's packed token grid (``N_tgt = target_grid.num_tokens``).
        reference_grids: one grid per reference, in slot order.

    Properties give each reference's token count and its range inside the concatenated
    reference tokens (the order a `mosaic_kit.attention.RefTargetCapture` sees them).

    Example:
        >>> layout = TokenLayout(TokenGrid(32, 48), (TokenGrid(32, 32), TokenGrid(16, 32)))
        >>> layout.reference_token_counts, layout.reference_ranges
        ((4, 2), (range(0, 4), range(4, 6)))
        >>> layout.num_reference_tokens, layout.target_grid.num_tokens
        (6, 6)
    """

    target_grid: TokenGrid
    reference_grids: tuple[TokenGrid, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.target_grid, TokenGrid):
            raise ValueError(f"Expected `target_grid` to be a TokenGrid, but got {type(self.target_grid).__name__}.")
        grids = tuple(self.reference_grids)
        bad = [k for k, g in enumerate(grids) if not isinstance(g, TokenGrid)]
        if bad:
            raise ValueError(
                f"Expected `reference_grids` to hold TokenGrids, but item {bad[0]} is "
                f"{type(grids[bad[0]]).__name__}."
            )
        object.__setattr__(self, "reference_grids", grids)

    @property
    def reference_token_counts(self) -> tuple[int, ...]:
        """Tokens of each reference (``N^(k)``)."""
        return tuple(g.num_tokens for g in self.reference_grids)

    @property
    def num_reference_tokens(self) -> int:
        """``N_ref = Σ N^(k)``."""
        return sum(self.reference_token_counts)

    @property
    def reference_ranges(self) -> tuple[range, ...]:
        """Each reference's token indices inside the concatenated reference tokens."""
        ranges, start = [], 0
        for count in self.reference_token_counts:
            ranges.append(range(start, start + count))
            start += count
        return tuple(ranges)


@dataclass
class ModelInputs:
    """What `ModelFamily.encode_batch` returns: the encoded batch, ready for the forward.

    Attributes:
        conditioning: the family's keyword arguments of the forward other than the noisy target,
            the timestep, the guidance and the capture (text embeddings, position ids, reference
            tokens, ...), already in the model's dtype and on its device. Opaque to the callers.
        layout: the token layout of target and references.
        target: ``(B, N_tgt, C)`` the clean packed target latents in float32 (the flow-matching
            target), or None when encoding for inference (no target image).
        extras: anything else a family wants to carry (not read by the callers).

    Example:
        >>> inputs = ModelInputs({"text_ids": torch.zeros(4, 3)}, TokenLayout(TokenGrid(32, 32)))
        >>> inputs.target is None, inputs.layout.target_grid.num_tokens
        (True, 4)
    """

    conditioning: dict[str, Any]
    layout: TokenLayout
    target: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class ModelFamily(abc.ABC):
    """The model boundary: one model family (a denoiser with its encoders, VAE and LoRA).

    Implementations: `mosaic_kit.models.MosaicFluxFamily` (FLUX.1, multi-branch references, as
    released) and ``Flux2Family`` (FLUX.2, references in the target's sequence). A new family
    subclasses this and implements the abstract methods; the trainer, the pipelines and the
    evaluation then work unchanged. See the module docstring for an example.

    Attributes:
        name: a short name of the family (``"flux1"``, ...).
    """

    name: ClassVar[str] = ""

    pipe: Any = None
    """The diffusers pipeline whose encoders, VAE and scheduler a family built on one uses (None
    otherwise; such a family overrides `vae_scale_factor` and `device`)."""

    # -- what the callers hold ---------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def model(self) -> nn.Module:
        """The module whose forward is the denoiser (what an accelerator wraps). Called with
        ``model(**model_kwargs(...), capture=...)``."""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for FLUX's VAE): the pipeline's ``vae_scale_factor``."""
        if self.pipe is None:
            raise NotImplementedError(f"{type(self).__name__} holds no pipeline: override `vae_scale_factor`.")
        return int(self.pipe.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the pipeline's execution device (offloading included)."""
        if self.pipe is None:
            raise NotImplementedError(f"{type(self).__name__} holds no pipeline: override `device`.")
        return self.pipe._execution_device

    @property
    @abc.abstractmethod
    def token_channels(self) -> int:
        """``C``: channels of a packed latent token (what `encode_batch`'s target and the noise have)."""

    @property
    def patch_size(self) -> int:
        """Latent cells per token side (2 for FLUX's 2×2 packing)."""
        return 2

    @property
    def pixels_per_token(self) -> int:
        """Pixels per token side: image sizes must be multiples of it."""
        return self.vae_scale_factor * self.patch_size

    # -- encoding ----------------------------------------------------------------------------------
    def token_layout(
        self, target_size: tuple[int, int], reference_sizes: Sequence[tuple[int, int]]
    ) -> TokenLayout:
        """The token layout for a target and references of the given ``(height, width)`` pixel
        sizes: one `TokenGrid` each (`vae_scale_factor`, `patch_size`); references in slot order.

        Raises:
            ValueError: a size is not a pair of positive multiples of `pixels_per_token`.
        """
        def grid(name: str, size: Any) -> TokenGrid:
            unit = self.pixels_per_token
            ok = isinstance(size, (tuple, list)) and len(size) == 2
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % unit == 0 for v in size)
            if not ok:
                raise ValueError(
                    f"Expected `{name}` to be (height, width) in pixels, positive multiples of {unit}, but got {size!r}."
                )
            return TokenGrid(size[0], size[1], self.vae_scale_factor, self.patch_size)

        return TokenLayout(
            grid("target_size", target_size),
            tuple(grid(f"reference_sizes[{k}]", size) for k, size in enumerate(reference_sizes)),
        )

    @abc.abstractmethod
    def encode_batch(self, batch: Any) -> ModelInputs:
        """Encodes a training or evaluation batch (frozen encoders, no gradients).

        Args:
            batch: anything with ``targets`` ``(B, 3, H, W)`` and ``references`` ``(B, K, 3, h, w)``
                float images in ``[0, 1]`` and ``captions`` (B strings), e.g. a
                `mosaic_kit.data.MosaicBatch`.

        Returns:
            `ModelInputs` with the clean packed target latents.
        """

    # -- noising -----------------------------------------------------------------------------------
    def shift_mu(self, layout: TokenLayout) -> float | None:
        """The resolution shift ``μ`` of the training noise levels for ``layout``'s target (None:
        no shift, the default)."""
        return None

    def sample_sigmas(
        self, batch: int, generator: torch.Generator, layout: TokenLayout | None,
        logit_mean: float = 0.0, logit_std: float = 1.0,
    ) -> torch.Tensor:
        """Training noise levels: `logit_normal_sigmas` with the family's `shift_mu` for
        ``layout``'s target (``layout=None``: no shift).

        Args:
            batch: how many.
            generator: a CPU generator (advanced by ``batch`` normal draws).
            layout: the token layout (its target size sets the shift), or None.
            logit_mean: logit-normal mean.
            logit_std: logit-normal std.

        Returns:
            ``(batch,)`` float32 sigmas in ``(0, 1)``.
        """
        mu = None if layout is None else self.shift_mu(layout)
        return logit_normal_sigmas(batch, generator, mu, logit_mean, logit_std)

    @staticmethod
    def noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Flow-matching noisy latents ``x_σ = (1 - σ)·x + σ·ε``.

        Args:
            latents: ``(B, N, C)`` clean packed latents ``x``.
            noise: ``(B, N, C)`` Gaussian noise ``ε``.
            sigmas: ``(B,)`` noise levels ``σ``.

        Returns:
            ``(B, N, C)`` the noisy latents (the velocity target is ``ε - x``).

        Example:
            >>> x, e = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
            >>> ModelFamily.noise(x, e, torch.tensor([0.25]))[0, 0].tolist()
            [0.25, 0.25, 0.25, 0.25]
        """
        if latents.shape != noise.shape or sigmas.shape != latents.shape[:1]:
            raise ValueError(
                f"Expected `latents` and `noise` of one shape (B, N, C) and `sigmas` of shape (B,), but got "
                f"{tuple(latents.shape)}, {tuple(noise.shape)} and {tuple(sigmas.shape)}."
            )
        sigmas = sigmas.reshape(-1, *([1] * (latents.ndim - 1)))
        return (1 - sigmas) * latents + sigmas * noise

    # -- the forward -------------------------------------------------------------------------------
    @abc.abstractmethod
    def model_kwargs(
        self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
        guidance: float | torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of ``model(...)`` (without ``capture``) for noisy latents at
        ``timestep`` (``(B,)`` flow-matching time in ``[0, 1]``), cast to the model's dtype."""

    def forward(
        self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
        capture: Any = None, guidance: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction for the target tokens.

        Args:
            inputs: from `encode_batch`.
            noisy: ``(B, N_tgt, C)`` noisy packed target latents.
            timestep: ``(B,)`` flow-matching time in ``[0, 1]``.
            capture: a `mosaic_kit.attention.RefTargetCapture` (or a list of them) fed with the
                reference queries and target keys, or None.
            guidance: the guidance scale of guidance-distilled models (ignored by families whose
                model has no guidance embedding).

        Returns:
            ``(B, N_tgt, C)`` the prediction (velocity).
        """
        return self.model(**self.model_kwargs(inputs, noisy, timestep, guidance), capture=capture)

    # -- trainable parameters and the LoRA -----------------------------------------------------------
    @abc.abstractmethod
    def add_lora(self, rank: int, alpha: float | None = None) -> None:
        """Adds a fresh reference LoRA (base weights frozen)."""

    @abc.abstractmethod
    def trainable_parameters(self, trainable: str = "lora") -> list[nn.Parameter]:
        """The parameters that train for ``trainable`` (one of `TRAINABLE`), in a fixed order."""

    def set_trainable(self, trainable: str = "lora") -> list[nn.Parameter]:
        """Marks exactly `trainable_parameters(trainable)` as requiring gradients.

        Returns:
            Those parameters.
        """
        chosen = self.trainable_parameters(trainable)
        ids = {id(p) for p in chosen}
        for param in self.model.parameters():
            param.requires_grad_(id(param) in ids)
        return chosen

    @abc.abstractmethod
    def save_lora(self, path: str | os.PathLike) -> Path:
        """Writes the reference LoRA file (atomically); returns the path."""

    @abc.abstractmethod
    def load_lora(self, path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor], partial: bool = False) -> None:
        """Loads a reference LoRA file (or state dict), checked, replacing the current one."""

    # -- decoding ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents ``(B, N_tgt, C)`` of a ``height × width`` image → ``(B, 3, H, W)``
        float32 images in ``[0, 1]``."""


def logit_normal_sigmas(
    batch: int, generator: torch.Generator, mu: float | None = None, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """Flow-matching noise levels: ``u = sigmoid(N(mean, std))`` drawn with diffusers'
    ``compute_density_for_timestep_sampling("logit_normal", ...)``, then the exponential time
    shift ``σ = e^μ / (e^μ + 1/u - 1)`` (FLUX's resolution shift; ``mu=None``: no shift).

    Args:
        batch: how many.
        generator: a CPU generator (advanced by ``batch`` normal draws).
        mu: the shift (diffusers' ``calculate_shift`` for FLUX.1), or None.
        mean: logit-normal mean.
        std: logit-normal std.

    Returns:
        ``(batch,)`` float32 sigmas in ``(0, 1)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = logit_normal_sigmas(1000, g, mu=0.7)
        >>> bool(((s > 0) & (s < 1)).all()), s.mean().item() > 0.5  # shifted towards noise
        (True, True)
    """
    import math

    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=mean, logit_std=std,
                                              generator=generator)
    if mu is None:
        return u
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def check_trainable(trainable: Any) -> str:
    """Checks a ``trainable`` setting against `TRAINABLE`.

    Example:
        >>> check_trainable("all")
        'all'
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"Expected `trainable` to be one of {TRAINABLE}, but got {trainable!r}.")
    return trainable
