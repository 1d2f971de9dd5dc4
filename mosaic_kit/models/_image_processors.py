"""The image processors diffusers imports from transformers, chosen explicitly.

diffusers' IP-adapter loader (``diffusers/loaders/ip_adapter.py``, imported with every FLUX
pipeline) imports ``CLIPImageProcessor`` and ``SiglipImageProcessor`` from transformers. Since
transformers' image-processor backends (5.x), those names mean the torchvision-backed processors;
without torchvision, transformers falls back to the PIL-backed ``CLIPImageProcessorPil`` /
``SiglipImageProcessorPil``, binds them under the old names, and warns once per name. mosaic_kit
never uses these processors (it loads no IP-adapter), so nothing needs torchvision: the PIL
processors are bound under the old names here, before diffusers asks for them, which is exactly the
binding transformers' fallback makes, without the two warnings on every run.

`mosaic_kit.models` calls `choose_image_processors` on import (and `mosaic_kit.pipelines` imports
`mosaic_kit.models` before diffusers' pipelines).
"""

from __future__ import annotations

import importlib.util
import sys

DIFFUSERS_IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")
"""The transformers image processors diffusers imports when its FLUX pipelines load."""


def choose_image_processors(names: tuple[str, ...] = DIFFUSERS_IMAGE_PROCESSORS) -> list[str]:
    """Binds ``transformers.<name>`` to its PIL backend ``<name>Pil`` where torchvision is missing.

    Does nothing when transformers is not installed, when torchvision is (the default backend
    then works), for a name already resolved (by an earlier import or call), and for a
    transformers without the backend split (there ``<name>`` is the PIL processor itself).

    Args:
        names: transformers image-processor class names.

    Returns:
        The names bound by this call.

    Example:
        >>> choose_image_processors()  # mosaic_kit.models already chose them on import
        []
    """
    if importlib.util.find_spec("transformers") is None:
        return []
    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return []
    chosen = []
    for name in names:
        pil = f"{name}Pil"
        if name in vars(sys.modules["transformers"]) or pil not in dir(transformers):
            continue  # resolved already, or a transformers without the backend split
        value = getattr(transformers, pil)
        # importing an image processor imports transformers' processing_utils, which re-runs
        # transformers/__init__.py once and puts a new module object in sys.modules: bind there
        module = sys.modules["transformers"]
        if name not in vars(module):
            setattr(module, name, value)
            chosen.append(name)
    return chosen

choose_image_processors()  # on import: `mosaic_kit.models` imports this module before any diffusers module
