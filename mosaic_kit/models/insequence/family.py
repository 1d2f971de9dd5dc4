"""`InSequenceFamily`: the base of model families whose references sit in the target's token
sequence (FLUX.2, FLUX.1-Kontext, Qwen-Image-Edit-Plus), over a stock diffusers pipeline.

What such families share lives here once; a family adds only its model-specific steps:

- ``encode`` (abstract): targets, prompts and references → `ModelInputs`, through the stock
  pipeline's own encoding steps. It returns `encoded` (this base's constructor of the inputs),
  which puts the batch's `SequenceLayout` (`sequence_layout`: ``[target | ref 1 | … | ref K]``
  as the stock pipelines concatenate them) into the conditioning, so *one* layout goes from
  encoding through ``model_kwargs`` to the capture processors;
- ``_transformer_kwargs`` (abstract): the stock transformer's keyword arguments other than
  ``hidden_states`` and ``img_ids`` (text embeddings, timestep, guidance, ...);
- ``_decode``, ``sample``, ``tiny``, ``from_pretrained`` (abstract, as in `ModelFamily`).

The forward (`InSequenceDenoiser`), the capture, the conditioning keys ``latent_ids``,
``reference_tokens``, ``reference_ids`` and ``sequence_layout``, and the LoRA (one plain peft
adapter ``"mosaic"`` on `lora_targets`, written and read through the stock pipeline's own
``save_lora_weights`` / ``lora_state_dict`` / ``load_lora_into_transformer``, so the stock
``load_lora_weights`` loads the file) are this base's.
"""

from __future__ import annotations

import abc
import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..family import ModelFamily, ModelInputs, TokenLayout, check_trainable
from .denoiser import InSequenceDenoiser
from .install import CaptureProcessors
from .layout import SequenceLayout

__all__ = ["IN_SEQUENCE_ADAPTER", "IN_SEQUENCE_LORA_FILE", "InSequenceFamily", "linear_modules_matching"]

IN_SEQUENCE_ADAPTER = "mosaic"
"""The peft adapter name of an in-sequence family's LoRA (FLUX.1's reference adapter name too, so
checkpoints restore raw values by one name for every family)."""

IN_SEQUENCE_LORA_FILE = "pytorch_lora_weights.safetensors"
"""The file name `InSequenceFamily.save_lora` writes into a folder (diffusers' default weight name)."""


def linear_modules_matching(transformer: nn.Module, targets: Sequence[str]) -> list[str]:
    """The full names of the `torch.nn.Linear` modules whose name ends with one of ``targets``
    (at a ``.`` boundary, or the whole name), in module order.

    Args:
        transformer: any module.
        targets: module-name suffixes.

    Raises:
        ValueError: ``targets`` empty, not strings, or matching no linear module.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> linear_modules_matching(model, ["2"])
        ['2']
    """
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"Expected `targets` to be a non-empty list of module-name suffixes, but got {targets!r}.")
    names = [name for name, module in transformer.named_modules()
             if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"Expected `targets` {list(targets)} to match linear modules of the transformer, but none matched.")
    return names


