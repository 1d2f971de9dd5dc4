"""The reference LoRA: injection through peft, per-stream routing, and the LoRA file (diffusers'
LoRA safetensors layout, so released checkpoints load unchanged; files the project writes carry a
digest of their tensors).

- `add_reference_lora`, `load_reference_lora`, `save_reference_lora`, `set_reference_lora_scale`,
  `reference_lora_state_dict`: the adapter on a `FluxTransformer2DModel`.
- `write_lora_file`, `read_lora_file`, `lora_state_digest`, `LORA_DIGEST_KEY`: the file.
- `REFERENCE_LORA_TARGETS`, `DEFAULT_ADAPTER`: what the adapter covers and its name.
- ``_apply``: a module called with every active adapter but the reference one (text and target
  tokens), the one place that reads peft's layer internals.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..comfyui import ComfyLoraKey
from ...utils.atomic import write_bytes_atomic
from .._lora_origin import check_lora_fits, lora_made_for
from ...utils.finite import check_finite

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import FluxTransformer2DModel

DEFAULT_ADAPTER = "mosaic"
"""The peft adapter name of the reference LoRA."""

REFERENCE_LORA_TARGETS = (
    r"^(x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_[qkv]|attn\.to_out\.0|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv]))$"
)
"""The released target modules as one peft regex (matched against full module names); the
multi-reference forward routes exactly these per stream (LoRA on reference tokens only):
``x_embedder``; in double blocks ``norm1.linear``, ``attn.to_q/to_k/to_v``, ``attn.to_out.0``,
``ff.net.2``; in single blocks ``norm.linear``, ``proj_mlp``, ``proj_out``, ``attn.to_q/to_k/to_v``.
"""


_INERT_LORA = re.compile(r"^proj_out$")
"""Adapted modules the forward only ever runs on target tokens through their base weights (the
output projection): a LoRA there, which peft's suffix matching of ``"proj_out"`` creates in the
released training, has no effect, as in the released code."""


def _check_routed(names: Sequence[str]) -> None:
    """Raises unless every adapted module is one the forward routes per stream (or an inert one)."""
    routed = re.compile(REFERENCE_LORA_TARGETS)
    stray = sorted(n for n in names if not routed.fullmatch(n) and not _INERT_LORA.fullmatch(n))
    if stray:
        raise ValueError(
            f"Expected LoRA only on the reference-routed modules (REFERENCE_LORA_TARGETS), but got {stray[:4]}"
            f"{' ...' if len(stray) > 4 else ''}: the multi-reference forward would apply them to text and target "
            "tokens too."
        )


def _base(module: nn.Module) -> nn.Module:
    """The base layer of a peft-adapted module (the module itself when not adapted)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if get_base is not None else module


def _apply(module: nn.Module, x: torch.Tensor, skip: str | None) -> torch.Tensor:
    """``module(x)`` with every active peft adapter except ``skip``.

    ``skip=None`` (reference tokens) is the plain call: every active adapter acts, as in stock
    diffusers. ``skip=<reference adapter>`` (text and target tokens) leaves out that one adapter
    and no other: a style LoRA the user loaded acts on these tokens exactly as in stock diffusers.
    Without another active adapter this is the base layer alone (the common case, no extra work);
    with one, it is peft's own `Linear.forward` with the reference adapter left out of the loop
    (same operations in the same order, so it equals stock bit for bit).
    """
    if skip is None:
        return module(x)
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or skip not in lora_a:
        return module(x)  # a module without the reference adapter: as stock
    if getattr(module, "merged", False):
        raise ValueError(
            f"Expected unmerged LoRA adapters on the modules the reference adapter {skip!r} adapts, but "
            f"{sorted(module.merged_adapters)} are merged into a base layer: the forward cannot route merged "
            "weights per stream. Unmerge them (diffusers `unfuse_lora()`, peft `unmerge_adapter()`) first."
        )
    others = [] if module.disable_adapters else [a for a in module.active_adapters if a != skip and a in lora_a]
    base = module.get_base_layer()
    if not others:
        return base(x)
    result = base(x)
    result_dtype = result.dtype
    variants = getattr(module, "lora_variant", {})
    for name in others:  # peft's Linear.forward (peft/tuners/lora/layer.py) without `skip`
        lora_in = lora_a[name]
        cast = getattr(module, "_cast_input_dtype", None)
        x = cast(x, lora_in.weight.dtype) if cast is not None else x.to(lora_in.weight.dtype)
        if name in variants:
            result = variants[name].forward(module, active_adapter=name, x=x, result=result)
        elif getattr(module, "use_dora", {}).get(name, False):
            raise ValueError(f"Expected plain LoRA adapters beside the reference adapter, but {name!r} is DoRA "
                             "and this peft version has no `lora_variant` to run it.")
        else:
            result = result + module.lora_B[name](lora_in(module.lora_dropout[name](x))) * module.scaling[name]
    return result.to(result_dtype)


