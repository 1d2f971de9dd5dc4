"""Which FLUX transformer a LoRA was made for, from its keys, and whether it fits the transformer
it is being loaded into: so that a FLUX.1 LoRA loaded into FLUX.2 (or the reverse) is refused
with an error naming the file, the model it was made for and the model it is being loaded into,
instead of peft's raw ``size mismatch``; and which model family wrote a LoRA file (`LORA_FAMILY_KEY`
in its metadata), so that a file of one family is refused by another even where its module names fit
(a FLUX.1 reference LoRA in FLUX.1-Kontext: the same modules, but FLUX.1 applies it to the reference
tokens only, Kontext to every token).

The two architectures name some modules differently (diffusers ``FluxTransformer2DModel`` and
``Flux2Transformer2DModel``): FLUX.1 has per-block modulation linears (``norm1.linear``), a GELU
feed-forward (``ff.net.2``) and separate single-block projections (``proj_mlp``,
``attn.to_q``); FLUX.2 has shared modulation (``double_stream_modulation_img``), a SwiGLU
feed-forward (``ff.linear_in``) and fused single-block projections (``attn.to_qkv_mlp_proj``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

FLUX1_ONLY = re.compile(
    r"^(transformer_blocks\.\d+\.(norm1(_context)?\.linear|ff(_context)?\.net\.\d+(\.proj)?)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv])"
    r"|time_text_embed\..+)$"
)
"""Linear modules of FLUX.1 (`FluxTransformer2DModel`) that FLUX.2 does not have."""

FLUX2_ONLY = re.compile(
    r"^(transformer_blocks\.\d+\.ff(_context)?\.linear_(in|out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
    r"|(double_stream_modulation_(img|txt)|single_stream_modulation|time_guidance_embed)\..+)$"
)
"""Linear modules of FLUX.2 (`Flux2Transformer2DModel`) that FLUX.1 does not have."""

MODELS = {
    "FLUX.1": ("FluxTransformer2DModel", FLUX1_ONLY),
    "FLUX.2": ("Flux2Transformer2DModel", FLUX2_ONLY),
}
"""Model → (diffusers transformer class, its own module names). Where its LoRAs load, the
families say themselves (`families_for`)."""

_KEY = re.compile(r"^(transformer\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def lora_made_for(modules: list[str]) -> tuple[str, list[str]] | None:
    """The FLUX model a LoRA's module names belong to, with the names that show it.

    Args:
        modules: module names of the LoRA's keys (``transformer_blocks.0.norm1.linear``).

    Returns:
        ``(model, evidence)``, e.g. ``("FLUX.1 (FluxTransformer2DModel)", [...])``, or None when
        the names are of neither model only (shared names, or both).

    Example:
        >>> lora_made_for(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.norm1.linear"])
        ('FLUX.1 (FluxTransformer2DModel)', ['transformer_blocks.0.norm1.linear'])
        >>> lora_made_for(["transformer_blocks.0.attn.to_q"]) is None
        True
    """
    found = {name: [m for m in modules if pattern.fullmatch(m)] for name, (_, pattern) in MODELS.items()}
    hits = [name for name, names in found.items() if names]
    if len(hits) != 1:
        return None
    return f"{hits[0]} ({MODELS[hits[0]][0]})", found[hits[0]]


def _targets_cover(targets: str | tuple[str, ...], modules: list[str]) -> bool:
    """Whether a family's declared LoRA targets (a peft regex over full module names, or
    module-name suffixes) cover every module."""
    if isinstance(targets, str):
        return all(re.fullmatch(targets, module) for module in modules)
    return bool(targets) and all(any(m == t or m.endswith("." + t) for t in targets) for m in modules)


def families_for(model: str, modules: list[str]) -> list[type]:
    """The model families that load a LoRA made for ``model`` on ``modules``, from what each family
    declares: its ``architecture`` (``"FLUX.1"``) and its ``lora_targets``. Those whose targets
    cover every module (a FLUX.1 reference LoRA: `MosaicFluxFamily`; a Kontext LoRA with its
    text-stream projections: `KontextFamily`), else every family of that architecture.

    Args:
        model: the architecture (a key of `MODELS`).
        modules: the LoRA's module names.

    Returns:
        Family classes, in the order they were defined (one per registry name).

    Example:
        >>> [f.__name__ for f in families_for("FLUX.1", ["transformer_blocks.0.attn.add_k_proj"])]
        ['KontextFamily']
        >>> [f.__name__ for f in families_for("FLUX.1", ["x_embedder"])]
        ['MosaicFluxFamily']
    """
    declared = [c for c in _declared_families().values() if getattr(c, "architecture", "") == model]
    return [c for c in declared if _targets_cover(getattr(c, "lora_targets", ()), modules)] or declared


def _declared_families() -> dict[str, type]:
    """Every named `ModelFamily` subclass by its name (the first defined for a name)."""
    from . import flux, flux2, kontext, qwen  # noqa: F401  (the shipped families, so they declare themselves)
    from .family import ModelFamily

    found: dict[str, type] = {}
    pending = list(ModelFamily.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if cls.name:
            found.setdefault(cls.name, cls)
    return found


def _load_with(families: list[type]) -> str:
    names = [f"`{c.__name__}` (training: `model.family: {c.name}`)" for c in families]
    return f" Load it with {' or '.join(names)}." if names else ""


def _load_hint(model: str, modules: list[str]) -> str:
    return _load_with(families_for(model, modules))


LORA_FAMILY_KEY = "mosaic_kit.family"
"""The safetensors metadata key under which every family's LoRA writer (``family.save_lora``, both
formats) records the registry name of the family that wrote the file (``"kontext"``); a family's
``load_lora`` refuses a file that records another family, naming the file and both families.
Released checkpoints and stock or third-party files have no such key and load as before;
diffusers' ``load_lora_weights`` ignores it."""


