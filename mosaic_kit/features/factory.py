"""Build an extractor by name."""

from __future__ import annotations

import inspect
from typing import Any

from .base import FeatureExtractor
from .diffusion import DiffusionFeatures
from .dinov2 import DINOv2
from .dit import DiTFeatures
from .precomputed import Precomputed
from .sift import DenseSIFT

__all__ = ["EXTRACTORS", "build_extractor"]

EXTRACTORS = ("sift", "dinov2", "dift", "dit", "precomputed")
"""Names `build_extractor` accepts (each extractor's `name`)."""


def build_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """Builds a feature extractor from its name, e.g. from a config file.

    - `"sift"`: `DenseSIFT(**kwargs)` (no weights).
    - `"dinov2"`: `DINOv2.from_pretrained(**kwargs)` when `kwargs` has `path_or_id`, else `DINOv2(**kwargs)`.
    - `"dift"`: `DiffusionFeatures.from_pretrained(**kwargs)` when `kwargs` has `path_or_id`,
      else `DiffusionFeatures(**kwargs)`.
    - `"dit"`: `DiTFeatures.from_pretrained(**kwargs)` when `kwargs` has `path_or_id`, else
      `DiTFeatures(**kwargs)`.
    - `"precomputed"`: `Precomputed(**kwargs)`.

    Args:
        name: one of `EXTRACTORS`: `"sift"`, `"dinov2"`, `"dift"`, `"dit"`, `"precomputed"`.
        **kwargs: arguments of the extractor (or of its `from_pretrained`).

    Returns:
        The extractor, a `FeatureExtractor` whose `name` is `name`.

    Raises:
        ValueError: if `name` is not one of `EXTRACTORS`, or a setting is not one the extractor takes.

    Example:
        >>> import torch
        >>> extractor = build_extractor("sift", grid_size=8, patch_size=16)
        >>> extractor.name, extractor(torch.rand(1, 3, 64, 64)).shape
        ('sift', torch.Size([1, 128, 8, 8]))
        >>> build_extractor("geoaware")
        Traceback (most recent call last):
        ...
        ValueError: Expected `name` to be one of ['sift', 'dinov2', 'dift', 'dit', 'precomputed'], but got 'geoaware'.
        >>> build_extractor("sift", patch_sise=16)
        Traceback (most recent call last):
        ...
        ValueError: Expected the settings of extractor 'sift' among [..., 'patch_size', ...], but got unknown ['patch_sise'].
    """
    classes = {"sift": DenseSIFT, "dinov2": DINOv2, "dift": DiffusionFeatures, "dit": DiTFeatures,
               "precomputed": Precomputed}
    if name not in classes:
        raise ValueError(f"Expected `name` to be one of {list(EXTRACTORS)}, but got {name!r}.")
    build = classes[name].from_pretrained if "path_or_id" in kwargs and name != "sift" else classes[name]
    _check_settings(name, build, kwargs)
    return build(**kwargs)


def _check_settings(name: str, build: Any, kwargs: dict) -> None:
    """A setting the extractor does not take is a ValueError naming it and the accepted ones."""
    parameters = inspect.signature(build).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [p for p in parameters if p not in ("self", "cls")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"Expected the settings of extractor {name!r} among {accepted}, but got unknown {unknown}.")


def _parse_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_extractor_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parses a command-line extractor spec ``NAME[:key=value,...]`` for `build_extractor`.

    Values are read as booleans (``true``/``false``), integers or floats where they parse, else
    kept as strings.

    Example:
        >>> parse_extractor_spec("sift:patch_size=16,rootsift=false")
        ('sift', {'patch_size': 16, 'rootsift': False})
        >>> parse_extractor_spec("dinov2:path_or_id=facebook/dinov2-small,layer=-2")
        ('dinov2', {'path_or_id': 'facebook/dinov2-small', 'layer': -2})
    """
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"Expected an extractor spec NAME[:key=value,...], but got {spec!r}.")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Expected key=value in extractor spec {spec!r}, but got {item!r}.")
        kwargs[key] = _parse_value(value)
    return name, kwargs