def _active_adapters(transformer: nn.Module) -> list[str]:
    """The transformer's active peft adapters (none without any adapter)."""
    if not getattr(transformer, "peft_config", None):
        return []
    return list(transformer.active_adapters())


def _activate_with(transformer: nn.Module, previous: Sequence[str], adapter_name: str) -> None:
    """Keeps the adapters that were active before ``adapter_name`` was added active beside it.

    diffusers' ``add_adapter`` and ``load_lora_adapter`` make the new adapter the only active one,
    which would silently switch off a style LoRA the user had loaded. Scales are kept; peft's
    ``set_adapter`` marks active adapters trainable, so the callers set ``requires_grad`` after.
    """
    keep = [name for name in previous if name != adapter_name and name in transformer.peft_config]
    if keep:
        transformer.set_adapter([*keep, adapter_name])


def add_reference_lora(
    transformer: FluxTransformer2DModel,
    rank: int = 128,
    alpha: float | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    dropout: float = 0.0,
    target_modules: str = REFERENCE_LORA_TARGETS,
) -> None:
    """Injects a fresh reference LoRA with peft (through diffusers' ``add_adapter``) and freezes the
    base weights, so only LoRA parameters train.

    Args:
        transformer: the FLUX transformer.
        rank: LoRA rank (paper 128, released training 512).
        alpha: LoRA alpha; default ``rank`` (scale 1, as the released training).
        adapter_name: peft adapter name.
        dropout: LoRA dropout.
        target_modules: a peft regex over full module names; default `REFERENCE_LORA_TARGETS`.

    Example:
        >>> from mosaic_kit.models.testing import tiny_flux_transformer
        >>> transformer = tiny_flux_transformer()
        >>> add_reference_lora(transformer, rank=4)
        >>> trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
        >>> all(".lora_" in n for n in trainable), len(trainable) > 0
        (True, True)
    """
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"Expected `rank` to be a positive int, but got {rank!r}.")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"Expected `alpha` to be a positive number or None, but got {alpha!r}.")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        init_lora_weights=True,
    )
    if adapter_name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"Expected a new adapter name, but the transformer already has an adapter {adapter_name!r}.")
    previous = _active_adapters(transformer)
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=adapter_name)
    adapted = [n for n, m in transformer.named_modules() if adapter_name in getattr(m, "lora_A", {})]
    try:
        _check_routed(adapted)
    except ValueError:
        transformer.delete_adapters(adapter_name)
        if previous:
            transformer.set_adapter(previous)
        raise
    _activate_with(transformer, previous, adapter_name)
    for name, param in transformer.named_parameters():
        param.requires_grad_(f".{adapter_name}." in name and ".lora_" in name)


def reference_lora_state_dict(
    transformer: nn.Module, adapter_name: str = DEFAULT_ADAPTER, scaled: bool = False
) -> dict[str, torch.Tensor]:
    """The reference LoRA weights in diffusers' LoRA layout: ``transformer.<module>.lora_A.weight``
    and ``.lora_B.weight``.

    Args:
        transformer: the FLUX transformer with the adapter.
        adapter_name: which adapter.
        scaled: fold each module's ``alpha / rank`` into ``lora_B`` (what files hold: the released
            code and diffusers apply a file's LoRA with scale 1). Without it, the raw parameters.

    Returns:
        A state dict of detached tensors (on their current device).
    """
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"Expected an adapter named {adapter_name!r} on the transformer, but it has none.")
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    state = {f"transformer.{key}": value.detach() for key, value in state.items()}
    return scale_lora_state(transformer, state, adapter_name) if scaled else state