def lora_family_metadata(family: object) -> dict[str, str]:
    """The LoRA file metadata naming the model family that writes it.

    Args:
        family: a `mosaic_kit.models.ModelFamily` (its class's registry ``name``).

    Returns:
        ``{LORA_FAMILY_KEY: name}``.

    Raises:
        ValueError: the family's class has no registry name.

    Example:
        >>> from mosaic_kit.models.kontext import KontextFamily
        >>> lora_family_metadata(KontextFamily.tiny())
        {'mosaic_kit.family': 'kontext'}
    """
    name = getattr(type(family), "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected `family` to be a ModelFamily with a registry `name`, but got "
                         f"{type(family).__name__} with name {name!r}.")
    return {LORA_FAMILY_KEY: name}


def recorded_lora_family(path: str | os.PathLike) -> str | None:
    """The model family a LoRA file records (`LORA_FAMILY_KEY`), read from its metadata only.

    Args:
        path: a local ``.safetensors`` file.

    Returns:
        The recorded registry name, or None for a file that records none (released checkpoints,
        stock or third-party files) or a path that is not a readable ``.safetensors`` file (the
        loaders report those).

    Example:
        >>> recorded_lora_family("no/such/file.safetensors") is None
        True
    """
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # safetensors raises its own error types; read_lora_file reports an unreadable file
        return None
    return metadata.get(LORA_FAMILY_KEY)


def check_lora_family(family: object, recorded: str | None, label: str) -> None:
    """Refuses a LoRA file that records another model family than the one loading it: the module
    names may fit (FLUX.1 and FLUX.1-Kontext share them) while the families apply the LoRA to
    other tokens, which would be silently different behaviour.

    Args:
        family: the `mosaic_kit.models.ModelFamily` loading the file.
        recorded: the family the file records (`recorded_lora_family`; None: it records none, and
            loads as before).
        label: the file, for the error (``"LoRA file '…'"``).

    Raises:
        ValueError: naming the file, the family it was made for and the family loading it.

    Example:
        >>> from mosaic_kit.models.kontext import KontextFamily
        >>> check_lora_family(KontextFamily.tiny(), "kontext", "LoRA file 'a.safetensors'")
        >>> check_lora_family(KontextFamily.tiny(), None, "LoRA file 'a.safetensors'")
        >>> check_lora_family(KontextFamily.tiny(), "flux1", "LoRA file 'a.safetensors'")
        Traceback (most recent call last):
        ...
        ValueError: LoRA file 'a.safetensors' was made for model family 'flux1' (metadata 'mosaic_kit.family'), ...
    """
    own = type(family).name
    if recorded is None or recorded == own:
        return
    maker = _declared_families().get(recorded)
    raise ValueError(
        f"{label} was made for model family {recorded!r} (metadata {LORA_FAMILY_KEY!r}), but is being loaded into "
        f"model family {own!r} ({type(family).__name__}): the two families apply a LoRA differently (to other "
        f"tokens or modules), even where its module names fit.{_load_with([maker] if maker is not None else [])}"
    )


