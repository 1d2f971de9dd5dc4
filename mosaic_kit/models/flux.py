"""FLUX.1 with K reference images: the MOSAIC multi-reference forward (eq. 4-7).

The model is a stock diffusers `FluxTransformer2DModel`; nothing of it is forked or patched.
`MosaicFluxTransformer` holds it, installs `MosaicFluxAttnProcessor` through diffusers'
``set_attn_processor`` and runs the block stack with three token streams:

- **text** (``N_txt`` tokens): ``context_embedder``, the context projections of the double
  blocks, timestep embedding ``(t, guidance, pooled)``;
- **target** (``N_tgt`` tokens, the noisy latent): the base image weights, the same embedding;
- **references** (the K reference latents concatenated, ``N_ref = Σ N^(k)`` tokens): the base
  image weights **plus the reference LoRA** (peft, adapter ``"mosaic"``), their own embedding
  ``(t_ref = 0, guidance_ref, pooled)`` and their own modulation.

Attention (eq. 7): text and target queries attend to every key; the queries of reference k attend
to text, target and reference k only (``reference_attention="isolated"``, as released) or to
everything (``"full"``). This takes two attention calls per block whatever K is: one for text +
target queries and one batched call for all references (references of equal size are folded into
the batch; references of different sizes share one masked call).

The reference LoRA acts on reference tokens only: every adapted linear layer is called through its
``base_layer`` for text and target tokens and through the peft layer for reference tokens, so no
adapter state is toggled during the forward.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attention import RefTargetCapture
from ..correspondence._checks import check_option
from ..correspondence._finite import check_finite

try:  # diffusers and peft are the `flux` extra
    from diffusers import FluxTransformer2DModel
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mosaic_kit.models needs diffusers and peft: install them with `pip install mosaic_kit[flux]`."
    ) from error

REFERENCE_ATTENTION = ("isolated", "full")
"""Allowed values of ``reference_attention``."""

CAPTURE_BLOCKS = ("double", "all")
"""Allowed values of ``capture_blocks``: the double-stream blocks (released) or every block."""

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


# -- packing and position ids -----------------------------------------------------------------------
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Packs VAE latents 2×2 into FLUX tokens, row-major (as diffusers' FLUX pipeline does).

    Args:
        latents: ``(B, C, h, w)`` with even ``h`` and ``w``.

    Returns:
        ``(B, h/2 · w/2, 4C)`` tokens; token ``r · w/2 + c`` holds the 2×2 patch at ``(r, c)``.

    Example:
        >>> latents = torch.randn(2, 16, 8, 6)
        >>> pack_latents(latents).shape
        torch.Size([2, 12, 64])
        >>> torch.equal(unpack_latents(pack_latents(latents), 8, 6), latents)
        True
    """
    if latents.ndim != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"Expected `latents` of shape (B, C, h, w) with even h and w, but got {tuple(latents.shape)}.")
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`.

    Args:
        tokens: ``(B, height/2 · width/2, 4C)``.
        height: latent height ``h`` (even).
        width: latent width ``w`` (even).

    Returns:
        ``(B, C, h, w)`` latents.

    Example:
        >>> unpack_latents(torch.randn(1, 4, 64), 4, 4).shape
        torch.Size([1, 16, 4, 4])
    """
    b, n, d = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(
            f"Expected `tokens` of shape (B, {height // 2}·{width // 2}, 4C) for a {height}×{width} latent, "
            f"but got {tuple(tokens.shape)}."
        )
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(
    token_rows: int, token_cols: int, col_shift: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """FLUX position ids of a packed token grid: ``(0, row, col + col_shift)`` per token, row-major.

    Args:
        token_rows: rows of packed tokens (image height / 16).
        token_cols: columns of packed tokens (image width / 16).
        col_shift: added to the column id (references are shifted left, see
            `reference_position_ids`).
        device: device of the result.

    Returns:
        ``(token_rows · token_cols, 3)`` float ids.

    Example:
        >>> latent_image_ids(2, 3, col_shift=-3)[:, 1:].tolist()
        [[0.0, -3.0], [0.0, -2.0], [0.0, -1.0], [1.0, -3.0], [1.0, -2.0], [1.0, -1.0]]
    """
    rows = torch.arange(token_rows, device=device, dtype=torch.float32)
    cols = torch.arange(token_cols, device=device, dtype=torch.float32) + col_shift
    ids = torch.zeros(token_rows, token_cols, 3, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.view(-1, 3)


def reference_position_ids(
    reference_sizes: Sequence[tuple[int, int]],
    ref_size: int | None = None,
    device: torch.device | str | None = None,
    pixels_per_token: int = 16,
) -> torch.Tensor:
    """Position ids of K references, as released: reference k's plain grid ids shifted along the
    width axis by ``-(ref_size // 16) · (k + 1)``.

    Args:
        reference_sizes: ``(height, width)`` in pixels of each reference (multiples of
            ``pixels_per_token``).
        ref_size: the shift unit in pixels; default: the first reference's width (the released
            code uses its square reference size, 512).
        device: device of the result.
        pixels_per_token: pixels per packed token side (16 for FLUX: 8× VAE, 2×2 packing).

    Returns:
        ``(N_ref, 3)`` float ids of the references concatenated in slot order.

    Example:
        >>> ids = reference_position_ids([(32, 32), (32, 32)])
        >>> ids.shape, ids[:, 2].min().item(), ids[:, 2].max().item()
        (torch.Size([8, 3]), -4.0, -1.0)
    """
    if not reference_sizes:
        raise ValueError("Expected at least one reference size, but got none.")
    if not isinstance(pixels_per_token, int) or pixels_per_token < 1:
        raise ValueError(f"Expected `pixels_per_token` to be a positive int, but got {pixels_per_token!r}.")
    unit_px = pixels_per_token
    sizes = [_check_image_size(f"reference_sizes[{k}]", s, unit_px) for k, s in enumerate(reference_sizes)]
    unit = sizes[0][1] if ref_size is None else ref_size
    if not isinstance(unit, int) or unit <= 0 or unit % unit_px:
        raise ValueError(f"Expected `ref_size` to be a positive multiple of {unit_px}, but got {unit!r}.")
    ids = [
        latent_image_ids(h // unit_px, w // unit_px, -(unit // unit_px) * (k + 1), device)
        for k, (h, w) in enumerate(sizes)
    ]
    return torch.cat(ids)


def _check_image_size(name: str, size: Any, multiple: int = 16) -> tuple[int, int]:
    ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    if not ok or size[0] % multiple or size[1] % multiple:
        raise ValueError(
            f"Expected `{name}` to be (height, width) in pixels, multiples of {multiple}, but got {size!r}."
        )
    return int(size[0]), int(size[1])


# -- reference LoRA -----------------------------------------------------------------------------------
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
    if scaled:
        for name, module in transformer.named_modules():
            if adapter_name in getattr(module, "lora_A", {}):
                factor = module.lora_alpha[adapter_name] / module.r[adapter_name]
                key = f"transformer.{name}.lora_B.weight"
                if factor != 1:
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


def write_lora_file(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Writes a LoRA state dict as safetensors, atomically (temporary file, fsync, rename), with
    the digest of its tensors (`lora_state_digest`) in the metadata under `LORA_DIGEST_KEY`.

    Args:
        state: ``transformer.<module>.lora_A/B.weight`` → tensor.
        path: destination file.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> path = write_lora_file({"transformer.x_embedder.lora_A.weight": torch.ones(2, 64)},
        ...                        tempfile.mkdtemp() + "/lora.safetensors")
        >>> sorted(read_lora_file(path))
        ['transformer.x_embedder.lora_A.weight']
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt", LORA_DIGEST_KEY: lora_state_digest(state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
            modules missing (unless ``partial``) or unexpected.

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


# -- attention ----------------------------------------------------------------------------------------
@dataclass
class ReferenceKVCache:
    """Reference keys and values of every block, computed once with references attending only to
    themselves (`MosaicFluxTransformer.build_reference_cache`).

    Attributes:
        keys: per block (double blocks, then single blocks), ``(B, N_ref, H, D)`` post-RoPE keys.
        values: per block, ``(B, N_ref, H, D)`` values.
        reference_token_counts: tokens per reference.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    reference_token_counts: tuple[int, ...] = ()

    @property
    def batch_size(self) -> int:
        """B of the cached tensors."""
        return self.keys[0].shape[0]


@dataclass
class _Streams:
    """What `MosaicFluxAttnProcessor` needs beyond the stock arguments, for one block call."""

    references: torch.Tensor | None  # (B, N_ref, D_model) normalised reference tokens
    reference_rotary: tuple[torch.Tensor, torch.Tensor] | None
    reference_token_counts: tuple[int, ...]
    text_tokens: int
    reference_attention: str
    capture: bool
    cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values) of the references
    store: tuple[list, list] | None = None  # where a cache build appends (keys, values)
    main_present: bool = True  # False while building a reference cache
    reference_adapter: str = DEFAULT_ADAPTER  # the peft adapter that acts on reference tokens only


@dataclass
class _AttentionOutputs:
    main: torch.Tensor | None  # single blocks: text + target; double blocks: target
    text: torch.Tensor | None  # double blocks only
    references: torch.Tensor | None
    capture_query: torch.Tensor | None  # (B, H, N_ref, D)
    capture_key: torch.Tensor | None  # (B, H, N_tgt, D)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


class MosaicFluxAttnProcessor(FluxAttnProcessor):
    """Attention processor for `FluxAttention` modules that understands the reference stream.

    Installed on every attention module by `MosaicFluxTransformer` with diffusers'
    ``set_attn_processor``. Called without ``mosaic`` (a plain ``transformer(...)`` call) it is the
    stock `FluxAttnProcessor`. Called by the multi-reference forward, it projects each stream with
    its own weights (reference LoRA on reference tokens only), applies RoPE, and attends in two
    calls: text and target queries against all keys, then all reference queries in one batched
    call (keys: text, target and the query's own reference, or everything with
    ``reference_attention="full"``). Attention goes through diffusers' ``dispatch_attention_fn``,
    so ``transformer.set_attention_backend(...)`` selects the kernel.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        mosaic: _Streams | None = None,
    ):
        if mosaic is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if getattr(attn, "fused_projections", False):
            raise ValueError("Expected unfused q/k/v projections with references; call `unfuse_qkv_projections()`.")
        double = encoder_hidden_states is not None or attn.added_kv_proj_dim is not None
        head_dim = attn.head_dim

        main_skip = mosaic.reference_adapter  # text/target tokens: every adapter but the reference one

        def project(x: torch.Tensor, skip: str | None) -> tuple[torch.Tensor, ...]:
            q = attn.norm_q(_heads(_apply(attn.to_q, x, skip), head_dim))
            k = attn.norm_k(_heads(_apply(attn.to_k, x, skip), head_dim))
            v = _heads(_apply(attn.to_v, x, skip), head_dim)
            return q, k, v

        # main stream: text + target (double blocks project text with the context weights)
        q_main = k_main = v_main = None
        if mosaic.main_present:
            q_main, k_main, v_main = project(hidden_states, main_skip)
            if double:
                q_txt = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), head_dim))
                k_txt = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), head_dim))
                v_txt = _heads(attn.add_v_proj(encoder_hidden_states), head_dim)
                q_main, k_main, v_main = (torch.cat(p, dim=1) for p in ((q_txt, q_main), (k_txt, k_main), (v_txt, v_main)))
            if image_rotary_emb is not None:
                q_main = apply_rotary_emb(q_main, image_rotary_emb, sequence_dim=1)
                k_main = apply_rotary_emb(k_main, image_rotary_emb, sequence_dim=1)

        q_ref = k_ref = v_ref = None
        if mosaic.references is not None:
            q_ref, k_ref, v_ref = project(mosaic.references, None)
            if mosaic.reference_rotary is not None:
                q_ref = apply_rotary_emb(q_ref, mosaic.reference_rotary, sequence_dim=1)
                k_ref = apply_rotary_emb(k_ref, mosaic.reference_rotary, sequence_dim=1)
        elif mosaic.cached is not None:
            k_ref, v_ref = mosaic.cached
        if mosaic.store is not None:
            mosaic.store[0].append(k_ref)
            mosaic.store[1].append(v_ref)

        backend, parallel = self._attention_backend, self._parallel_config

        def attend(q, k, v, mask=None):
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend, parallel_config=parallel)
            return out.flatten(2, 3).to(q.dtype)

        main_out, ref_out = self.attend_streams(attend, q_main, k_main, v_main, q_ref, k_ref, v_ref, mosaic)
        capture_query = capture_key = None
        if mosaic.capture:
            capture_query = q_ref.transpose(1, 2)
            capture_key = k_main[:, mosaic.text_tokens :].transpose(1, 2)

        text_out = None
        if double:
            if main_out is not None:
                text_out, main_out = main_out.split_with_sizes(
                    [mosaic.text_tokens, main_out.shape[1] - mosaic.text_tokens], dim=1
                )
                text_out = attn.to_add_out(text_out.contiguous())
                main_out = attn.to_out[1](_apply(attn.to_out[0], main_out.contiguous(), main_skip))
            if ref_out is not None:
                ref_out = attn.to_out[1](_apply(attn.to_out[0], ref_out, None))
        return _AttentionOutputs(main_out, text_out, ref_out, capture_query, capture_key)


    def attend_streams(
        self, attend, q_main, k_main, v_main, q_ref, k_ref, v_ref, mosaic: _Streams
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The attention of one block, ``(B, N, H, D)`` tensors in, ``(B, N, H·D)`` out.

        Text + target queries attend to all keys in one call; all reference queries attend in one
        batched call (see `_reference_attention`). ``q_main`` is None while building a reference
        cache; ``q_ref`` is None without references or with a cache.

        Returns:
            ``(main_out, ref_out)``, each None where its queries are.
        """
        main_out = None
        if q_main is not None:
            keys = k_main if k_ref is None else torch.cat([k_main, k_ref], dim=1)
            values = v_main if v_ref is None else torch.cat([v_main, v_ref], dim=1)
            main_out = attend(q_main, keys, values)
        ref_out = None
        if q_ref is not None:
            ref_out = _reference_attention(
                attend, q_ref, k_ref, v_ref, k_main, v_main, mosaic.reference_token_counts, mosaic.reference_attention
            )
        return main_out, ref_out


def _reference_attention(attend, q_ref, k_ref, v_ref, k_main, v_main, counts, mode):
    """All reference queries in one attention call. ``(B, N, H, D)`` layout throughout."""
    if k_main is None:  # cache build: references attend to themselves only
        shared_k = shared_v = q_ref.new_zeros(q_ref.shape[0], 0, *q_ref.shape[2:])
    else:
        shared_k, shared_v = k_main, v_main
    if mode == "full" and k_main is not None:
        return attend(q_ref, torch.cat([shared_k, k_ref], dim=1), torch.cat([shared_v, v_ref], dim=1))
    batch, heads, dim = q_ref.shape[0], q_ref.shape[2], q_ref.shape[3]
    num_refs = len(counts)
    if len(set(counts)) == 1:  # equal sizes: fold the references into the batch, no mask
        n = counts[0]

        def fold(x):
            return x.reshape(batch * num_refs, n, heads, dim)

        def keys_for(shared, own):
            shared = shared[:, None].expand(-1, num_refs, -1, -1, -1).reshape(batch * num_refs, -1, heads, dim)
            return torch.cat([shared, fold(own)], dim=1)

        out = attend(fold(q_ref), keys_for(shared_k, k_ref), keys_for(shared_v, v_ref))
        return out.reshape(batch, num_refs * n, -1)
    # different sizes: one call over [shared, all references] with a block mask
    owner = torch.repeat_interleave(torch.arange(num_refs, device=q_ref.device), torch.tensor(counts, device=q_ref.device))
    allowed = torch.cat(
        [torch.ones(owner.numel(), shared_k.shape[1], dtype=torch.bool, device=q_ref.device), owner[:, None] == owner[None, :]],
        dim=1,
    )
    return attend(q_ref, torch.cat([shared_k, k_ref], dim=1), torch.cat([shared_v, v_ref], dim=1), allowed[None, None])


# -- the multi-reference transformer ------------------------------------------------------------------
def _ada_norm(norm: nn.Module, x: torch.Tensor, emb: torch.Tensor, chunks: int, skip: str | None) -> list[torch.Tensor]:
    """diffusers' AdaLayerNormZero(Single) with the modulation linear called per stream."""
    params = _apply(norm.linear, norm.silu(emb), skip).chunk(chunks, dim=1)
    shift, scale = params[0], params[1]
    return [norm.norm(x) * (1 + scale[:, None]) + shift[:, None], *params[2:]]


def _feed_forward(ff: nn.Module, x: torch.Tensor, skip: str | None) -> torch.Tensor:
    for module in ff.net:
        x = _apply(module, x, skip)
    return x


def _clip_fp16(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.clip(-65504, 65504) if x is not None and x.dtype == torch.float16 else x


class MosaicFluxTransformer(nn.Module):
    """A stock `FluxTransformer2DModel` run with K reference images (eq. 4-7).

    Holding the transformer as ``self.transformer`` keeps its weights, adapters, gradient
    checkpointing and attention backend under diffusers' and peft's own APIs; this module only
    adds the multi-reference forward. With no references its output equals the stock forward.

    Args:
        transformer: a diffusers `FluxTransformer2DModel` (e.g. ``from_pretrained(...,
            subfolder="transformer")``), with or without the reference LoRA.
        reference_attention: ``"isolated"`` (released: a reference attends to text, target and
            itself) or ``"full"`` (references also attend to each other).
        reference_timestep: the timestep of reference tokens (released: 0, clean).
        capture_blocks: which blocks feed a `RefTargetCapture`: ``"double"`` (released) or
            ``"all"``.
        reference_adapter: the peft adapter name of the reference LoRA, the one adapter that
            acts on reference tokens only. Any other active adapter (a style LoRA loaded with
            ``load_lora_weights`` or ``add_adapter``) acts on every token, as in stock diffusers.

    Example:
        >>> from mosaic_kit.models.testing import tiny_flux_transformer, random_packed_inputs
        >>> model = MosaicFluxTransformer(tiny_flux_transformer())
        >>> inputs = random_packed_inputs(model.transformer, batch=2, target_size=(32, 32),
        ...                               reference_sizes=[(32, 32), (16, 32)])
        >>> model(**inputs).shape  # (B, N_tgt, C): one prediction per target token
        torch.Size([2, 4, 64])
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        reference_attention: str = "isolated",
        reference_timestep: float = 0.0,
        capture_blocks: str = "double",
        reference_adapter: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if not isinstance(reference_adapter, str) or not reference_adapter:
            raise ValueError(f"Expected `reference_adapter` to be a non-empty string, but got {reference_adapter!r}.")
        if not isinstance(transformer, FluxTransformer2DModel):
            raise ValueError(f"Expected `transformer` to be a FluxTransformer2DModel, but got {type(transformer).__name__}.")
        check_option("reference_attention", reference_attention, REFERENCE_ATTENTION)
        check_option("capture_blocks", capture_blocks, CAPTURE_BLOCKS)
        if not isinstance(reference_timestep, (int, float)) or not 0 <= reference_timestep <= 1:
            raise ValueError(f"Expected `reference_timestep` in [0, 1], but got {reference_timestep!r}.")
        self.transformer = transformer
        self.reference_attention = reference_attention
        self.reference_timestep = float(reference_timestep)
        self.capture_blocks = capture_blocks
        self.reference_adapter = reference_adapter
        processor = MosaicFluxAttnProcessor()
        previous = next(iter(transformer.attn_processors.values()), None)
        for name in ("_attention_backend", "_parallel_config"):  # keep a backend chosen before wrapping
            setattr(processor, name, getattr(previous, name, None))
        transformer.set_attn_processor(processor)

    # -- embeddings ----------------------------------------------------------------------------------
    def _embed_time(self, timestep, guidance, pooled, dtype) -> torch.Tensor:
        t = self.transformer
        timestep = timestep.to(dtype) * 1000
        if t.config.guidance_embeds:
            if guidance is None:
                raise ValueError("Expected `guidance` for a guidance-distilled transformer (guidance_embeds=True).")
            return t.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)
        return t.time_text_embed(timestep, pooled)

    def _reference_embedding(self, batch, pooled, guidance, reference_guidance, dtype, device) -> torch.Tensor:
        ref_t = torch.full((batch,), self.reference_timestep, device=device)
        if reference_guidance is None:
            ref_g = guidance
        else:
            ref_g = torch.as_tensor(reference_guidance, device=device, dtype=torch.float32).expand(batch)
        return self._embed_time(ref_t, ref_g, pooled, dtype)

    # -- blocks --------------------------------------------------------------------------------------
    def _double_block(self, block, text, target, refs, temb, temb_ref, streams: _Streams, rotary):
        if streams.main_present:
            n_target, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_norm(block.norm1, target, temb, 6, streams.reference_adapter)
            n_text, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text, emb=temb)
        else:
            n_target = n_text = None
        streams.references = None
        if refs is not None:
            n_refs, r_gate_msa, r_shift_mlp, r_scale_mlp, r_gate_mlp = _ada_norm(block.norm1, refs, temb_ref, 6, None)
            streams.references = n_refs
        out: _AttentionOutputs = block.attn(
            hidden_states=n_target, encoder_hidden_states=n_text, image_rotary_emb=rotary, mosaic=streams
        )
        if streams.main_present:
            target = target + gate_msa.unsqueeze(1) * out.main
            normed = block.norm2(target) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            target = target + gate_mlp.unsqueeze(1) * _feed_forward(block.ff, normed, streams.reference_adapter)
            text = text + c_gate_msa.unsqueeze(1) * out.text
            normed = block.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            text = _clip_fp16(text + c_gate_mlp.unsqueeze(1) * block.ff_context(normed))
        if refs is not None:
            refs = refs + r_gate_msa.unsqueeze(1) * out.references
            normed = block.norm2(refs) * (1 + r_scale_mlp[:, None]) + r_shift_mlp[:, None]
            refs = refs + r_gate_mlp.unsqueeze(1) * _feed_forward(block.ff, normed, None)
        return text, target, refs, out.capture_query, out.capture_key

    def _single_block(self, block, text, target, refs, temb, temb_ref, streams: _Streams, rotary):
        def mlp_and_out(attn_out, normed, gate, residual, skip):
            mlp = block.act_mlp(_apply(block.proj_mlp, normed, skip))
            merged = torch.cat([attn_out, mlp], dim=2)
            return _clip_fp16(residual + gate.unsqueeze(1) * _apply(block.proj_out, merged, skip))

        main = normed_main = None
        if streams.main_present:
            main = torch.cat([text, target], dim=1)
            normed_main, gate = _ada_norm(block.norm, main, temb, 3, streams.reference_adapter)
        streams.references = None
        if refs is not None:
            normed_refs, r_gate = _ada_norm(block.norm, refs, temb_ref, 3, None)
            streams.references = normed_refs
        out: _AttentionOutputs = block.attn(hidden_states=normed_main, image_rotary_emb=rotary, mosaic=streams)
        if streams.main_present:
            main = mlp_and_out(out.main, normed_main, gate, main, streams.reference_adapter)
            text, target = main[:, : streams.text_tokens], main[:, streams.text_tokens :]
        if refs is not None:
            refs = mlp_and_out(out.references, normed_refs, r_gate, refs, None)
        return text, target, refs, out.capture_query, out.capture_key

    def _run_block(self, kind, block, *args):
        fn = self._double_block if kind == "double" else self._single_block
        t = self.transformer
        if torch.is_grad_enabled() and t.gradient_checkpointing:
            return t._gradient_checkpointing_func(lambda *a: fn(block, *a), *args)
        return fn(block, *args)

    # -- public --------------------------------------------------------------------------------------
    def forward(
        self,
        target_tokens: torch.Tensor,
        text_embeddings: torch.Tensor,
        pooled_embeddings: torch.Tensor,
        timestep: torch.Tensor,
        target_ids: torch.Tensor,
        text_ids: torch.Tensor,
        reference_tokens: torch.Tensor | None = None,
        reference_ids: torch.Tensor | None = None,
        reference_token_counts: Sequence[int] | None = None,
        guidance: torch.Tensor | None = None,
        reference_guidance: float | torch.Tensor | None = None,
        capture: RefTargetCapture | list | None = None,
        reference_cache: ReferenceKVCache | None = None,
    ) -> torch.Tensor:
        """The multi-reference forward on packed inputs: the one path shared by training,
        inference and outside checks.

        Args:
            target_tokens: ``(B, N_tgt, C_in)`` packed noisy target latents (`pack_latents`).
            text_embeddings: ``(B, N_txt, D_joint)`` T5 embeddings.
            pooled_embeddings: ``(B, D_pooled)`` CLIP pooled embedding.
            timestep: ``(B,)`` flow-matching time in ``[0, 1]`` (the stock forward's convention;
                it is multiplied by 1000 inside).
            target_ids: ``(N_tgt, 3)`` target position ids (`latent_image_ids`).
            text_ids: ``(N_txt, 3)`` text position ids (zeros in FLUX).
            reference_tokens: ``(B, N_ref, C_in)`` the K packed clean reference latents
                concatenated in slot order, or None.
            reference_ids: ``(N_ref, 3)`` their position ids (`reference_position_ids`).
            reference_token_counts: tokens of each reference (``N^(k)``); default: one reference.
            guidance: ``(B,)`` guidance scale for text and target (guidance-distilled models).
            reference_guidance: guidance for the reference stream; default: ``guidance``
                (released inference uses 1.0).
            capture: a `RefTargetCapture` (or anything with its ``add(query, key)``, or a list of
                them) fed with post-RoPE reference queries and target keys of the blocks chosen by
                ``capture_blocks``.
            reference_cache: reference keys/values from `build_reference_cache` (then
                ``reference_tokens`` must be None; references attend only to themselves).

        Returns:
            ``(B, N_tgt, C_out)`` the velocity prediction for the target tokens.
        """
        t = self.transformer
        _check_tokens("target_tokens", target_tokens, t.config.in_channels)
        batch = target_tokens.shape[0]
        _check_tokens("text_embeddings", text_embeddings, t.config.joint_attention_dim, batch, "D_joint", min_tokens=0)
        _check_ids("target_ids", target_ids, target_tokens.shape[1])
        _check_ids("text_ids", text_ids, text_embeddings.shape[1])
        self._check_conditioning(batch, pooled_embeddings, timestep, guidance, reference_guidance)
        _check_dtype("target_tokens", target_tokens, t.x_embedder)
        _check_dtype("text_embeddings", text_embeddings, t.context_embedder)
        for name, tensor in (("target_tokens", target_tokens), ("text_embeddings", text_embeddings),
                             ("target_ids", target_ids), ("text_ids", text_ids)):
            check_finite(name, tensor)  # behind the `finite_checks` switch: a sync per tensor
        counts = self._check_references(reference_tokens, reference_ids, reference_token_counts, batch)
        if reference_cache is not None:
            if not isinstance(reference_cache, ReferenceKVCache):
                raise ValueError(
                    "Expected `reference_cache` to be a ReferenceKVCache (from `build_reference_cache`), but got "
                    f"{type(reference_cache).__name__}."
                )
            if reference_tokens is not None:
                raise ValueError("Expected `reference_tokens=None` with a `reference_cache` (its keys replace them).")
            if capture is not None:
                raise ValueError("Expected no `capture` with a `reference_cache`: reference queries are not computed.")
            if reference_cache.batch_size not in (1, batch):
                raise ValueError(f"Expected a reference cache of batch 1 or {batch}, but got {reference_cache.batch_size}.")
            counts = reference_cache.reference_token_counts
            blocks = len(t.transformer_blocks) + len(t.single_transformer_blocks)
            if len(reference_cache.keys) != blocks or len(reference_cache.values) != blocks:
                raise ValueError(
                    f"Expected a reference cache with one entry per block ({blocks}), but got {len(reference_cache.keys)}."
                )
        if capture is not None and reference_tokens is None:
            raise ValueError("Expected `reference_tokens` with a `capture`.")
        captures = [] if capture is None else list(capture) if isinstance(capture, (list, tuple)) else [capture]
        for k, each in enumerate(captures):
            if not callable(getattr(each, "add", None)):
                raise ValueError(
                    f"Expected `capture` to be a RefTargetCapture (anything with `add(query, key)`) or a list of them, "
                    f"but {'got' if len(captures) == 1 else f'item {k} is'} {type(each).__name__}."
                )

        target = _apply(t.x_embedder, target_tokens, self.reference_adapter)
        dtype = target.dtype  # as stock: the embedded tokens' dtype (differs from the input's under autocast)
        temb = self._embed_time(timestep, guidance, pooled_embeddings, dtype)
        text = t.context_embedder(text_embeddings)
        rotary = t.pos_embed(torch.cat([text_ids, target_ids]))
        refs = temb_ref = ref_rotary = None
        if reference_tokens is not None:
            refs = t.x_embedder(reference_tokens)
            temb_ref = self._reference_embedding(batch, pooled_embeddings, guidance, reference_guidance, dtype, refs.device)
            ref_rotary = t.pos_embed(reference_ids)

        cache_layers = iter(())
        if reference_cache is not None:
            cache_layers = iter(zip(reference_cache.keys, reference_cache.values))
        for kind, blocks in (("double", t.transformer_blocks), ("single", t.single_transformer_blocks)):
            for block in blocks:
                cached = next(cache_layers, None)
                if cached is not None and cached[0].shape[0] != batch:
                    cached = tuple(c.expand(batch, *c.shape[1:]) for c in cached)
                feed = capture is not None and (kind == "double" or self.capture_blocks == "all")
                streams = _Streams(None, ref_rotary, counts, text.shape[1], self.reference_attention, feed, cached,
                                   reference_adapter=self.reference_adapter)
                text, target, refs, q_cap, k_cap = self._run_block(
                    kind, block, text, target, refs, temb, temb_ref, streams, rotary
                )
                if feed:
                    for each in captures:
                        each.add(q_cap, k_cap)
        return _apply(t.proj_out, t.norm_out(target, temb), self.reference_adapter)

    @torch.no_grad()
    def build_reference_cache(
        self,
        reference_tokens: torch.Tensor,
        reference_ids: torch.Tensor,
        pooled_embeddings: torch.Tensor,
        reference_token_counts: Sequence[int] | None = None,
        guidance: torch.Tensor | None = None,
        reference_guidance: float | torch.Tensor | None = None,
    ) -> ReferenceKVCache:
        """Runs the reference stream alone once (references attend only to themselves) and keeps
        every block's reference keys and values for `forward(reference_cache=...)`.

        A speed/quality trade-off for inference: the reference stream no longer sees the text or
        the current target, so its cost leaves the sampling loop (it does not depend on the step),
        but its features differ from the ones the LoRA was trained with.

        Args:
            reference_tokens: ``(B, N_ref, C_in)`` packed clean reference latents.
            reference_ids: ``(N_ref, 3)`` their position ids.
            pooled_embeddings: ``(B, D_pooled)`` (enters the reference embedding).
            reference_token_counts: tokens per reference.
            guidance: ``(B,)`` used when ``reference_guidance`` is None.
            reference_guidance: the reference stream's guidance (released inference: 1.0).

        Returns:
            The cache.
        """
        t = self.transformer
        _check_tokens("reference_tokens", reference_tokens, t.config.in_channels)
        batch = reference_tokens.shape[0]
        self._check_conditioning(batch, pooled_embeddings, None, guidance, reference_guidance)
        counts = self._check_references(reference_tokens, reference_ids, reference_token_counts, batch)
        refs = t.x_embedder(reference_tokens)
        temb_ref = self._reference_embedding(batch, pooled_embeddings, guidance, reference_guidance, refs.dtype, refs.device)
        ref_rotary = t.pos_embed(reference_ids)
        cache = ReferenceKVCache(reference_token_counts=counts)
        store = (cache.keys, cache.values)
        for kind, blocks in (("double", t.transformer_blocks), ("single", t.single_transformer_blocks)):
            fn = self._double_block if kind == "double" else self._single_block
            for block in blocks:
                streams = _Streams(None, ref_rotary, counts, 0, "isolated", False, None, store, main_present=False,
                                   reference_adapter=self.reference_adapter)
                _, _, refs, _, _ = fn(block, None, None, refs, None, temb_ref, streams, None)
        return cache

    def _check_references(self, reference_tokens, reference_ids, counts, batch) -> tuple[int, ...]:
        if reference_tokens is None:
            if reference_ids is not None or counts:
                raise ValueError("Expected `reference_ids` and `reference_token_counts` only with `reference_tokens`.")
            return ()
        _check_tokens("reference_tokens", reference_tokens, self.transformer.config.in_channels, batch)
        _check_dtype("reference_tokens", reference_tokens, self.transformer.x_embedder)
        check_finite("reference_tokens", reference_tokens)
        total = reference_tokens.shape[1]
        if counts is not None and not isinstance(counts, (tuple, list)):
            raise ValueError(f"Expected `reference_token_counts` to be a tuple of ints, but got {type(counts).__name__}.")
        counts = (total,) if counts is None else tuple(counts)
        if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != total:
            raise ValueError(
                f"Expected `reference_token_counts` of positive ints summing to N_ref = {total}, but got {counts!r}."
            )
        if reference_ids is None:
            raise ValueError("Expected `reference_ids` (N_ref, 3) with `reference_tokens`.")
        _check_ids("reference_ids", reference_ids, total)
        check_finite("reference_ids", reference_ids)
        return counts

    def _check_conditioning(self, batch, pooled, timestep, guidance, reference_guidance) -> None:
        """Shapes of the pooled embedding, timestep and guidance for the batch; the timestep in
        [0, 1] and the guidance finite, in one device sync per forward (not per block)."""
        config = self.transformer.config
        _check_tensor("pooled_embeddings", pooled, (batch, config.pooled_projection_dim), "(B, D_pooled)")
        _check_dtype("pooled_embeddings", pooled, self.transformer.time_text_embed.text_embedder.linear_1)
        check_finite("pooled_embeddings", pooled)
        if timestep is not None:
            _check_tensor("timestep", timestep, (batch,), "(B,)")
        if config.guidance_embeds:
            if guidance is None:
                raise ValueError("Expected `guidance` for a guidance-distilled transformer (guidance_embeds=True).")
            _check_tensor("guidance", guidance, (batch,), "(B,)")
        elif guidance is not None:
            raise ValueError(
                "Expected `guidance=None`: this transformer has no guidance embedding (guidance_embeds=False), "
                f"but got a {type(guidance).__name__}."
            )
        if reference_guidance is not None:
            if isinstance(reference_guidance, torch.Tensor):
                if reference_guidance.shape not in ((), (batch,)) or not reference_guidance.is_floating_point():
                    raise ValueError(
                        f"Expected `reference_guidance` as a float, a 0-d or a ({batch},) float tensor, but got "
                        f"shape {tuple(reference_guidance.shape)} {reference_guidance.dtype}."
                    )
            elif isinstance(reference_guidance, bool) or not isinstance(reference_guidance, (int, float)):
                raise ValueError(f"Expected `reference_guidance` to be a number or a tensor, but got {reference_guidance!r}.")
            elif not math.isfinite(reference_guidance):
                raise ValueError(f"Expected a finite `reference_guidance`, but got {reference_guidance!r}.")
        values = []
        if timestep is not None:
            values.append(((timestep >= 0) & (timestep <= 1)).all())
        if config.guidance_embeds:
            values.append(torch.isfinite(guidance).all())
        if isinstance(reference_guidance, torch.Tensor):
            values.append(torch.isfinite(reference_guidance).all().to(values[0].device) if values else
                          torch.isfinite(reference_guidance).all())
        if values and not bool(torch.stack([v.to(values[0].device) for v in values]).all()):  # the one sync
            if timestep is not None and not bool(((timestep >= 0) & (timestep <= 1)).all()):
                raise ValueError(
                    "Expected `timestep` in [0, 1] (the flow-matching time; the forward multiplies it by 1000 "
                    f"itself, so do not pass 0-1000), but got values in [{timestep.min().item():g}, "
                    f"{timestep.max().item():g}]{' and NaN' if bool(timestep.isnan().any()) else ''}."
                )
            for name, tensor in (("guidance", guidance), ("reference_guidance", reference_guidance)):
                if isinstance(tensor, torch.Tensor):
                    check_finite(name, tensor, force=True)


def _check_tokens(
    name: str, tokens: torch.Tensor, channels: int, batch: int | None = None, what: str = "C_in", min_tokens: int = 1
) -> None:
    ok = isinstance(tokens, torch.Tensor) and tokens.ndim == 3 and tokens.shape[2] == channels
    ok = ok and tokens.shape[0] >= 1 and tokens.shape[1] >= min_tokens and (batch is None or tokens.shape[0] == batch)
    if not ok:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        b = "B ≥ 1" if batch is None else batch
        n = "N" if min_tokens == 0 else f"N ≥ {min_tokens}"
        raise ValueError(f"Expected `{name}` of shape ({b}, {n}, {what} = {channels}), but got {got}.")
    if not tokens.is_floating_point():
        raise ValueError(f"Expected `{name}` to be a floating-point tensor, but got {tokens.dtype}.")


def _check_tensor(name: str, value: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"Expected `{name}` of shape {layout} = {shape}, but got {got}.")
    if not value.is_floating_point():
        raise ValueError(f"Expected `{name}` to be a floating-point tensor, but got {value.dtype}.")


def _check_dtype(name: str, tensor: torch.Tensor, module: nn.Module) -> None:
    """The input's dtype must be the weights' (outside autocast, which casts both itself)."""
    weight = _base(module).weight
    if tensor.dtype != weight.dtype and not torch.is_autocast_enabled(tensor.device.type):
        raise ValueError(
            f"Expected `{name}` in the model's dtype {weight.dtype} (or a torch.autocast region), but got "
            f"{tensor.dtype}; cast it with `.to({weight.dtype})`."
        )


def _check_ids(name: str, ids: torch.Tensor, tokens: int) -> None:
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (tokens, 3):
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"Expected `{name}` of shape ({tokens}, 3), but got {got}.")
