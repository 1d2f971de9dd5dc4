"""The one plug-in point for model families: a family is chosen by name from this registry.

Each entry (`FamilySpec`) declares the family's name, its class (a `mosaic_kit.models.ModelFamily`:
the model boundary, with its tiny random builder ``tiny`` and ``from_pretrained``), its config
extras (the `mosaic_kit.training.ModelConfig` fields it takes as options), the pipeline that runs
what it trains, its LoRA file format and its inference defaults. Training, inference
(``recipes/flux_mosaic_infer.py --family NAME``) and evaluation build families only through
`build_family`; this module is the only place that names families (a test enforces it).

The registry sits in the pipelines layer because a family's runnable pipeline may be a
mosaic_kit pipeline (FLUX.1's `MosaicFluxPipeline`); a new family adds one `register_family`
call here (its code lives in ``models/``).

Example:
    >>> family_names()
    ('flux1', 'flux2', 'qwen_edit_plus', 'kontext')
    >>> family = build_family("flux2", seed=0)  # tiny random components (no base)
    >>> type(family).__name__, family.name
    ('Flux2Family', 'flux2')
    >>> get_family("flux3")
    Traceback (most recent call last):
    ...
    ValueError: Expected a model family in ('flux1', 'flux2', 'qwen_edit_plus', 'kontext'), but got 'flux3'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import ModelFamily, MosaicFluxFamily
from ..models.flux2 import Flux2Family
from ..models.kontext import KontextFamily
from ..models.options import check_family_options
from ..models.qwen import QwenEditPlusFamily
from .pipeline import MosaicFluxPipeline

__all__ = ["FamilySpec", "build_family", "family_names", "get_family", "register_family"]


@dataclass(frozen=True)
class FamilySpec:
    """One registered model family.

    Attributes:
        family_class: the `ModelFamily` subclass (its ``name`` is the registry name).
        pipeline: the pipeline that runs what the family trains, as a user loads it.
        pipeline_class: the class `build_family` builds the family over (None: the family's own
            default, e.g. the one a base's ``model_index.json`` names).
        lora_format: what the family's LoRA file is (written by ``family.save_lora``).
        stock_lora: the file is a plain adapter that the stock pipeline's ``load_lora_weights``
            loads (the contract suite then checks the forward against the stock transformer).
        inference_defaults: ``{"height", "width", "ref_size", "steps"}`` for a real base.
        tiny_inference_defaults: the same for the tiny random components.
        description: one line for help texts.
    """

    family_class: type[ModelFamily]
    pipeline: str
    lora_format: str
    pipeline_class: type | None = None
    stock_lora: bool = False
    inference_defaults: dict[str, int] = field(default_factory=dict)
    tiny_inference_defaults: dict[str, int] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.family_class, type) and issubclass(self.family_class, ModelFamily)
                and self.family_class.name):
            raise ValueError(f"Expected `family_class` to be a named ModelFamily subclass, but got {self.family_class!r}.")

    @property
    def name(self) -> str:
        """The registry name (the family class's ``name``)."""
        return self.family_class.name

    @property
    def config_extras(self) -> tuple[str, ...]:
        """The `mosaic_kit.training.ModelConfig` fields passed to the family's builders."""
        return tuple(self.family_class.config_extras)

    @property
    def family_options(self) -> dict[str, tuple | None]:
        """The options ``model.family_options`` and ``--family-option`` may set (name → allowed
        values, None: any the family's constructor accepts); `ModelFamily.family_options`."""
        return dict(self.family_class.family_options)

    def check_options(self, options: Any) -> dict[str, Any]:
        """``options`` checked against `family_options` (`mosaic_kit.models.options.check_family_options`).

        Raises:
            ValueError: an option the family does not declare (naming its options) or a value it
                does not allow.

        Example:
            >>> get_family("flux2").check_options({"reference_method": "index"})
            Traceback (most recent call last):
            ...
            ValueError: Unknown family option 'reference_method' for model family 'flux2'; it takes none.
        """
        return check_family_options(self.family_class, options)

    def build(self, base: str | os.PathLike | None = None, torch_dtype: torch.dtype | None = None, seed: int = 0,
              tiny_overrides: dict | None = None, pixel_space: int | None = None, encoders: bool = True,
              family_options: dict[str, Any] | None = None, prediction: str = "velocity",
              **options: Any) -> ModelFamily:
        """The family: tiny random components when ``base`` is None, else the pretrained base.

        Args:
            base: hub id or local folder, or None.
            torch_dtype: weight dtype of a pretrained base.
            seed: seed of the tiny components.
            tiny_overrides: tiny transformer config entries to change (tiny only).
            pixel_space: tiny pixel-space factor, or None (tiny only).
            encoders: False: without the text encoders, tokenizers and VAE (cached conditioning,
                `mosaic_kit.training.cache`): a pretrained base never loads them; tiny random
                components are built whole (one random stream) and then dropped
                (`mosaic_kit.models.encoders.drop_encoders`).
            family_options: the family's declared options (`family_options`; ``model.family_options``),
                checked by `check_options`, e.g. ``{"reference_method": "index"}`` for Kontext.
            prediction: what the model outputs, ``"velocity"`` or ``"sample"`` (x-prediction,
                `ModelFamily.set_prediction`; tiny only: pretrained models predict the velocity).
            **options: the family's constructor options (its `config_extras`, ...).

        Raises:
            ValueError: a family option the family does not declare or allow.

        Example:
            >>> build_family("kontext", family_options={"reference_method": "index"}).reference_method
            'index'
        """
        from ..models.encoders import drop_encoders, encoder_loading_kwargs

        kwargs = {**options, **self.check_options(family_options)}
        if self.pipeline_class is not None:
            kwargs["pipeline_class"] = self.pipeline_class
        encoder_loading_kwargs(self.family_class, encoders)  # checks the setting
        if base is None:
            family = self.family_class.tiny(seed=seed, transformer_overrides=tiny_overrides or None,
                                            pixel_space=pixel_space, **kwargs).set_prediction(prediction)
            return family if encoders else drop_encoders(family)
        if tiny_overrides or pixel_space or prediction != "velocity":
            raise ValueError("Expected `tiny_overrides`, `pixel_space` and a `prediction` other than 'velocity' "
                             "only without a `base`.")
        return self.family_class.from_pretrained(base, torch_dtype=torch_dtype, **kwargs,
                                                 **({} if encoders else {"encoders": False}))


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Adds a family to the registry (by its class's ``name``); returns the spec.

    Raises:
        ValueError: a family of that name is registered already.
    """
    if not isinstance(spec, FamilySpec):
        raise ValueError(f"Expected a FamilySpec, but got {type(spec).__name__}.")
    if spec.name in _REGISTRY:
        raise ValueError(f"Expected a new family name, but {spec.name!r} is registered already.")
    _REGISTRY[spec.name] = spec
    return spec


def family_names() -> tuple[str, ...]:
    """The registered family names, in registration order."""
    return tuple(_REGISTRY)


def get_family(name: str) -> FamilySpec:
    """The registered family ``name``.

    Raises:
        ValueError: no family of that name, naming the registered ones.
    """
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"Expected a model family in {family_names()}, but got {name!r}.")
    return spec


def build_family(name: str, base: str | os.PathLike | None = None, **settings: Any) -> ModelFamily:
    """`FamilySpec.build` of the registered family ``name``."""
    return get_family(name).build(base, **settings)


register_family(FamilySpec(
    MosaicFluxFamily,
    pipeline="mosaic_kit.pipelines.MosaicFluxPipeline (load_mosaic_weights)",
    pipeline_class=MosaicFluxPipeline,
    lora_format="diffusers LoRA safetensors of the reference LoRA, alpha/rank folded into lora_B, with a digest "
                "(the released checkpoint's format)",
    inference_defaults={"height": 512, "width": 512, "ref_size": 512, "steps": 28},
    tiny_inference_defaults={"height": 32, "width": 32, "ref_size": 32, "steps": 4},
    description="FLUX.1, references in their own branch (released MOSAIC)",
))
register_family(FamilySpec(
    Flux2Family,
    pipeline="diffusers Flux2KleinPipeline / Flux2Pipeline (stock load_lora_weights)",
    lora_format="diffusers LoRA safetensors of a plain peft adapter, with its adapter metadata (lora_alpha)",
    stock_lora=True,
    inference_defaults={"height": 1024, "width": 1024, "ref_size": 1024, "steps": 4},
    tiny_inference_defaults={"height": 32, "width": 32, "ref_size": 64, "steps": 4},
    description="FLUX.2 [klein]/[dev], references in the target's sequence (stock pipeline layout)",
))
register_family(FamilySpec(
    QwenEditPlusFamily,
    pipeline="diffusers QwenImageEditPlusPipeline (stock load_lora_weights)",
    lora_format="diffusers LoRA safetensors of a plain peft adapter, with its adapter metadata (lora_alpha)",
    stock_lora=True,
    inference_defaults={"height": 1024, "width": 1024, "ref_size": 1024, "steps": 40},
    tiny_inference_defaults={"height": 32, "width": 32, "ref_size": 64, "steps": 4},
    description="Qwen-Image-Edit-Plus 2509/2511, references in the target's sequence (stock pipeline layout)",
))
register_family(FamilySpec(
    KontextFamily,
    pipeline="diffusers FluxKontextPipeline (stock load_lora_weights; one reference) / KontextFamily.sample (K references)",
    lora_format="diffusers LoRA safetensors of a plain peft adapter, with its adapter metadata (lora_alpha)",
    stock_lora=True,
    inference_defaults={"height": 1024, "width": 1024, "ref_size": 512, "steps": 28},
    tiny_inference_defaults={"height": 32, "width": 32, "ref_size": 32, "steps": 4},
    description="FLUX.1-Kontext, references in the target's sequence placed by ComfyUI's offset/index/uxo methods",
))