def scale_lora_state(
    transformer: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, torch.Tensor]:
    """Raw LoRA values (`reference_lora_state_dict` keys) with each module's ``alpha / rank`` of
    adapter ``adapter_name`` folded into ``lora_B``: what LoRA files hold (they apply with scale 1).

    Args:
        transformer: the transformer holding the adapter (its alphas and ranks).
        state: ``transformer.<module>.lora_A/B.weight`` → raw tensor (not modified).
        adapter_name: which adapter's scales.

    Returns:
        A new dict (tensors of modules with a scale of 1 are the same objects).

    Example:
        >>> from mosaic_kit.models.testing import tiny_flux_transformer
        >>> transformer = tiny_flux_transformer()
        >>> add_reference_lora(transformer, rank=4, alpha=2)
        >>> raw = reference_lora_state_dict(transformer)
        >>> key = "transformer.x_embedder.lora_B.weight"
        >>> torch.equal(scale_lora_state(transformer, raw)[key], raw[key] * 0.5)
        True
    """
    state = dict(state)
    for name, module in transformer.named_modules():
        if adapter_name in getattr(module, "lora_A", {}):
            factor = module.lora_alpha[adapter_name] / module.r[adapter_name]
            key = f"transformer.{name}.lora_B.weight"
            if factor != 1 and key in state:
                state[key] = state[key] * factor
    return state


