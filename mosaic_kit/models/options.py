"""Family options: the constructor options a model family lets configs and recipes set by name
(``model.family_options`` in a training YAML, ``--family-option KEY=VALUE`` in
``recipes/flux_mosaic_infer.py``), checked against what the family declares and recorded in the
LoRA files it writes, so inference runs a LoRA with the options it was trained with.

A family declares them as `ModelFamily.family_options`: a name → allowed values (a tuple, or None
for any value its constructor accepts) mapping, e.g. FLUX.1-Kontext's
``{"reference_method": ("offset", "index", "uxo")}``.

Example:
    >>> from mosaic_kit.models.kontext import KontextFamily
    >>> check_family_options(KontextFamily, {"reference_method": "index"})
    {'reference_method': 'index'}
    >>> check_family_options(KontextFamily, {"method": "index"})
    Traceback (most recent call last):
    ...
    ValueError: Unknown family option 'method' for model family 'kontext'; expected among ['reference_method'].
    >>> family_options_metadata(KontextFamily.tiny(reference_method="index"))
    {'mosaic_family_options': '{"reference_method": "index"}'}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FAMILY_OPTIONS_KEY", "check_family_options", "check_lora_family_options", "family_options_metadata",
           "parse_family_options", "recorded_family_options", "resolve_family_options"]

FAMILY_OPTIONS_KEY = "mosaic_family_options"
"""The LoRA file's metadata key holding the family options it was trained with (a JSON object)."""


def check_family_options(family_class: Any, options: Any) -> dict[str, Any]:
    """``options`` checked against the family's declared `family_options` (names and, where the
    family lists them, allowed values); returns them as a new dict.

    Args:
        family_class: a `mosaic_kit.models.ModelFamily` subclass.
        options: a mapping of option names to values (None: no options).

    Returns:
        The options.

    Raises:
        ValueError: not a mapping, an option the family does not declare (naming the family and
            its options), or a value outside the option's allowed values.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"Expected family options as a mapping of option names to values, but got {options!r}.")
    declared = dict(family_class.family_options)
    for key, value in options.items():
        if key not in declared:
            accepted = f"expected among {sorted(declared)}" if declared else "it takes none"
            raise ValueError(f"Unknown family option {key!r} for model family {family_class.name!r}; {accepted}.")
        allowed = declared[key]
        if allowed is not None and value not in allowed:
            raise ValueError(f"Expected family option {key!r} of model family {family_class.name!r} to be one of "
                             f"{list(allowed)}, but got {value!r}.")
    return dict(options)


def parse_family_options(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the recipes' ``--family-option``, repeatable), each value read as
    YAML (``index`` → ``"index"``, ``3`` → ``3``), into options; `check_family_options` checks them.

    Args:
        items: the strings.

    Returns:
        The options, by key (a later key wins).

    Raises:
        ValueError: an item without ``=`` or a key, or a value that is not YAML.

    Example:
        >>> parse_family_options(["reference_method=index", "size=3"])
        {'reference_method': 'index', 'size': 3}
        >>> parse_family_options(["reference_method"])
        Traceback (most recent call last):
        ...
        ValueError: Expected a family option KEY=VALUE (e.g. reference_method=index), but got 'reference_method'.
    """
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Expected a family option KEY=VALUE (e.g. reference_method=index), but got {item!r}.")
        try:
            options[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"Expected family option {key.strip()!r} to have a YAML value, but got {text!r}.") from None
    return options


def family_options_metadata(family: Any) -> dict[str, str]:
    """The LoRA file metadata recording ``family``'s option values (empty for a family without options).

    Args:
        family: a `mosaic_kit.models.ModelFamily`.

    Returns:
        ``{FAMILY_OPTIONS_KEY: json}`` or ``{}``.
    """
    values = family.family_option_values()
    return {FAMILY_OPTIONS_KEY: json.dumps(values, sort_keys=True)} if values else {}


def recorded_family_options(source: str | os.PathLike | Mapping[str, str] | None) -> dict[str, Any]:
    """The family options a LoRA file records (`family_options_metadata`).

    Args:
        source: a local ``.safetensors`` file, a folder holding one (``pytorch_lora_weights.safetensors``
            or its only ``.safetensors`` file), a file's metadata mapping, or None; anything else (a
            hub id, a missing path) records nothing.

    Returns:
        The recorded options, ``{}`` when there are none.

    Raises:
        ValueError: a recorded entry that is not a JSON object.

    Example:
        >>> recorded_family_options({"mosaic_family_options": '{"reference_method": "uxo"}'})
        {'reference_method': 'uxo'}
        >>> recorded_family_options("no/such/file.safetensors")
        {}
    """
    if source is None:
        return {}
    metadata: Mapping[str, str] | None = source if isinstance(source, Mapping) else None
    if metadata is None:
        path = Path(source)
        if path.is_dir():
            default = path / "pytorch_lora_weights.safetensors"
            candidates = [default] if default.is_file() else sorted(path.glob("*.safetensors"))
            path = candidates[0] if len(candidates) == 1 else path
        if path.suffix != ".safetensors" or not path.is_file():
            return {}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    text = metadata.get(FAMILY_OPTIONS_KEY)
    if text is None:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, dict):
        raise ValueError(f"Expected the LoRA metadata {FAMILY_OPTIONS_KEY!r} to be a JSON object, but got {text!r}.")
    return values


def resolve_family_options(family_class: Any, given: Mapping[str, Any] | None, lora: str | os.PathLike | None
                           ) -> dict[str, Any]:
    """The family options to build an inference family with: ``given`` (checked), plus those
    ``lora``'s file records and ``given`` leaves out, so a LoRA runs with the options it was
    trained with.

    Args:
        family_class: a `mosaic_kit.models.ModelFamily` subclass.
        given: options set by the user (``--family-option``), or None.
        lora: the LoRA file or folder (`recorded_family_options`), or None.

    Returns:
        The options.

    Raises:
        ValueError: an option the family does not declare or allow, or a given value that differs
            from the one the LoRA records (naming both).

    Example:
        >>> from mosaic_kit.models.kontext import KontextFamily
        >>> resolve_family_options(KontextFamily, {"reference_method": "uxo"}, None)
        {'reference_method': 'uxo'}
    """
    options = check_family_options(family_class, given)
    recorded = check_family_options(family_class, recorded_family_options(lora))
    for key, value in recorded.items():
        if key in options and options[key] != value:
            raise ValueError(f"Expected family option {key}={value!r} (the LoRA {str(lora)!r} was trained with it), "
                             f"but got {key}={options[key]!r}.")
        options[key] = value
    return options


def check_lora_family_options(family: Any, recorded: Mapping[str, Any], label: str) -> None:
    """Refuses a LoRA trained with other family options than ``family``'s (a LoRA trained for
    Kontext's ``index`` method run with ``offset`` places every reference elsewhere).

    Args:
        family: the `mosaic_kit.models.ModelFamily` loading the LoRA.
        recorded: the options the file records (`recorded_family_options`).
        label: the file, for the error.

    Raises:
        ValueError: naming each differing option, the file's value and the family's.
    """
    values = family.family_option_values()
    differing = {key: (value, values[key]) for key, value in recorded.items() if key in values and values[key] != value}
    if differing:
        detail = ", ".join(f"{key}={file!r} (the family: {own!r})" for key, (file, own) in differing.items())
        wanted = {key: file for key, (file, _) in differing.items()}
        raise ValueError(f"{label} was trained with family options {detail}: build the family with family_options "
                         f"{wanted} (recipes: --family-option KEY=VALUE) to use it.")
