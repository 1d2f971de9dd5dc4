"""The LoRA of a model family: its raw parameters and its files, the part of the model boundary
(`mosaic_kit.models.ModelFamily`) that training checkpoints, resume and the LoRA writers use.

`LoraFiles` is a base of `ModelFamily`: every family has these methods; a family implements
`LoraFiles.lora_parameters`, `LoraFiles.save_lora` and `LoraFiles.load_lora` and inherits the rest.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["LoraFiles"]


class LoraFiles(abc.ABC):
    """The LoRA methods of every `mosaic_kit.models.ModelFamily` (a family's ``transformer``
    carries the peft adapter; ``comfyui_lora_keys`` is the family's ComfyUI key map)."""

    comfyui_lora_keys: ClassVar[tuple | None]
    transformer: nn.Module

    @abc.abstractmethod
    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA's parameters by their key in diffusers' LoRA layout
        (``transformer.<module>.lora_A.weight``, ``….lora_B.weight``): raw values, what a training
        checkpoint saves and restores exactly (`load_lora_values`)."""

    def _adapter_lora_parameters(self, adapter: str, description: str) -> dict[str, nn.Parameter]:
        """The parameters of the peft adapter ``adapter`` on `transformer`, keyed as
        `lora_parameters` (``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``): what a
        family's `lora_parameters` returns for its adapter.

        Args:
            adapter: the peft adapter name.
            description: what the error calls the adapter (e.g. ``"reference LoRA"``).

        Returns:
            Key → parameter.

        Raises:
            ValueError: the transformer has no parameters of ``adapter``.
        """
        found = {}
        for name, param in self.transformer.named_parameters():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}.{adapter}.weight"
                if name.endswith(marker):
                    found[f"transformer.{name[: -len(marker)]}.{part}.weight"] = param
        if not found:
            raise ValueError(f"Expected a {description} {adapter!r} on the transformer (`add_lora`), but found none.")
        return found

    def load_lora_values(self, state: dict[str, torch.Tensor], copy: Any = None) -> None:
        """Copies raw LoRA values (keys of `lora_parameters`) into the current LoRA, in place (the
        optimiser keeps its references): what resuming a training run does.

        Args:
            state: key → tensor, exactly the keys of `lora_parameters`.
            copy: ``copy(parameter, value)`` (default ``parameter.copy_(value)``; sharded
                parameters need their own).

        Raises:
            ValueError: the keys or shapes differ from the LoRA's.
        """
        params = self.lora_parameters()
        if set(state) != set(params):
            extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
            raise ValueError(f"Expected the LoRA's {len(params)} keys, but got {len(extra)} unexpected (e.g. "
                             f"{extra[:2]}) and {len(missing)} missing (e.g. {missing[:2]}).")
        with torch.no_grad():
            for key, value in state.items():
                if copy is None:
                    if value.shape != params[key].shape:
                        raise ValueError(f"Expected {key!r} of shape {tuple(params[key].shape)}, but got "
                                         f"{tuple(value.shape)}.")
                    params[key].copy_(value.to(params[key]))
                else:
                    copy(params[key], value)

    @abc.abstractmethod
    def save_lora(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                  format: str = "diffusers") -> Path:
        """Writes the family's LoRA file (atomically; the one writer of the family's format), the
        file its pipeline loads, or the same LoRA in ComfyUI's format; returns the path.

        Args:
            path: the file (or a folder, where the family names the file).
            state_dict: raw LoRA values keyed as `lora_parameters` (e.g. gathered from FSDP
                shards) to write instead of the model's own.
            format: ``"diffusers"`` (the family's own file) or ``"comfyui"`` (the key names
                ComfyUI's LoRA loader reads, `write_comfyui_lora`); see
                `mosaic_kit.models.comfyui.LORA_FORMATS`.

        Raises:
            ValueError: an unknown ``format``.
        """

    def write_comfyui_lora(self, state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
        """Writes a LoRA in ComfyUI's format (`mosaic_kit.models.comfyui.diffusers_to_comfyui`
        with the family's `comfyui_lora_keys`), atomically and with a digest (`write_lora_file`)
        and the family's name (`mosaic_kit.models.LORA_FAMILY_KEY`): what a family's ``save_lora(..., format="comfyui")`` calls.

        Args:
            state: the LoRA in diffusers' layout, applied with scale 1 (``alpha / rank`` folded
                into ``lora_B``): ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``.
            path: the ``.safetensors`` file.

        Returns:
            The path written.

        Raises:
            NotImplementedError: the family declares no ComfyUI key map.
            ValueError: ``path`` is not a ``.safetensors`` file name, or the LoRA does not convert
                (`diffusers_to_comfyui`).
        """
        from ._lora_origin import lora_family_metadata
        from .comfyui import diffusers_to_comfyui
        from .flux.lora import write_lora_file

        if self.comfyui_lora_keys is None:
            raise NotImplementedError(f"{type(self).__name__} declares no ComfyUI key map (`comfyui_lora_keys`): it "
                                      "writes no ComfyUI-format LoRA.")
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"Expected `path` of the ComfyUI LoRA to be a .safetensors file, but got {str(path)!r}.")
        return write_lora_file(diffusers_to_comfyui(state, self.comfyui_lora_keys), path,
                               metadata=lora_family_metadata(self))

    @abc.abstractmethod
    def load_lora(self, path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor], partial: bool = False) -> None:
        """Loads a LoRA file (or state dict) of the family's format, checked, replacing the current one."""