def save_reference_lora(transformer: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Writes the reference LoRA as a diffusers LoRA safetensors file, atomically.

    The file loads with `load_reference_lora`, with diffusers' ``FluxPipeline.load_lora_weights``
    and with the released inference code, all of which apply it with scale 1: ``alpha / rank`` is
    folded into ``lora_B``, so the file means the same thing everywhere.

    Args:
        transformer: the FLUX transformer with the adapter.
        path: destination ``.safetensors`` file.
        adapter_name: which adapter.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> from mosaic_kit.models.testing import tiny_flux_transformer
        >>> transformer = tiny_flux_transformer()
        >>> add_reference_lora(transformer, rank=4)
        >>> path = save_reference_lora(transformer, tempfile.mkdtemp() + "/lora.safetensors")
        >>> other = tiny_flux_transformer()
        >>> load_reference_lora(other, path)
        >>> a = reference_lora_state_dict(transformer); b = reference_lora_state_dict(other)
        >>> sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        True
    """
    return write_lora_file(reference_lora_state_dict(transformer, adapter_name, scaled=True), path)


LORA_DIGEST_KEY = "mosaic_kit.sha256"
"""The safetensors metadata key under which `write_lora_file` records the digest of the tensors
(`lora_state_digest`); `read_lora_file` verifies it when present."""


def lora_state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict: for each key in sorted order, the key, dtype, shape and the
    tensor's bytes (little-endian, row-major, as stored on disk).

    Args:
        state: name → tensor (any device; read once, not modified).

    Returns:
        The hex digest.

    Example:
        >>> a = {"w": torch.ones(2, 3)}
        >>> lora_state_digest(a) == lora_state_digest({"w": torch.ones(2, 3)})
        True
        >>> lora_state_digest(a) == lora_state_digest({"w": torch.ones(3, 2)})
        False
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{str(value.dtype).removeprefix('torch.')}\0{tuple(value.shape)}\0".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_lora_file(state: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Writes a LoRA state dict as safetensors, atomically (`mosaic_kit.utils.atomic_write`:
    temporary file in the same folder, fsync, rename, fsync of the folder), with
    the digest of its tensors (`lora_state_digest`) in the metadata under `LORA_DIGEST_KEY`.

    Args:
        state: ``transformer.<module>.lora_A/B.weight`` → tensor.
        path: destination file.
        metadata: further string metadata to keep in the file (e.g. diffusers' adapter
            metadata); the digest is added to it.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> path = write_lora_file({"transformer.x_embedder.lora_A.weight": torch.ones(2, 64)},
        ...                        tempfile.mkdtemp() + "/lora.safetensors")
        >>> sorted(read_lora_file(path))
        ['transformer.x_embedder.lora_A.weight']
    """
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt", **(metadata or {}), LORA_DIGEST_KEY: lora_state_digest(state)}
    return write_bytes_atomic(path, save(state, metadata=metadata))


_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a LoRA safetensors file (no pickle) and checks it: the digest in its metadata when
    the file has one (files written by `write_lora_file`; the released checkpoint and files
    written by diffusers have none and load as they are), and that every tensor is a finite
    floating-point tensor. Every error names the file.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        name → tensor, on the CPU.

    Raises:
        ValueError: the file is missing, is not safetensors, its tensors do not match its digest
            (damaged bytes), or a tensor is not floating point or holds NaN or inf.

    Example:
        >>> import tempfile
        >>> path = write_lora_file({"transformer.x_embedder.lora_A.weight": torch.ones(2, 64)},
        ...                        tempfile.mkdtemp() + "/lora.safetensors")
        >>> raw = bytearray(path.read_bytes()); raw[-1] ^= 1; _ = path.write_bytes(bytes(raw))
        >>> read_lora_file(path)
        Traceback (most recent call last):
        ...
        ValueError: LoRA file '...lora.safetensors' is damaged: its tensors hash to sha256 ...
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Expected `path` to be an existing LoRA .safetensors file, but got {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"Could not read LoRA file {str(path)!r} as safetensors: {error}") from error
    recorded = metadata.get(LORA_DIGEST_KEY)
    if recorded is not None:
        actual = lora_state_digest(state)
        if actual != recorded:
            raise ValueError(
                f"LoRA file {str(path)!r} is damaged: its tensors hash to sha256 {actual[:16]}…, but the file "
                f"records {recorded[:16]}… (metadata {LORA_DIGEST_KEY!r}). Re-copy or re-save it."
            )
    _check_tensors(state, f"LoRA file {str(path)!r}")
    return state


def _check_tensors(state: dict, source: str) -> None:
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{source}: expected floating-point LoRA tensors, but {key!r} is a {what}.")
        try:
            check_finite(key, value, force=True)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def load_reference_lora(
    transformer: FluxTransformer2DModel,
    path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
    adapter_name: str = DEFAULT_ADAPTER,
    partial: bool = False,
) -> None:
    """Loads a reference LoRA (diffusers layout, any rank) into the transformer through diffusers'
    ``load_lora_adapter`` (peft injection), replacing an adapter of the same name.

    Every key must be ``transformer.<module>.lora_A.weight`` or ``.lora_B.weight`` of a linear
    module of the transformer with matching shapes, and the LoRA must cover every module the
    forward routes per stream (`REFERENCE_LORA_TARGETS`; the inert output projection is
    optional): a file for another model is never half-loaded. A file is read with
    `read_lora_file` (digest verified when recorded, tensors finite). The LoRA applies with scale
    1 (alpha = rank), as released. Adapters that were active before stay active beside it.

    Args:
        transformer: the FLUX transformer.
        path_or_state_dict: a ``.safetensors`` file or a state dict.
        adapter_name: peft adapter name.
        partial: accept a LoRA that covers only some of the routed modules (the others keep
            their base weights on reference tokens). Keys of modules that do not exist or are
            not routed are refused either way.

    Raises:
        ValueError: naming the file (or "the state dict") and what is wrong: unreadable or
            damaged file, non-finite or non-float tensors, malformed keys, wrong shapes,
            modules missing (unless ``partial``) or unexpected; a FLUX.2 LoRA (keys of modules
            only FLUX.2 has) is named as such, with the model it is being loaded into.

    Example:
        >>> from mosaic_kit.models.testing import tiny_flux_transformer
        >>> state = {"transformer.x_embedder.lora_A.weight": torch.zeros(2, 64),
        ...          "transformer.x_embedder.lora_B.weight": torch.zeros(32, 2)}
        >>> load_reference_lora(tiny_flux_transformer(), state)
        Traceback (most recent call last):
        ...
        ValueError: LoRA state dict covers 1 of 25 reference-routed modules ...
        >>> load_reference_lora(tiny_flux_transformer(), state, partial=True)
    """
    if not isinstance(partial, bool):
        raise ValueError(f"Expected `partial` to be a bool, but got {partial!r}.")
    if isinstance(path_or_state_dict, dict):
        source = "LoRA state dict"
        state = dict(path_or_state_dict)
        _check_tensors(state, source)
    else:
        source = f"LoRA file {str(path_or_state_dict)!r}"
        state = read_lora_file(path_or_state_dict)
    if not state:
        raise ValueError(f"{source}: expected `transformer.<module>.lora_A/B.weight` keys, but got none.")
    named = sorted({match["module"] for match in map(_LORA_KEY.match, state) if match is not None})
    made_for = lora_made_for(named)
    if made_for is not None and not made_for[0].startswith("FLUX.1 "):  # a FLUX.2 LoRA: say so, naming both models
        check_lora_fits(state, transformer, source, "FLUX.1")
    modules = dict(transformer.named_modules())
    ranks: dict[str, int] = {}
    malformed, unknown = [], []
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            malformed.append(key)
            continue
        name, part = match["module"], match["part"]
        module = modules.get(name)
        base = None if module is None else _base(module)
        if not isinstance(base, nn.Linear):
            unknown.append(key)
            continue
        if value.ndim != 2:
            raise ValueError(f"{source}: expected a 2-d tensor for {key!r}, but got shape {tuple(value.shape)}.")
        rank = value.shape[0] if part == "A" else value.shape[1]
        expected = (rank, base.in_features) if part == "A" else (base.out_features, rank)
        if tuple(value.shape) != expected:
            raise ValueError(f"{source}: expected {key!r} of shape {expected}, but got {tuple(value.shape)}.")
        if ranks.setdefault(name, rank) != rank:
            raise ValueError(f"{source}: LoRA A and B of {name!r} disagree on the rank.")
    if malformed:
        raise ValueError(
            f"{source}: expected LoRA keys like `transformer.<module>.lora_A.weight`, but got {_listing(malformed)}."
        )
    half = [name for name in ranks if f"transformer.{name}.lora_A.weight" not in state
            or f"transformer.{name}.lora_B.weight" not in state]
    if half:
        raise ValueError(f"{source}: expected both lora_A and lora_B for every module, but {_listing(half)} miss one.")
    routed = re.compile(REFERENCE_LORA_TARGETS)
    targets = [name for name, m in modules.items() if routed.fullmatch(name) and isinstance(_base(m), nn.Linear)]
    missing = [name for name in targets if name not in ranks]
    off_route = sorted(n for n in ranks if not routed.fullmatch(n) and not _INERT_LORA.fullmatch(n))
    if unknown or off_route or (missing and not partial):
        covered = sum(name in ranks for name in targets)
        parts = [f"{source} covers {covered} of {len(targets)} reference-routed modules (REFERENCE_LORA_TARGETS)"]
        if missing and not partial:
            parts.append(f"missing {len(missing)}: {_listing(missing)}")
        if unknown:
            parts.append(f"unexpected, naming no linear module of the transformer: {_listing(unknown)}")
        if off_route:
            parts.append(
                f"unexpected, on modules that are not reference-routed (the forward would apply them to text and "
                f"target tokens too): {_listing(off_route)}"
            )
        hint = " Pass `partial=True` to load a LoRA of some of the routed modules." if missing and not partial else ""
        raise ValueError("; ".join(parts) + "." + hint)
    previous = _active_adapters(transformer)
    if adapter_name in getattr(transformer, "peft_config", {}):
        transformer.delete_adapters(adapter_name)
    transformer.load_lora_adapter(state, prefix="transformer", adapter_name=adapter_name)
    _activate_with(transformer, previous, adapter_name)
    transformer.requires_grad_(False)


def _listing(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return f"[{shown}{', …' if len(names) > limit else ''}]"


def set_reference_lora_scale(transformer: FluxTransformer2DModel, scale: float, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Sets the multiplier of the reference LoRA (1: as trained; 0: references go through the base
    weights only) with peft's per-layer ``set_scale`` and makes sure the adapter is active. Other
    adapters keep their state and scales (diffusers' ``set_adapters([name], ...)`` would switch
    them off).

    Args:
        transformer: the FLUX transformer with the adapter.
        scale: the multiplier (finite).
        adapter_name: which adapter.

    Example:
        >>> from mosaic_kit.models.testing import tiny_flux_transformer
        >>> transformer = tiny_flux_transformer()
        >>> add_reference_lora(transformer, rank=4, alpha=8)
        >>> set_reference_lora_scale(transformer, 0.5)
        >>> transformer.transformer_blocks[0].attn.to_q.scaling["mosaic"]  # 0.5 · alpha / rank
        1.0
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"Expected `scale` to be a finite number, but got {scale!r}.")
    if adapter_name not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"Expected an adapter named {adapter_name!r} on the transformer, but it has none.")
    for module in transformer.modules():
        if adapter_name in getattr(module, "lora_A", {}) and hasattr(module, "set_scale"):
            module.set_scale(adapter_name, float(scale))
    active = _active_adapters(transformer)
    if adapter_name not in active:
        trainable = {name: param.requires_grad for name, param in transformer.named_parameters()}
        transformer.set_adapter([*active, adapter_name])
        for name, param in transformer.named_parameters():  # peft's set_adapter marks adapters trainable
            param.requires_grad_(trainable[name])

# -- ComfyUI key map (`ModelFamily.save_lora(..., format="comfyui")`) ------------------------------
_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."

FLUX1_COMFYUI_KEYS: tuple[ComfyLoraKey, ...] = (
    ComfyLoraKey("img_in", ("x_embedder",)),
    ComfyLoraKey("txt_in", ("context_embedder",)),
    ComfyLoraKey("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ComfyLoraKey("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ComfyLoraKey("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ComfyLoraKey("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ComfyLoraKey("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ComfyLoraKey("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ComfyLoraKey("double_blocks.{i}.img_mod.lin", (_D + "norm1.linear",)),
    ComfyLoraKey("double_blocks.{i}.img_attn.qkv", (_D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v")),
    ComfyLoraKey("double_blocks.{i}.img_attn.proj", (_D + "attn.to_out.0",)),
    ComfyLoraKey("double_blocks.{i}.img_mlp.0", (_D + "ff.net.0.proj",)),
    ComfyLoraKey("double_blocks.{i}.img_mlp.2", (_D + "ff.net.2",)),
    ComfyLoraKey("double_blocks.{i}.txt_mod.lin", (_D + "norm1_context.linear",)),
    ComfyLoraKey("double_blocks.{i}.txt_attn.qkv", (_D + "attn.add_q_proj", _D + "attn.add_k_proj",
                                                   _D + "attn.add_v_proj")),
    ComfyLoraKey("double_blocks.{i}.txt_attn.proj", (_D + "attn.to_add_out",)),
    ComfyLoraKey("double_blocks.{i}.txt_mlp.0", (_D + "ff_context.net.0.proj",)),
    ComfyLoraKey("double_blocks.{i}.txt_mlp.2", (_D + "ff_context.net.2",)),
    ComfyLoraKey("single_blocks.{i}.modulation.lin", (_S + "norm.linear",)),
    ComfyLoraKey("single_blocks.{i}.linear1", (_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp"),
                 widths=("in", "in", "in", "rest")),
    ComfyLoraKey("single_blocks.{i}.linear2", (_S + "proj_out",)),
    ComfyLoraKey("final_layer.linear", ("proj_out",)),
)
"""FLUX.1 (`FluxTransformer2DModel`) modules → the original modules ComfyUI's FLUX model has.

FLUX.1's ComfyUI LoRA key map: the original (BFL) module that ComfyUI runs for each diffusers
module of `FluxTransformer2DModel` (checked against ComfyUI's ``comfy/ldm/flux/layers.py`` and
diffusers' kohya converter ``_convert_kohya_flux_lora_to_diffusers``).

The fused modules: a double block's ``img_attn.qkv`` (``attn.to_q/to_k/to_v``) and
``txt_attn.qkv`` (``attn.add_q/k/v_proj``); a single block's ``linear1``, which computes q, k, v
(the hidden width each) and the MLP input (``proj_mlp``, the rest) in that order. The
modulation linears keep their row order (shift, scale, gate in both layouts). The final layer's
``adaLN_modulation`` is left out: its rows are ordered differently (diffusers swaps scale and
shift) and no mosaic_kit LoRA adapts it.
"""
