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
import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..correspondence.grid import TokenGrid
from ..utils.checks import check_images
from .encoded import ModelInputs, TokenLayout  # re-exported: importable from here as before
from .lora_files import LoraFiles
from .noise import logit_normal_sigmas, resolution_shift_mu  # re-exported, likewise

TRAINABLE = ("lora", "all")
PREDICTIONS = ("velocity", "sample")
MIN_SAMPLE_SIGMA = 0.05  # sample prediction: the velocity divides by max(σ, this)
"""Allowed values of ``trainable``: the reference LoRA only, or every weight of the denoiser (the
LoRA too, when there is one)."""


class ModelFamily(LoraFiles):
    """The model boundary: one model family (a denoiser with its encoders, VAE and LoRA).

    Implementations: `mosaic_kit.models.MosaicFluxFamily` (FLUX.1, multi-branch references, as
    released) and `mosaic_kit.models.Flux2Family` (FLUX.2, references in the target's
    sequence); the registry (`mosaic_kit.pipelines.registry`) names them. A new family
    subclasses this, implements the abstract methods (the model-specific steps: ``_encode_batch``,
    ``_model_kwargs``, ``_decode``, the LoRA, ``sample``, the builders ``tiny`` and
    ``from_pretrained``) and registers itself; the trainer, the pipelines and the evaluation then
    work unchanged. See the module docstring for an example.

    The contract every family shares is checked here, once, before the model-specific step runs
    (`encode_batch`, `model_kwargs` and so `forward`, `decode`): images ``(B, 3, H, W)`` float in
    ``[0, 1]`` with sizes multiples of `pixels_per_token`, references ``(B, K, 3, h, w)`` with at
    most `max_references`, B captions, noisy latents ``(B, N_tgt, C)`` of the encoded batch, a
    ``(B,)`` floating timestep in ``[0, 1]``, a guidance number or ``(B,)`` tensor. Bad input
    raises ``ValueError`` naming the argument, what was expected and what arrived.

    Attributes:
        name: the family's registry name (``"flux1"``, ...).
        config_extras: the `mosaic_kit.training.ModelConfig` fields the family's builders take
            as options beyond the common ones (base, seed, tiny overrides, pixel space).
        default_guidance_scale: the guidance `sample` uses when none is given.
        max_references: the most references a sample may have (None: no limit).
        min_sample_reference_side: the smallest reference side in pixels that `sample` (the
            family's pipeline) accepts; training refuses smaller references at config time when
            it draws validation samples.
        min_sample_reference_reason: why, for that error (empty when there is no minimum).
        comfyui_lora_keys: the family's ComfyUI key map (`mosaic_kit.models.comfyui.ComfyLoraKey`
            entries, declared next to the family), what ``save_lora(..., format="comfyui")``
            writes through `write_comfyui_lora`; None: the family writes no ComfyUI file.
        family_options: constructor options that configs (``model.family_options``) and recipes
            (``--family-option``) may set, name → allowed values (None: any the constructor
            accepts); held as attributes of that name, recorded in the LoRA file
            (`mosaic_kit.models.options`).
    """

    name: ClassVar[str] = ""
    config_extras: ClassVar[tuple[str, ...]] = ()
    default_guidance_scale: ClassVar[float] = 3.5
    max_references: ClassVar[int | None] = None
    min_sample_reference_side: ClassVar[int] = 1
    min_sample_reference_reason: ClassVar[str] = ""
    comfyui_lora_keys: ClassVar[tuple | None] = None
    encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "vae")
    """The pipeline components that only encode or decode (text encoders, tokenizers, VAE): what
    a family built with ``encoders=False`` (cached conditioning) leaves out."""
    prompt_uses_references: ClassVar[bool] = False
    """Whether `encode_prompt_items` reads the references (a vision-language prompt)."""
    group_offload_types: ClassVar[tuple[str, ...]] = ("block_level", "leaf_level")
    """diffusers' group-offloading types the family's forward works with (`mosaic_kit.models.encoders`)."""
    group_offload_reason: ClassVar[str] = ""
    """Why a group-offloading type is missing from `group_offload_types` (for the error)."""
    family_options: ClassVar[dict[str, tuple | None]] = {}
    #: True when `sample` draws through `forward` (so it follows `prediction`); the stock pipelines
    #: of the in-sequence families call the transformer themselves and expect a velocity.
    samples_through_forward: ClassVar[bool] = False
    #: what the model outputs (one of `PREDICTIONS`): the velocity (every pretrained model), or the
    #: clean target (x-prediction; tiny models only, `set_prediction`).
    prediction: str = "velocity"

    pipe: Any = None
    """The diffusers pipeline whose encoders, VAE and scheduler a family built on one uses (None
    otherwise; such a family overrides `vae_scale_factor` and `device`)."""

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def tiny(cls, seed: int = 0, transformer_overrides: dict | None = None, pixel_space: int | None = None,
             **options: Any) -> ModelFamily:
        """The family over tiny random components built in code (tests, CPU runs; no downloads).

        Args:
            seed: seed of the random weights.
            transformer_overrides: transformer config entries to change.
            pixel_space: pixel space with this factor instead of a random autoencoder, or None.
            **options: the family's constructor options (e.g. its `config_extras`).
        """

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, base: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        **options: Any) -> ModelFamily:
        """The family over a pretrained pipeline (a hub id or a local folder)."""

    # -- a bare denoiser: real-size measurement without a pipeline (benchmarks/bench_memory.py) --------
    @classmethod
    def bare_transformer_class(cls) -> type:
        """The diffusers class of the family's transformer, built from a config dict without a
        pipeline (e.g. on the meta device, to measure memory at real size).

        Raises:
            NotImplementedError: the family offers no bare denoiser (this and the next two methods).
        """
        raise NotImplementedError(f"{cls.__name__} offers no bare denoiser.")

    @classmethod
    def bare_denoiser(cls, transformer: nn.Module, rank: int) -> nn.Module:
        """The training denoiser (what `model` is, capturing from the family's default blocks)
        around a bare transformer, with a fresh LoRA of ``rank`` (alpha = rank) on the default
        targets; the base weights are left as they are (freeze and cast them as the trainer does)."""
        raise NotImplementedError(f"{cls.__name__} offers no bare denoiser.")

    @classmethod
    def bare_model_kwargs(cls, transformer: nn.Module, target_size: int, reference_sizes: Sequence[int],
                          text_tokens: int, randn: Any) -> dict[str, Any]:
        """The keyword arguments of ``bare_denoiser(...)(**kwargs, capture=...)`` for one sample
        of a square ``target_size`` px target, square references of ``reference_sizes`` px and
        ``text_tokens`` text tokens, laid out as the family's encoding lays them out (what cached
        conditioning holds). Every activation-sized input comes from ``randn(*shape, dtype=...)``;
        position ids and layouts are built on the CPU."""
        raise NotImplementedError(f"{cls.__name__} offers no bare denoiser.")

    def family_option_values(self) -> dict[str, Any]:
        """The values of the family's `family_options` (what its LoRA files record)."""
        return {name: getattr(self, name) for name in self.family_options}

    # -- what the callers hold ---------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def model(self) -> nn.Module:
        """The module whose forward is the denoiser (what an accelerator wraps). Called with
        ``model(**model_kwargs(...), capture=...)``."""

    @property
    @abc.abstractmethod
    def transformer(self) -> nn.Module:
        """The stock diffusers transformer holding the trained weights (and the LoRA)."""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for FLUX's VAE): the pipeline's ``vae_scale_factor``."""
        if self.pipe is None:
            raise NotImplementedError(f"{type(self).__name__} holds no pipeline: override `vae_scale_factor`.")
        return int(self.pipe.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the pipeline's execution device (offloading included)."""
        if getattr(self, "_offload_device", None) is not None:  # encoders offloaded (`mosaic_kit.models.encoders`)
            return self._offload_device
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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelFamily:
        """Moves the pipeline's modules (and casts them to ``dtype`` when given); returns self.

        A quantized module (`mosaic_kit.models.quantize`) keeps the dtypes it was loaded with
        (diffusers refuses to cast it) and is only moved; bitsandbytes places its modules itself
        when they load and is left where it is."""
        from .quantize import is_quantized

        if self.pipe is None:
            raise NotImplementedError(f"{type(self).__name__} holds no pipeline: override `to`.")
        components = getattr(self.pipe, "components", {})
        quantized = [m for m in components.values() if isinstance(m, nn.Module) and is_quantized(m)]
        if not quantized:
            if dtype is None:
                self.pipe.to(device)
            else:
                self.pipe.to(device, dtype)
            return self
        for module in components.values():
            if not isinstance(module, nn.Module):
                continue
            if module in quantized:
                if getattr(module, "quantization_method", None) != "bitsandbytes":
                    module.to(device)
            elif dtype is None:
                module.to(device)
            else:
                module.to(device, dtype)
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """The modules that never train (encoders, VAE): the pipeline's modules other than the
        transformer. `set_trainable` freezes them and puts them in eval mode."""
        if self.pipe is None:
            return []
        components = getattr(self.pipe, "components", {})
        return [m for m in components.values() if isinstance(m, nn.Module) and m is not self.transformer]

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

    def check_encode_inputs(self, targets: Any, prompts: Any, references: Any = None, names: tuple[str, str, str] = (
            "targets", "prompts", "references")) -> None:
        """The contract of what gets encoded (every family's `encode_batch` runs it first).

        Args:
            targets: ``(B, 3, H, W)`` float in ``[0, 1]``, H and W multiples of `pixels_per_token`
                (None when encoding for inference: B is then the number of prompts).
            prompts: B strings.
            references: ``(B, K, 3, h, w)`` float in ``[0, 1]`` (h and w multiples of
                `pixels_per_token`, K at most `max_references`), or None.
            names: the three arguments' names in the messages.

        Raises:
            ValueError: naming the argument, what was expected and what arrived.
        """
        target_name, prompt_name, reference_name = names
        unit = self.pixels_per_token
        if targets is None:  # inference: the batch is the prompts'
            if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
                raise ValueError(f"Expected `{prompt_name}` to be a non-empty list of strings, but got {prompts!r}.")
            b = len(prompts)
        else:
            check_images(targets, target_name)
            b = targets.shape[0]
            if targets.shape[-2] % unit or targets.shape[-1] % unit:
                raise ValueError(f"Expected `{target_name}` with H and W multiples of {unit}, but got "
                                 f"{tuple(targets.shape[-2:])}.")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) != b \
                or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"Expected `{prompt_name}` to be {b} strings (one per target), but got {prompts!r}.")
        if references is None:
            return
        if not isinstance(references, torch.Tensor) or references.ndim != 5 or references.shape[0] != b \
                or references.shape[2] != 3:
            got = tuple(references.shape) if isinstance(references, torch.Tensor) else type(references).__name__
            raise ValueError(f"Expected `{reference_name}` of shape ({b}, K, 3, h, w), but got {got}.")
        k = references.shape[1]
        if self.max_references is not None and k > self.max_references:
            raise ValueError(f"Expected at most {self.max_references} references per sample in `{reference_name}`, "
                             f"but got {k}.")
        if k:
            check_images(references.flatten(0, 1), reference_name)
            if references.shape[-2] % unit or references.shape[-1] % unit:
                raise ValueError(f"Expected `{reference_name}` with h and w multiples of {unit}, but got "
                                 f"{tuple(references.shape[-2:])}.")

    def encode_batch(self, batch: Any) -> ModelInputs:
        """Encodes a training or evaluation batch (frozen encoders, no gradients), after checking
        it against the contract (`check_encode_inputs`).

        Args:
            batch: anything with ``targets`` ``(B, 3, H, W)`` and ``references`` ``(B, K, 3, h, w)``
                float images in ``[0, 1]`` and ``captions`` (B strings), e.g. a
                `mosaic_kit.data.MosaicBatch`.

        Returns:
            `ModelInputs` with the clean packed target latents.

        Raises:
            ValueError: ``batch`` lacks one of the three, or one breaks the contract.
        """
        missing = [name for name in ("targets", "references", "captions") if not hasattr(batch, name)]
        if missing:
            raise ValueError(f"Expected `batch` with `targets`, `references` and `captions` (a MosaicBatch), but "
                             f"got {type(batch).__name__} without {missing}.")
        self.check_encode_inputs(batch.targets, batch.captions, batch.references,
                          ("batch.targets", "batch.captions", "batch.references"))
        from .encoders import encoders_in_use

        with encoders_in_use(self):  # offloaded encoders on the device meanwhile
            return self._encode_batch(batch)

    @abc.abstractmethod
    def _encode_batch(self, batch: Any) -> ModelInputs:
        """The model-specific encoding of a checked batch (see `encode_batch`)."""

    # -- the frozen encoders' outputs (what a conditioning cache stores) ------------------------------
    @property
    def has_encoders(self) -> bool:
        """False when the family was built without its `encoder_components` (cached conditioning)."""
        return self.pipe is None or all(getattr(self.pipe, name, None) is not None for name in self.encoder_components)

    def encode_prompt_items(self, prompts: Sequence[str], references: torch.Tensor | None = None
                            ) -> list[dict[str, torch.Tensor]]:
        """The text encoders' outputs, one dict of tensors (no batch dimension) per prompt: what
        `encoded_inputs` takes and `mosaic_kit.training.cache` stores.

        Args:
            prompts: B prompts.
            references: ``(B, K, 3, h, w)`` in ``[0, 1]`` or None (read only when
                `prompt_uses_references`).
        """
        raise NotImplementedError(f"{type(self).__name__} does not split its encoding (`encode_prompt_items`).")

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE's packed tokens of images, one autoencoder call per image (so an image encodes
        the same alone or in any batch): ``(N, 3, H, W)`` in ``[0, 1]`` → ``(N, H·W / p², C)`` in
        the VAE's dtype (``p`` = `pixels_per_token`)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its encoding (`encode_image_tokens`).")

    def encoded_inputs(self, prompt_items: Sequence[dict[str, torch.Tensor]], target_tokens: torch.Tensor | None,
                       reference_tokens: torch.Tensor | None, layout: TokenLayout) -> ModelInputs:
        """`ModelInputs` from the frozen encoders' outputs, running no encoder: what `encode_batch`
        returns for them (``encode_batch(batch)`` is this of `encode_prompt_items` and
        `encode_image_tokens` of the batch).

        Args:
            prompt_items: B dicts from `encode_prompt_items`.
            target_tokens: ``(B, N_tgt, C)`` from `encode_image_tokens`, or None (inference).
            reference_tokens: ``(B, K, N_ref_k, C)`` from `encode_image_tokens` (slot order), or None.
            layout: the token layout of target and references.
        """
        raise NotImplementedError(f"{type(self).__name__} does not split its encoding (`encoded_inputs`).")

    # -- noising -----------------------------------------------------------------------------------
    def shift_mu(self, layout: TokenLayout) -> float | None:
        """The resolution shift ``μ`` of the training noise levels for ``layout``'s target:
        `resolution_shift_mu` with the pipeline's scheduler settings (None without a pipeline).

        Example:
            >>> from mosaic_kit.models import Flux2Family
            >>> family = Flux2Family.tiny()
            >>> round(family.shift_mu(family.token_layout((256, 256), [])), 3)  # 256 tokens
            0.5
        """
        if self.pipe is None:
            return None
        scheduler = getattr(self.pipe, "scheduler", None)
        return resolution_shift_mu(layout.target_grid.num_tokens, getattr(scheduler, "config", None))

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
    def set_prediction(self, prediction: str) -> ModelFamily:
        """Sets what the model outputs: ``"velocity"`` or ``"sample"`` (x-prediction: the clean
        target ``x̂``, as in Li & He, "Back to Basics: Let Denoising Generative Models Denoise",
        2025). A tiny pixel-space model with 48 values per token learns to draw much sooner when it
        outputs the clean image than when it must carry the noise through its blocks
        (docs/results/fidelity.md). `forward` returns the velocity in both cases (`velocity`).

        Raises:
            ValueError: an unknown prediction.

        Example:
            >>> from mosaic_kit.pipelines import build_family
            >>> build_family("flux1", pixel_space=2, prediction="sample").prediction  # set by the registry
            'sample'
        """
        if prediction not in PREDICTIONS:
            raise ValueError(f"Expected `prediction` to be one of {list(PREDICTIONS)}, but got {prediction!r}.")
        self.prediction = prediction
        return self

    def velocity(self, output: torch.Tensor, noisy: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The velocity ``ε − x`` from the model's raw ``output`` for the noisy target ``noisy`` at ``timestep`` σ.

        With ``prediction == "velocity"`` the output itself; with ``"sample"`` the output is
        ``x̂`` and, as ``x_σ = x + σ·(ε − x)``, the velocity is ``(x_σ − x̂) / max(σ, MIN_SAMPLE_SIGMA)``
        (in float32).

        Args:
            output: ``(B, N, C)`` the model's raw output.
            noisy: ``(B, N, C)`` the noisy latents ``x_σ`` it was given.
            timestep: ``(B,)`` the noise levels σ.

        Returns:
            ``(B, N, C)`` the velocity.

        Example:
            >>> from mosaic_kit.pipelines import build_family
            >>> family = build_family("flux1", pixel_space=2, prediction="sample")
            >>> x, eps, sigma = torch.zeros(1, 4, 12), torch.ones(1, 4, 12), torch.tensor([0.5])
            >>> family.velocity(x, family.noise(x, eps, sigma), sigma).unique()  # the clean target gives ε − x
            tensor([1.])
        """
        if self.prediction == "velocity":
            return output
        sigma = timestep.float().clamp(min=MIN_SAMPLE_SIGMA).view(-1, *([1] * (output.ndim - 1)))
        return (noisy.float() - output.float()) / sigma

    def loss_weights(self, timestep: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights of the velocity loss (`mosaic_kit.losses.flow_matching_loss`): None
        for velocity prediction; ``max(σ, MIN_SAMPLE_SIGMA)²`` for sample prediction, which makes
        the weighted velocity loss the clean-target loss ``mean((x̂ − x)²)`` wherever σ is at least
        `MIN_SAMPLE_SIGMA` (the "x-loss", which trained the tiny models best).

        Args:
            timestep: ``(B,)`` the noise levels σ.

        Returns:
            ``(B,)`` float32 weights, or None.

        Example:
            >>> from mosaic_kit.pipelines import build_family
            >>> build_family("flux1", pixel_space=2, prediction="sample").loss_weights(torch.tensor([0.01, 0.5]))
            tensor([0.0025, 0.2500])
        """
        if self.prediction == "velocity":
            return None
        return timestep.float().clamp(min=MIN_SAMPLE_SIGMA).square()

    def model_kwargs(
        self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
        guidance: float | torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of ``model(...)`` (without ``capture``) for noisy latents at
        ``timestep``, cast to the model's dtype, after checking the contract.

        Args:
            inputs: from `encode_batch` (or a family's inference encoding).
            noisy: ``(B, N_tgt, C)`` floating noisy packed target latents (B: ``inputs.batch_size``).
            timestep: ``(B,)`` floating flow-matching time in ``[0, 1]``.
            guidance: a finite number or a ``(B,)`` floating tensor, or None.

        Raises:
            ValueError: naming the argument, what was expected and what arrived.
        """
        if not isinstance(inputs, ModelInputs):
            raise ValueError(f"Expected `inputs` to be ModelInputs (from `encode_batch`), but got {type(inputs).__name__}.")
        n_tgt, channels = inputs.layout.target_grid.num_tokens, self.token_channels
        b = inputs.batch_size
        if not isinstance(noisy, torch.Tensor) or noisy.ndim != 3 or noisy.shape[1:] != (n_tgt, channels) \
                or (b is not None and noisy.shape[0] != b):
            got = tuple(noisy.shape) if isinstance(noisy, torch.Tensor) else type(noisy).__name__
            raise ValueError(f"Expected `noisy` of shape ({'B' if b is None else b}, {n_tgt}, {channels}), but got {got}.")
        if not noisy.is_floating_point():
            raise ValueError(f"Expected `noisy` with a floating dtype, but got {noisy.dtype}.")
        b = noisy.shape[0]
        if not isinstance(timestep, torch.Tensor) or tuple(timestep.shape) != (b,):
            got = tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else type(timestep).__name__
            raise ValueError(f"Expected `timestep` of shape ({b},) (one flow-matching time in [0, 1] per sample), "
                             f"but got {got}.")
        if not timestep.is_floating_point():
            raise ValueError(f"Expected `timestep` with a floating dtype (time in [0, 1]), but got {timestep.dtype}.")
        low, high = timestep.aminmax()
        if not (bool(low >= 0) and bool(high <= 1)):  # written so that NaN fails too
            raise ValueError(f"Expected `timestep` with values in [0, 1] (flow-matching time, not the scheduler's "
                             f"0…1000), but got values in [{float(low):.4g}, {float(high):.4g}].")
        if isinstance(guidance, torch.Tensor):
            if tuple(guidance.shape) != (b,) or not guidance.is_floating_point():
                raise ValueError(f"Expected a `guidance` tensor of shape ({b},) and a floating dtype, but got "
                                 f"{tuple(guidance.shape)} {guidance.dtype}.")
        elif guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                       or not math.isfinite(guidance)):
            raise ValueError(f"Expected `guidance` to be a finite number, a ({b},) tensor or None, but got {guidance!r}.")
        return self._model_kwargs(inputs, noisy, timestep, guidance)

    @abc.abstractmethod
    def _model_kwargs(
        self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
        guidance: float | torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The model-specific keyword arguments for checked inputs (see `model_kwargs`)."""

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
            ``(B, N_tgt, C)`` the prediction (velocity; with sample prediction, converted by `velocity`).

        Raises:
            ValueError: an input breaks the contract (`model_kwargs`).
        """
        output = self.model(**self.model_kwargs(inputs, noisy, timestep, guidance), capture=capture)
        return self.velocity(output, noisy, timestep)

    # -- trainable parameters and the LoRA -----------------------------------------------------------
    @abc.abstractmethod
    def add_lora(self, rank: int, alpha: float | None = None) -> Any:
        """Adds a fresh LoRA (base weights frozen)."""

    @abc.abstractmethod
    def trainable_parameters(self, trainable: str = "lora") -> list[nn.Parameter]:
        """The parameters that train for ``trainable`` (one of `TRAINABLE`), in a fixed order."""

    def set_trainable(self, trainable: str = "lora") -> list[nn.Parameter]:
        """Marks exactly `trainable_parameters(trainable)` as requiring gradients; the
        `frozen_modules` are frozen and put in eval mode.

        Returns:
            Those parameters.
        """
        chosen = self.trainable_parameters(trainable)
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()
        ids = {id(p) for p in chosen}
        for param in self.model.parameters():
            param.requires_grad_(id(param) in ids)
        return chosen

    # -- sampling ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample(self, prompt: str, references: Sequence[Any], height: int, width: int, num_inference_steps: int,
               generator: torch.Generator | None = None, guidance_scale: float | None = None,
               **options: Any) -> Any:
        """One image from the family's pipeline (the LoRA as loaded): what a user gets, for
        validation sheets, inference and evaluation.

        Args:
            prompt: the prompt.
            references: PIL images, already preprocessed (each is given to the pipeline as it is).
            height: image height in pixels (a multiple of `pixels_per_token`).
            width: image width in pixels.
            num_inference_steps: denoising steps.
            generator: the noise generator.
            guidance_scale: None: `default_guidance_scale`.
            **options: family-specific sampling options (unknown ones raise ``TypeError``).

        Returns:
            A PIL image.
        """

    # -- decoding ----------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents ``(B, N_tgt, C)`` of a ``height × width`` image → ``(B, 3, H, W)``
        float32 images in ``[0, 1]``, after checking the sizes and the latents' shape.

        Raises:
            ValueError: a size that is not a positive multiple of `pixels_per_token`, or latents of
                another shape than ``(B, N_tgt, C)``.
        """
        n_tgt = self.token_layout((height, width), ()).target_grid.num_tokens
        channels = self.token_channels
        if not isinstance(latents, torch.Tensor) or latents.ndim != 3 or latents.shape[1:] != (n_tgt, channels) \
                or not latents.is_floating_point():
            got = f"{tuple(latents.shape)} {latents.dtype}" if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"Expected floating `latents` of shape (B, {n_tgt}, {channels}) for a {height}×{width} "
                             f"image, but got {got}.")
        from .encoders import encoders_in_use

        with encoders_in_use(self):
            return self._decode(latents, height, width)

    @abc.abstractmethod
    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The model-specific decoding of checked latents (see `decode`)."""


def check_trainable(trainable: Any) -> str:
    """Checks a ``trainable`` setting against `TRAINABLE`.

    Example:
        >>> check_trainable("all")
        'all'
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"Expected `trainable` to be one of {TRAINABLE}, but got {trainable!r}.")
    return trainable
