"""ComfyUI-format LoRA files: the key names ComfyUI's LoRA loader reads, from a diffusers-format
LoRA and back, for any family that declares its key map.

ComfyUI runs the original (BFL-layout) checkpoints: its FLUX.1 and FLUX.2 models keep the
original module names (``double_blocks.0.img_attn.qkv``, ``single_blocks.0.linear1``, ...), where
one linear computes what diffusers splits into several (the fused q/k/v; FLUX.1's single-block
``linear1`` is q, k, v and the MLP input). ComfyUI's loader (``comfy/lora.py``,
``model_lora_keys_unet``) maps ``lora_unet_<module with "." replaced by "_">`` to every weight of
the model and reads ``<name>.lora_down.weight`` ``(r, in)``, ``<name>.lora_up.weight``
``(out, r)`` and an optional scalar ``<name>.alpha``, adding ``alpha / r · up @ down`` to the
weight (kohya's layout, which sd-scripts, musubi-tuner and ai-toolkit also write and diffusers'
``lora_state_dict`` reads through its kohya converters).

A diffusers LoRA on the parts of a fused module becomes one LoRA on the fused module, exactly:
the parts' ``lora_A`` are stacked (rank ``n·r``) and their ``lora_B`` placed block-diagonally,
so ``up @ down`` is the parts' ``B @ A`` stacked in the fused module's output order. That is the
layout diffusers' kohya converters recognise ("sparse" up weights) and split back into the very
same tensors; `comfyui_to_diffusers` does the same.

- `ComfyLoraKey`: one entry of a family's key map (a BFL module and the diffusers modules it fuses).
- `diffusers_to_comfyui`, `comfyui_to_diffusers`: the conversion, both ways.
- `comfyui_lora_name`: ``lora_unet_`` + the module name with ``_`` for ``.``.
- `LORA_FORMATS`, `check_lora_format`: the formats ``ModelFamily.save_lora`` writes.

Example (a fused q/k/v of rank 2 each):

    >>> keys = (ComfyLoraKey("double_blocks.{i}.img_attn.qkv",
    ...                      ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
    ...                       "transformer_blocks.{i}.attn.to_v")),)
    >>> state = {f"transformer.transformer_blocks.0.attn.to_{p}.lora_{x}.weight": torch.randn(2, 4) if x == "A"
    ...          else torch.randn(4, 2) for p in "qkv" for x in "AB"}
    >>> comfy = diffusers_to_comfyui(state, keys)
    >>> {k: tuple(v.shape) for k, v in sorted(comfy.items())}
    {'lora_unet_double_blocks_0_img_attn_qkv.alpha': (), 'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight': (6, 4), 'lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight': (12, 6)}
    >>> back = comfyui_to_diffusers(comfy, keys)
    >>> sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    True
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "COMFYUI_PREFIX",
    "LORA_FORMATS",
    "ComfyLoraKey",
    "check_lora_format",
    "comfyui_lora_name",
    "comfyui_to_diffusers",
    "diffusers_to_comfyui",
]

LORA_FORMATS = ("diffusers", "comfyui")
"""The LoRA file formats ``ModelFamily.save_lora(..., format=...)`` writes: ``"diffusers"`` (the
family's own file, what its pipeline loads) and ``"comfyui"`` (`diffusers_to_comfyui`)."""

COMFYUI_PREFIX = "lora_unet_"
"""The prefix ComfyUI's loader gives the LoRA names of the diffusion model's weights."""

_DIFFUSERS_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_COMFY_KEY = re.compile(r"^lora_unet_(?P<name>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def check_lora_format(format: str) -> str:
    """Checks a LoRA ``format`` against `LORA_FORMATS`.

    Example:
        >>> check_lora_format("comfyui")
        'comfyui'
        >>> check_lora_format("kohya")
        Traceback (most recent call last):
        ...
        ValueError: Expected `format` to be one of ('diffusers', 'comfyui'), but got 'kohya'.
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"Expected `format` to be one of {LORA_FORMATS}, but got {format!r}.")
    return format


@dataclass(frozen=True)
class ComfyLoraKey:
    """One entry of a family's ComfyUI key map: a module of the original (BFL) layout that ComfyUI
    runs, and the diffusers modules whose outputs it computes, in its output order.

    Attributes:
        comfy: the original module name; ``{i}`` stands for a block index
            (``"double_blocks.{i}.img_attn.qkv"``).
        diffusers: the diffusers module names (same ``{i}``), in the fused output order; one name
            for a module that is not fused.
        widths: how the fused output splits between the parts, one item per part: ``"in"`` (the
            module's input width, e.g. FLUX.1's q/k/v in ``linear1``), ``"rest"`` (what the others
            leave; at most one) ; None: equal parts.

    Example:
        >>> ComfyLoraKey("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",)).name(3)
        'lora_unet_single_blocks_3_linear2'
    """

    comfy: str
    diffusers: tuple[str, ...]
    widths: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        names = self.diffusers
        if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"Expected `diffusers` to be a non-empty tuple of module names, but got {names!r}.")
        object.__setattr__(self, "diffusers", tuple(names))
        if self.widths is not None:
            widths = tuple(self.widths)
            if len(widths) != len(names) or any(w not in ("in", "rest") for w in widths) or widths.count("rest") > 1:
                raise ValueError(f"Expected `widths` to give 'in' or 'rest' (at most one) for each of the {len(names)} "
                                 f"parts, but got {self.widths!r}.")
            object.__setattr__(self, "widths", widths)

    def name(self, index: str | int | None) -> str:
        """The ComfyUI LoRA name of this module in block ``index``."""
        return comfyui_lora_name(self.comfy.replace("{i}", str(index)))

    def split(self, out_features: int, in_features: int) -> list[int]:
        """The output widths of the parts of a fused module of ``out_features`` outputs.

        Raises:
            ValueError: the width does not split that way.
        """
        n = len(self.diffusers)
        if self.widths is None:
            if out_features % n:
                raise ValueError(f"Expected the {out_features} outputs of {self.comfy!r} to split into {n} equal parts.")
            return [out_features // n] * n
        fixed = sum(in_features for w in self.widths if w == "in")
        rest = out_features - fixed
        if rest < 0 or ("rest" not in self.widths and rest):
            raise ValueError(f"Expected {self.comfy!r} to have {fixed} outputs{' or more' if 'rest' in self.widths else ''}"
                             f", but its LoRA has {out_features}.")
        return [in_features if w == "in" else rest for w in self.widths]


def comfyui_lora_name(module: str) -> str:
    """ComfyUI's LoRA name of an original-layout module: ``lora_unet_`` + the name with ``_`` for ``.``.

    Example:
        >>> comfyui_lora_name("double_blocks.0.img_attn.qkv")
        'lora_unet_double_blocks_0_img_attn_qkv'
    """
    return COMFYUI_PREFIX + module.replace(".", "_")


def _pattern(template: str, separator: str) -> re.Pattern:
    parts = [re.escape(p.replace(".", separator)) for p in template.split("{i}")]
    return re.compile("^" + r"(\d+)".join(parts) + "$")


def _match(name: str, key_map: Sequence[ComfyLoraKey], separator: str, diffusers: bool):
    """The (entry, part, block index) whose template matches ``name``, or None."""
    for entry in key_map:
        templates = entry.diffusers if diffusers else (entry.comfy,)
        for part, template in enumerate(templates):
            found = _pattern(template, separator).fullmatch(name)
            if found:
                return entry, part, (found.group(1) if found.groups() else None)
    return None


def _check_key_map(key_map: Sequence[ComfyLoraKey]) -> tuple[ComfyLoraKey, ...]:
    entries = tuple(key_map) if not isinstance(key_map, (str, ComfyLoraKey)) else ()
    if not entries or not all(isinstance(e, ComfyLoraKey) for e in entries):
        raise ValueError(f"Expected `key_map` to be a non-empty sequence of ComfyLoraKey, but got {key_map!r}.")
    return entries


def diffusers_to_comfyui(state: Mapping[str, torch.Tensor], key_map: Sequence[ComfyLoraKey]) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA (applied with scale 1: ``alpha / rank`` already in ``lora_B``) in
    ComfyUI's format.

    Each module becomes ``lora_unet_<original name>`` with ``.lora_down.weight`` (the parts'
    ``lora_A`` stacked), ``.lora_up.weight`` (their ``lora_B`` block-diagonal) and ``.alpha`` (the
    written rank, so ComfyUI's ``alpha / rank`` is 1). The tensors keep their dtype.

    Args:
        state: ``transformer.<module>.lora_A.weight`` ``(r, in)`` and ``….lora_B.weight``
            ``(out, r)``, both for every module.
        key_map: the family's `ComfyLoraKey` entries.

    Returns:
        The ComfyUI state dict (new tensors; ``state`` is not modified).

    Raises:
        ValueError: a key that is not a diffusers LoRA key, a module the key map does not name,
            a module without both ``lora_A`` and ``lora_B``, a fused module with only some of
            its parts (ComfyUI applies one LoRA to the whole fused weight), or parts of different
            ranks or input widths.
    """
    entries = _check_key_map(key_map)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        found = _DIFFUSERS_KEY.fullmatch(key) if isinstance(key, str) else None
        if found is None:
            raise ValueError(f"Expected diffusers LoRA keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`, "
                             f"but got {key!r}.")
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise ValueError(f"Expected {key!r} to be a 2-d tensor, but got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}.")
        modules.setdefault(found["module"], {})[found["part"]] = value
    half = sorted(m for m, parts in modules.items() if set(parts) != {"A", "B"})
    if half:
        raise ValueError(f"Expected both lora_A and lora_B for every module, but {half[:4]} miss one.")
    groups: dict[tuple[int, str | None], dict[int, str]] = {}
    unknown = []
    for module in modules:
        found = _match(module, entries, ".", diffusers=True)
        if found is None:
            unknown.append(module)
            continue
        entry, part, index = found
        groups.setdefault((entries.index(entry), index), {})[part] = module
    if unknown:
        raise ValueError(f"Expected LoRA modules the family's ComfyUI key map names, but {sorted(unknown)[:4]} have no "
                         "ComfyUI name (ComfyUI would not load them).")
    out: dict[str, torch.Tensor] = {}
    for (position, index), parts in sorted(groups.items(), key=lambda item: (item[0][0], int(item[0][1] or 0))):
        entry = entries[position]
        names = [template.replace("{i}", str(index)) for template in entry.diffusers]
        missing = [n for k, n in enumerate(names) if k not in parts]
        if missing:
            raise ValueError(
                f"Expected a LoRA on all of {names} (ComfyUI's fused {entry.comfy.replace('{i}', str(index))!r} takes "
                f"one LoRA for all of them), but {missing} have none."
            )
        downs = [modules[n]["A"] for n in names]
        ups = [modules[n]["B"] for n in names]
        if len({d.shape for d in downs}) != 1:
            raise ValueError(f"Expected the parts {names} of a fused module to have one rank and input width, but their "
                             f"lora_A shapes are {[tuple(d.shape) for d in downs]}.")
        bad = [n for n, d, u in zip(names, downs, ups) if u.shape[1] != d.shape[0]]
        if bad:
            raise ValueError(f"Expected lora_B of shape (out, r) matching lora_A (r, in), but {bad} do not match.")
        name = entry.name(index)
        down = torch.cat(downs, dim=0) if len(downs) > 1 else downs[0].clone()
        up = torch.block_diag(*ups) if len(ups) > 1 else ups[0].clone()
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def comfyui_to_diffusers(state: Mapping[str, torch.Tensor], key_map: Sequence[ComfyLoraKey]) -> dict[str, torch.Tensor]:
    """A ComfyUI-format LoRA (as `diffusers_to_comfyui` writes it) back in diffusers' layout,
    applied with scale 1 (a file's ``alpha / rank`` folded into ``lora_B`` when it is not 1).

    Args:
        state: ``lora_unet_<name>.lora_down.weight``, ``.lora_up.weight`` and optional ``.alpha``.
        key_map: the family's `ComfyLoraKey` entries.

    Returns:
        ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` → tensor.

    Raises:
        ValueError: a key the key map does not name, a missing down or up weight, or a fused
            module whose LoRA is not block-diagonal over its parts (written by another tool with
            a shared ``lora_down``: it has no exact per-part LoRA of the same rank).
    """
    entries = _check_key_map(key_map)
    names: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        found = _COMFY_KEY.fullmatch(key) if isinstance(key, str) else None
        if found is None:
            raise ValueError(f"Expected ComfyUI LoRA keys `lora_unet_<name>.lora_down.weight` / `.lora_up.weight` / "
                             f"`.alpha`, but got {key!r}.")
        names.setdefault(found["name"], {})[found["part"]] = value
    out: dict[str, torch.Tensor] = {}
    for name, parts in names.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"Expected lora_down and lora_up for {COMFYUI_PREFIX}{name}, but it has {sorted(parts)}.")
        found = _match(name, entries, "_", diffusers=False)
        if found is None:
            raise ValueError(f"Expected ComfyUI LoRA names the family's key map knows, but got {COMFYUI_PREFIX}{name}.")
        entry, _, index = found
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = down.shape[0]
        n = len(entry.diffusers)
        if rank % n:
            raise ValueError(f"Expected the rank of {COMFYUI_PREFIX}{name} ({rank}) to split over its {n} parts.")
        alpha = parts.get("alpha")
        if alpha is not None and float(alpha) != rank:
            up = up * (float(alpha) / rank)
        part_rank = rank // n
        widths = entry.split(up.shape[0], down.shape[1])
        row = 0
        for k, template in enumerate(entry.diffusers):
            module = template.replace("{i}", str(index))
            cols = slice(k * part_rank, (k + 1) * part_rank)
            block = up[row:row + widths[k]]
            off = torch.cat([block[:, :cols.start], block[:, cols.stop:]], dim=1)
            if off.numel() and bool((off != 0).any()):
                raise ValueError(
                    f"Expected the LoRA of {COMFYUI_PREFIX}{name} to be block-diagonal over its parts {list(entry.diffusers)} "
                    "(as mosaic_kit, kohya and ai-toolkit write fused LoRAs), but it is not: read it with diffusers' "
                    "`lora_state_dict` instead."
                )
            out[f"transformer.{module}.lora_A.weight"] = down[cols].clone()
            out[f"transformer.{module}.lora_B.weight"] = block[:, cols].contiguous()
            row += widths[k]
    return out