class InSequenceFamily(ModelFamily):
    """A `ModelFamily` whose references are extra image tokens of the target's sequence, over a
    stock diffusers pipeline (see the module docstring for what a subclass adds).

    Args:
        pipe: the stock pipeline (its ``transformer`` is what trains).
        capture_blocks: ``"all"``, ``"double"`` or a list of block names (`InSequenceDenoiser`).

    Raises:
        ValueError: a pipeline without a `transformer_class_name` transformer, or bad ``capture_blocks``.

    Attributes:
        lora_targets: default LoRA targets, as suffixes of linear module names.
        architecture: the model's name in LoRA errors (``"FLUX.2"``).
        denoiser_class: the `InSequenceDenoiser` (sub)class that `model` is.
        pipeline_class_name: the stock diffusers pipeline `tiny` and `from_pretrained` build.
        transformer_class_name: the diffusers transformer class the pipeline must hold (checked
            by the constructor when set).
        tiny_defaults: constructor options that `tiny` defaults (e.g. a short ``max_sequence_length``).

    Example:
        >>> from mosaic_kit.models.flux2 import Flux2Family
        >>> family = Flux2Family.tiny()
        >>> inputs = family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 2, 3, 16, 16))
        >>> inputs.conditioning["sequence_layout"].ref_index.tolist()  # [target | ref 1 | ref 2]
        [[4, 5]]
    """

    lora_targets: ClassVar[tuple[str, ...]] = ()
    architecture: ClassVar[str] = ""
    denoiser_class: ClassVar[type[InSequenceDenoiser]] = InSequenceDenoiser
    pipeline_class_name: ClassVar[str] = ""
    transformer_class_name: ClassVar[str] = ""
    tiny_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, pipe: Any, capture_blocks: str | Sequence[str] = "all") -> None:
        if self.transformer_class_name:
            import diffusers

            if not isinstance(getattr(pipe, "transformer", None), getattr(diffusers, self.transformer_class_name)):
                raise ValueError(f"Expected `pipe` with a {self.transformer_class_name} ({self.pipeline_class_name}), "
                                 f"but got {type(pipe).__name__}.")
        self.pipe = pipe
        self._model = self.denoiser_class(pipe.transformer, capture_blocks)

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def _pipeline_class(cls, pipeline_class: type | None) -> type:
        if pipeline_class is not None:
            return pipeline_class
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def tiny_components(cls, seed: int, transformer_overrides: dict | None, pixel_space: int | None) -> dict[str, Any]:
        """The keyword arguments of the stock pipeline for tiny random components built in code."""
        raise NotImplementedError(f"{cls.__name__} has no tiny components: override `tiny_components`.")

    @classmethod
    def tiny(cls, seed: int = 0, transformer_overrides: dict | None = None, pixel_space: int | None = None,
             pipeline_class: type | None = None, **options: Any) -> InSequenceFamily:
        """The family over the stock pipeline (`pipeline_class_name`, or ``pipeline_class``) of
        `tiny_components`, progress bars off; ``options`` over `tiny_defaults` go to the constructor,
        except ``quantize`` (a `mosaic_kit.models.quantize.QUANTIZE` setting, default ``"none"``),
        which quantizes the frozen transformer (`mosaic_kit.models.quantize.quantize_transformer`)."""
        from ..quantize import quantize_pipeline_transformer

        quantize = options.pop("quantize", "none")
        components = cls.tiny_components(seed, transformer_overrides, pixel_space)
        pipe = quantize_pipeline_transformer(cls._pipeline_class(pipeline_class)(**components), quantize)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **{**cls.tiny_defaults, **options})

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, torch_dtype: torch.dtype | None = torch.bfloat16,
                        pipeline_class: type | None = None, **options: Any) -> InSequenceFamily:
        """The family over the stock pipeline loaded from ``base`` (a hub id or a local folder);
        ``quantize`` in ``options`` (default ``"none"``) quantizes the transformer while it loads
        (`mosaic_kit.models.quantize.pipeline_quantization_config`)."""
        from ..quantize import quantized_loading_kwargs

        from ..encoders import encoder_loading_kwargs

        extra = quantized_loading_kwargs(options.pop("quantize", "none"), torch_dtype)
        extra.update(encoder_loading_kwargs(cls, options.pop("encoders", True)))  # False: cached conditioning
        pipe = cls._pipeline_class(pipeline_class).from_pretrained(base, torch_dtype=torch_dtype, **extra)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **options)

    @classmethod
    def bare_transformer_class(cls) -> type:
        """The stock transformer class (`transformer_class_name`), see `ModelFamily.bare_transformer_class`."""
        import diffusers

        return getattr(diffusers, cls.transformer_class_name)

    @classmethod
    def bare_denoiser(cls, transformer: nn.Module, rank: int) -> InSequenceDenoiser:
        """`denoiser_class` over ``transformer`` (capture on every block) with the LoRA `add_lora`
        adds (adapter ``"mosaic"`` on `lora_targets`, alpha = rank); see `ModelFamily.bare_denoiser`.

        Example:
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> from mosaic_kit.models.flux2.tiny import TINY_FLUX2_TRANSFORMER_CONFIG
            >>> transformer = Flux2Family.bare_transformer_class()(**TINY_FLUX2_TRANSFORMER_CONFIG)
            >>> model = Flux2Family.bare_denoiser(transformer, rank=2)
            >>> type(model).__name__, sum(".lora_" in n for n, _ in model.named_parameters())
            ('Flux2Denoiser', 32)
        """
        from peft import LoraConfig

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Expected `rank` to be a positive int, but got {rank!r}.")
        names = linear_modules_matching(transformer, cls.lora_targets)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names),
                                adapter_name=IN_SEQUENCE_ADAPTER)
        return cls.denoiser_class(transformer, "all")

    # -- what the callers hold ---------------------------------------------------------------------
    @property
    def model(self) -> InSequenceDenoiser:
        """The `InSequenceDenoiser` (what an accelerator wraps)."""
        return self._model

    @property
    def transformer(self) -> nn.Module:
        """The stock transformer (with the LoRA once added)."""
        return self.pipe.transformer

    @property
    def token_channels(self) -> int:
        """C: channels of a packed latent token (the transformer's ``in_channels``)."""
        return int(self.transformer.config.in_channels)

    def capture_handle(self) -> CaptureProcessors:
        """The capture processors on the chosen blocks (installed on first use)."""
        return self._model.capture_handle()

    # -- encoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, targets: torch.Tensor | None, prompts: Sequence[str], references: torch.Tensor | None = None,
               target_size: tuple[int, int] | None = None) -> ModelInputs:
        """Encodes targets, prompts and references through the stock pipeline's steps: the checked
        layout (`encoding_layout`), then the family's `encode_prompt_items` (given the references
        where `prompt_uses_references`), `encode_image_tokens` of the targets and of every
        reference, and `encoded_inputs`.

        Args:
            targets: ``(B, 3, H, W)`` in ``[0, 1]``, or None for inference (give ``target_size``).
            prompts: B prompts.
            references: ``(B, K, 3, h, w)`` in ``[0, 1]`` (every sample's K slots; a placeholder
                image where a sample has fewer), or None.
            target_size: ``(H, W)`` in pixels when ``targets`` is None.

        Returns:
            `ModelInputs` (`encoded`): ``target`` ``(B, N_tgt, C)`` float32 (None without
            targets), the layout, and the family's ``conditioning``.

        Example:
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> inputs = Flux2Family.tiny().encode(torch.rand(1, 3, 32, 48), ["a cat"])
            >>> grid = inputs.layout.target_grid
            >>> inputs.conditioning["reference_tokens"] is None, (grid.rows, grid.cols)
            (True, (2, 3))
        """
        b, layout = self.encoding_layout(targets, prompts, references, target_size)  # the contract every family shares
        k = len(layout.reference_grids)
        items = self.encode_prompt_items(prompts, references if self.prompt_uses_references else None)
        target = None if targets is None else self.encode_image_tokens(targets)
        refs = self.encode_image_tokens(references.flatten(0, 1)).unflatten(0, (b, k)) if k else None
        return self.encoded_inputs(items, target, refs, layout)

    def encoding_layout(self, targets: torch.Tensor | None, prompts: Sequence[str], references: torch.Tensor | None,
                        target_size: tuple[int, int] | None) -> tuple[int, TokenLayout]:
        """Checks what `encode` gets (`check_encode_inputs`; ``target_size`` needed without
        targets) and returns B and the token layout.

        Example:
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> b, layout = Flux2Family.tiny().encoding_layout(None, ["a", "b"], None, (32, 48))
            >>> b, layout.target_grid.num_tokens
            (2, 6)
        """
        if targets is None and target_size is None:
            raise ValueError("Expected `targets` or `target_size`, but got neither.")
        self.check_encode_inputs(targets, prompts, references)
        b, size = (len(prompts), target_size) if targets is None else (targets.shape[0], tuple(targets.shape[-2:]))
        sizes = [] if references is None else [tuple(references.shape[-2:])] * references.shape[1]
        return b, self.token_layout(size, sizes)

    def _encode_batch(self, batch: Any) -> ModelInputs:
        """`encode` of a checked `mosaic_kit.data.MosaicBatch` (targets, captions, references)."""
        return self.encode(batch.targets, list(batch.captions), batch.references)

    def sequence_layout(self, layout: TokenLayout) -> SequenceLayout:
        """Where the target and each reference sit in the transformer's image stream,
        ``[target | ref 1 | … | ref K]`` as the stock pipelines concatenate them.

        Raises:
            ValueError: a layout without references.

        Example:
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> family = Flux2Family.tiny()
            >>> family.sequence_layout(family.token_layout((32, 32), [(16, 16), (16, 16)])).ref_index.tolist()
            [[4, 5]]
        """
        if not layout.reference_grids:
            raise ValueError("Expected a `layout` with references, but got none.")
        return SequenceLayout.concatenated(layout.target_grid.num_tokens, layout.reference_token_counts)

    def encoded(self, conditioning: dict[str, Any], layout: TokenLayout, target: torch.Tensor | None,
                batch_size: int) -> ModelInputs:
        """The `ModelInputs` of an encoded batch, with ``conditioning["sequence_layout"]`` (None
        without references) added: the one layout the forward and the capture use.

        Args:
            conditioning: at least ``latent_ids``, ``reference_tokens`` and ``reference_ids`` (the
                last two None without references; both ids None for a transformer that takes no
                ``img_ids``, e.g. Qwen-Image's ``img_shapes``), plus the family's own entries.
            layout: the token layout.
            target: ``(B, N_tgt, C)`` float32 clean target tokens, or None.
            batch_size: B.
        """
        sequence = self.sequence_layout(layout) if layout.reference_grids else None
        return ModelInputs(conditioning={**conditioning, "sequence_layout": sequence}, layout=layout, target=target,
                           batch_size=batch_size)

    # -- the forward -------------------------------------------------------------------------------
    def embedded_guidance(self, guidance: float | torch.Tensor | None, default: float,
                          noisy: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` float32 guidance for a transformer with a guidance embedding (``guidance``, or
        ``default`` when None), as the stock pipelines pass it; None for one without."""
        if not self.transformer.config.get("guidance_embeds", False):
            return None
        value = default if guidance is None else guidance
        return torch.as_tensor(value, dtype=torch.float32, device=noisy.device).expand(noisy.shape[0])

    @abc.abstractmethod
    def _transformer_kwargs(self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
                            guidance: float | torch.Tensor | None) -> dict[str, Any]:
        """The stock transformer's keyword arguments besides ``hidden_states`` and ``img_ids``."""

    def _model_kwargs(self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
                      guidance: float | torch.Tensor | None = None) -> dict[str, Any]:
        """The `InSequenceDenoiser`'s keyword arguments (inputs checked by `ModelFamily.model_kwargs`):
        ``hidden_states`` ``[target | refs]`` in the model's dtype, ``img_ids`` (target ids, then
        the references'; left out when ``latent_ids`` is None), the ``sequence_layout`` and the
        family's `_transformer_kwargs`."""
        cond, dtype = inputs.conditioning, self.transformer.dtype
        hidden, ids = noisy.to(dtype), cond["latent_ids"]
        if cond["reference_tokens"] is not None:
            hidden = torch.cat([hidden, cond["reference_tokens"].to(dtype)], dim=1)
            ids = None if ids is None else torch.cat([ids, cond["reference_ids"]], dim=-2)
        positions = {} if ids is None else {"img_ids": ids}
        return {"hidden_states": hidden, **positions, **self._transformer_kwargs(inputs, noisy, timestep, guidance),
                "sequence_layout": cond["sequence_layout"]}

    # -- the LoRA: one plain peft adapter ----------------------------------------------------------
    def add_lora(self, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None,
                 init: str | bool = True) -> list[str]:
        """Adds a peft LoRA (adapter ``"mosaic"``) on the linear modules named by ``targets``.

        Args:
            rank: LoRA rank.
            alpha: LoRA alpha (None: ``rank``, scale 1).
            targets: module-name suffixes (None: `lora_targets`).
            init: peft's ``init_lora_weights`` (True: B = 0; False: random B, for tests).

        Returns:
            The full names of the wrapped modules.

        Example:
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> len(Flux2Family.tiny().add_lora(rank=4))  # 12 in the double block, 2 in each single block
            16
        """
        from peft import LoraConfig

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Expected `rank` to be a positive int, but got {rank!r}.")
        names = linear_modules_matching(self.transformer, self.lora_targets if targets is None else targets)
        config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=names,
                            init_lora_weights=init)
        self.transformer.add_adapter(config, adapter_name=IN_SEQUENCE_ADAPTER)
        return names

    def trainable_parameters(self, trainable: str = "lora") -> list[nn.Parameter]:
        """The transformer's parameters that train for ``trainable`` (``"lora"`` or ``"all"``), in module order.

        Example:
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2)
            >>> len(family.trainable_parameters("lora")), len(family.trainable_parameters("all")) > 32
            (32, True)
        """
        check_trainable(trainable)
        params = [p for name, p in self.transformer.named_parameters() if trainable == "all" or ".lora_" in name]
        if not params:
            raise ValueError("Expected trainable parameters, but found none (add a LoRA first with `add_lora`).")
        return params

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights of adapter ``"mosaic"`` without the ``transformer.`` prefix (peft's
        ``get_peft_model_state_dict``)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer, adapter_name=IN_SEQUENCE_ADAPTER)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA's parameters by their file key (``transformer.<module>.lora_A.weight``).

        Example:
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2, targets=["to_q"])
            >>> sorted(family.lora_parameters())[0]
            'transformer.transformer_blocks.0.attn.to_q.lora_A.weight'
        """
        return self._adapter_lora_parameters(IN_SEQUENCE_ADAPTER, "LoRA adapter")

    def save_lora(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                  format: str = "diffusers") -> Path:
        """Writes the LoRA, atomically and durably: the family's one writer of LoRA files.

        ``format="diffusers"``: through the stock pipeline's ``save_lora_weights`` (diffusers'
        layout, keys ``transformer.<module>.lora_A.weight``, with the adapter metadata so a reload
        keeps ``lora_alpha``, and the family options it trains with, `family_options_metadata`),
        then rewritten with mosaic_kit's digest added (`write_lora_file`:
        `load_lora` refuses a file whose tensors changed; stock ``load_lora_weights`` ignores the
        digest). ``format="comfyui"``: the same LoRA with ``alpha / rank`` folded in, in the key
        names ComfyUI's LoRA loader reads (`write_comfyui_lora` with the family's
        `comfyui_lora_keys`).

        Args:
            path: a ``.safetensors`` file, or a folder (the file is then ``pytorch_lora_weights.safetensors``;
                ComfyUI: a ``.safetensors`` file name is required).
            state_dict: raw values keyed as `lora_parameters` (e.g. gathered from FSDP shards).
            format: ``"diffusers"`` or ``"comfyui"`` (`mosaic_kit.models.comfyui.LORA_FORMATS`).

        Returns:
            The path of the written file.

        Raises:
            ValueError: no LoRA on the transformer, an unknown ``format``, or ``"comfyui"`` for a
                family without a key map.

        Example:
            >>> import tempfile
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2)
            >>> family.save_lora(tempfile.mkdtemp()).name
            'pytorch_lora_weights.safetensors'
        """
        from safetensors import safe_open

        from ..comfyui import check_lora_format
        from .._lora_origin import lora_family_metadata
        from ..flux.lora import scale_lora_state, write_lora_file
        from ..options import family_options_metadata

        check_lora_format(format)
        peft_config = getattr(self.transformer, "peft_config", {}).get(IN_SEQUENCE_ADAPTER)
        if peft_config is None:
            raise ValueError(f"Expected a LoRA adapter {IN_SEQUENCE_ADAPTER!r} on the transformer (`add_lora`), "
                             f"but found none.")
        if format == "comfyui":
            raw = self.lora_parameters() if state_dict is None else state_dict
            raw = {k if k.startswith("transformer.") else f"transformer.{k}": v.detach().to("cpu") for k, v in raw.items()}
            return self.write_comfyui_lora(scale_lora_state(self.transformer, raw, IN_SEQUENCE_ADAPTER), path)
        path = Path(path)
        file = path if path.suffix == ".safetensors" else path / IN_SEQUENCE_LORA_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state = self.lora_state_dict()
        else:
            state = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        with tempfile.TemporaryDirectory(dir=file.parent, prefix=".tmp-lora-") as scratch:
            # the stock pipeline lays out the keys and its adapter metadata; the file is then
            # rewritten with mosaic_kit's digest added (`read_lora_file` and `load_lora` verify it)
            type(self.pipe).save_lora_weights(scratch, transformer_lora_layers=state, weight_name=file.name,
                                              transformer_lora_adapter_metadata=peft_config.to_dict())
            with safe_open(Path(scratch) / file.name, framework="pt") as written:
                tensors = {key: written.get_tensor(key) for key in written.keys()}
                metadata = written.metadata() or {}
        return write_lora_file(tensors, file, metadata={**metadata, **family_options_metadata(self),
                                                         **lora_family_metadata(self)})

    def load_lora(self, path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor], partial: bool = False) -> None:
        """Loads a LoRA of the stock layout (a file, a folder, a hub id, or a state dict).

        A local ``.safetensors`` file is first read with `mosaic_kit.models.read_lora_file` (a
        recorded digest is verified, every tensor must be finite). Every LoRA key must name a
        linear module of this transformer with matching shapes (a LoRA made for another
        architecture is refused naming the file and both models). With no LoRA on the
        transformer, the weights go in through the stock ``load_lora_into_transformer`` (rank and
        alpha from the file's metadata) as adapter ``"mosaic"``; with one, the values replace
        its values (resuming training), every weight required unless ``partial``. A file that
        records family options (`mosaic_kit.models.options`, e.g. Kontext's ``reference_method``)
        loads only into a family with the same values. A file that records another model family
        (`mosaic_kit.models.LORA_FAMILY_KEY`, e.g. a FLUX.1 reference LoRA, which FLUX.1 applies to
        reference tokens only) is refused even where its keys fit; files without the key
        (released, stock or third-party ones) load as before.

        Raises:
            ValueError: naming the file: damaged, non-finite, made for another model or model
                family, trained with other family options, or weights missing (unless ``partial``), unexpected or of
                another shape.

        Example:
            >>> import tempfile
            >>> from mosaic_kit.models.kontext import KontextFamily
            >>> family = KontextFamily.tiny()
            >>> _ = family.add_lora(rank=2, init=False)
            >>> file = family.save_lora(tempfile.mkdtemp())
            >>> other = KontextFamily.tiny()
            >>> other.load_lora(file)
            >>> other.transformer.active_adapters()
            ['mosaic']
        """
        from .._lora_origin import check_lora_family, check_lora_fits, recorded_lora_family
        from ..flux.lora import read_lora_file
        from ..options import check_lora_family_options, recorded_family_options

        source, kwargs, file = _lora_source(path_or_state_dict)
        label = f"LoRA file {str(file or source)!r}" if file is not None or not isinstance(source, dict) \
            else "LoRA state dict"
        if file is not None and file.suffix == ".safetensors":
            read_lora_file(file)  # the recorded digest (damaged or changed tensors) and finite tensors
            check_lora_family_options(self, recorded_family_options(file), label)  # e.g. Kontext's reference_method
        pipeline_class = type(self.pipe)
        state, metadata = pipeline_class.lora_state_dict(source, return_lora_metadata=True, **kwargs)
        stray = sorted(k for k in state if "lora" not in k and "lokr" not in k)  # stock load_lora_weights' check
        if stray:
            raise ValueError(f"{label}: expected LoRA (or LoKr) keys only, but got {stray[:3]}.")
        check_lora_fits(state, self.transformer, label, self.architecture)
        if file is not None:  # a file of another family (e.g. a FLUX.1 reference LoRA in Kontext), even if it fits
            check_lora_family(self, recorded_lora_family(file), label)
        if getattr(self.transformer, "peft_config", {}).get(IN_SEQUENCE_ADAPTER) is None:
            loader = pipeline_class.load_lora_into_transformer
            extra = {"network_alphas": None} if "network_alphas" in inspect.signature(loader).parameters else {}
            loader(state, transformer=self.transformer, adapter_name=IN_SEQUENCE_ADAPTER, metadata=metadata,
                   _pipeline=self.pipe, **extra)
            return
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        current = self.lora_state_dict()
        unexpected = sorted(set(state) - set(current))
        missing = [] if partial else sorted(set(current) - set(state))
        wrong = sorted(k for k in set(state) & set(current) if state[k].shape != current[k].shape)
        if unexpected or missing or wrong:
            raise ValueError(
                f"Expected the LoRA weights of adapter {IN_SEQUENCE_ADAPTER!r} ({len(current)} tensors), but got "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(missing)} missing (e.g. {missing[:2]}) "
                f"and {len(wrong)} of another shape (e.g. {wrong[:2]}) in {label}."
            )
        params = dict(self.transformer.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                name = key.replace(".lora_A.weight", f".lora_A.{IN_SEQUENCE_ADAPTER}.weight").replace(
                    ".lora_B.weight", f".lora_B.{IN_SEQUENCE_ADAPTER}.weight")
                params[name].copy_(value.to(params[name]))


def _lora_source(path_or_state_dict: Any) -> tuple[Any, dict[str, Any], Path | None]:
    """What diffusers' LoRA loader gets (a folder or hub id and its ``weight_name``, or a state
    dict) and the local file it will read (None for a state dict, a hub id, or a folder whose file
    diffusers picks by itself)."""
    if isinstance(path_or_state_dict, dict):
        return dict(path_or_state_dict), {}, None  # a copy: the loaders may change it in place
    path = Path(path_or_state_dict)
    if path.is_file():
        return str(path.parent), {"weight_name": path.name}, path
    if path.is_dir():
        file = path / IN_SEQUENCE_LORA_FILE
        candidates = [file] if file.is_file() else sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return str(path), {"weight_name": candidates[0].name}, candidates[0]
    return str(path), {}, None