def describe_transformer(transformer: nn.Module, family: str) -> str:
    """``"FLUX.2 (Flux2Transformer2DModel from 'black-forest-labs/…')"``: the model a LoRA is loaded into."""
    path = getattr(getattr(transformer, "config", None), "_name_or_path", None)
    origin = f" from {path!r}" if path else ""
    return f"{family} ({type(transformer).__name__}{origin})"


def _listing(names: list, limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', …' if len(names) > limit else ''}]"


def check_lora_fits(state: Mapping[str, torch.Tensor], transformer: nn.Module, source: str, family: str) -> None:
    """Raises unless every ``<module>.lora_A/B.weight`` key of ``state`` names a linear module of
    ``transformer`` with the shapes its LoRA needs (``(r, in_features)`` and ``(out_features, r)``).

    Keys in other layouts (LoKr, alphas) are left to the loader. The error names ``source``, the
    model the keys show the LoRA was made for (`lora_made_for`; "another model" when they show
    none), and the model it is being loaded into.

    Args:
        state: the LoRA's tensors (keys with or without the ``transformer.`` prefix).
        transformer: the transformer being loaded into (peft-wrapped modules are read through
            their base layer).
        source: what to call the LoRA in the error (``"LoRA file '…'"``).
        family: the transformer's model family, for the error (``"FLUX.2"``).

    Raises:
        ValueError: a key naming no linear module of ``transformer``, or a tensor of another shape.

    Example:
        >>> from mosaic_kit.models.testing import tiny_flux_transformer
        >>> check_lora_fits({"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight":
        ...                  torch.zeros(2, 32)}, tiny_flux_transformer(), "LoRA file 'x.safetensors'", "FLUX.1")
        Traceback (most recent call last):
        ...
        ValueError: LoRA file 'x.safetensors' was made for FLUX.2 (Flux2Transformer2DModel): ...
    """
    modules = dict(transformer.named_modules())
    unknown, wrong, named = [], [], []
    for key, value in state.items():
        match = _KEY.match(key)
        if match is None:
            continue
        name, part = match["module"], match["part"]
        named.append(name)
        module = modules.get(name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, nn.Linear):
            unknown.append(name)
            continue
        shape = tuple(value.shape)
        if len(shape) != 2:
            wrong.append(f"{key} {shape}")
            continue
        rank = shape[0] if part == "A" else shape[1]
        expected = (rank, base.in_features) if part == "A" else (base.out_features, rank)
        if shape != expected:
            wrong.append(f"{key} {shape}, here {expected}")
    if not unknown and not wrong:
        return
    unknown = sorted(set(unknown))
    origin = lora_made_for(sorted(set(named)))
    if origin is not None and origin[0].startswith(family + " "):
        origin = None  # keys of this family's architecture: another size of it (the shapes tell)
    problems, hint = [], ""
    if origin is not None:
        model = origin[0].split()[0]
        made_for = f"was made for {origin[0]}: {len(origin[1])} of its modules exist only there, e.g. {_listing(origin[1])}"
        hint = _load_hint(model, sorted(set(named)))
        unknown = [name for name in unknown if name not in origin[1]]
    elif unknown:
        made_for = "was made for another model"
    else:
        made_for = f"was made for another {family} model (other layer widths)"
    if unknown:
        problems.append(f"{len(unknown)} of its modules are not linear modules here, e.g. {_listing(unknown)}")
    if wrong:
        problems.append(f"{len(wrong)} of its tensors have other shapes, e.g. {_listing(wrong, 2)}")
    details = f": {'; '.join(problems)}" if problems else ""
    raise ValueError(
        f"{source} {made_for}; it does not fit {describe_transformer(transformer, family)}, which it is being "
        f"loaded into{details}.{hint}"
    )
