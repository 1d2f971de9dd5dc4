"""The models behind the stages, built from a `DatasetBuildConfig` (a hub id or a local folder;
``"tiny"``: tiny random models built in code). `DatasetBuilder` builds each once, when a stage first
needs it."""

from __future__ import annotations

from typing import Any

import torch

from .config import DatasetBuildConfig, resolve_path

__all__ = ["build_clip", "build_editor", "build_extractors", "build_images", "build_rewriter", "build_segmenter"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_rewriter(config: DatasetBuildConfig) -> Any:
    """The instruction rewriter of stage 1 (`prompts.rewriter`)."""
    from .prompts import InstructionRewriter, tiny_instruction_model

    spec = dict(config.prompts.rewriter or {})
    name = spec.pop("model", None)
    if not name:
        raise ValueError("Expected `prompts.rewriter.model` (a hub id, folder or 'tiny'), but got none.")
    if name == "tiny":
        model, tokenizer = tiny_instruction_model(config.seed)
        return InstructionRewriter(model, tokenizer, seed=config.seed, name="tiny", **spec)
    return InstructionRewriter.from_pretrained(name, device=config.device, seed=config.seed, **spec)


def build_images(config: DatasetBuildConfig) -> Any:
    """The image source of stage 2 (`images`)."""
    from .images import DiffusersImageGenerator, ImagesFromFolder, PhotoComposites

    cfg = config.images
    if cfg.source == "folder":
        return ImagesFromFolder(resolve_path(cfg.folder))
    if cfg.source == "photo_composites":
        return PhotoComposites(resolve_path(cfg.root), canvas_size=cfg.canvas_size, scale_range=tuple(cfg.scale_range),
                               seed=config.seed)
    kwargs = dict(height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                  batch_size=cfg.batch_size, seed=config.seed, extra=cfg.extra)
    if cfg.model == "tiny":
        from diffusers import FluxPipeline

        from ..pipelines.tiny import tiny_flux_components

        return DiffusersImageGenerator(FluxPipeline(**tiny_flux_components(config.seed)), name="tiny", **kwargs)
    return DiffusersImageGenerator.from_pretrained(cfg.model, device=config.device, dtype=_DTYPES[cfg.dtype], **kwargs)


def build_segmenter(config: DatasetBuildConfig) -> Any:
    """The detector + segmenter of stage 3 (`subjects`)."""
    from .subjects import GroundingDinoSam, tiny_grounding_dino, tiny_sam

    cfg = config.subjects
    if cfg.detector == "tiny" or cfg.segmenter == "tiny":
        detector, processor = tiny_grounding_dino(config.seed)
        sam, sam_processor = tiny_sam(config.seed) if cfg.segmenter else (None, None)
        return GroundingDinoSam(detector, processor, sam, sam_processor, box_threshold=cfg.box_threshold,
                                text_threshold=cfg.text_threshold, name="tiny")
    return GroundingDinoSam.from_pretrained(cfg.detector, cfg.segmenter, device=config.device,
                                            box_threshold=cfg.box_threshold, text_threshold=cfg.text_threshold)


def build_clip(config: DatasetBuildConfig) -> Any:
    """The CLIP scorer of stage 4 (`filter.clip`)."""
    from ..eval import CLIPScorer, tiny_clip_scorer

    name = config.filter.clip
    return tiny_clip_scorer(config.seed) if name == "tiny" else CLIPScorer.from_pretrained(name, device=config.device)


def build_editor(config: DatasetBuildConfig) -> Any:
    """The reference editor of stage 5 (`references.editor`)."""
    from .references import DiffusersEditor

    cfg = config.references
    kwargs = dict(prompt=cfg.prompt, size=cfg.size, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                  seed=config.seed, extra=cfg.extra)
    if cfg.editor == "tiny":
        from diffusers import FluxKontextPipeline

        from ..pipelines.tiny import tiny_flux_components

        kwargs["extra"] = {"max_sequence_length": 16, "_auto_resize": False, **kwargs["extra"]}
        return DiffusersEditor(FluxKontextPipeline(**tiny_flux_components(config.seed + 1)), name="tiny", **kwargs)
    return DiffusersEditor.from_pretrained(cfg.editor, device=config.device, dtype=_DTYPES[cfg.dtype], **kwargs)


def build_extractors(config: DatasetBuildConfig) -> Any:
    """The feature extractors of stage 6 (`correspondences.extractors`), on `device`, in eval mode."""
    from ..features import build_extractor, parse_extractor_spec

    cfg = config.correspondences
    out = []
    for spec in cfg.extractors:
        name, kwargs = parse_extractor_spec(spec)
        out.append(build_extractor(name, **{"grid_size": cfg.grid, **kwargs}).to(config.device).eval())
    return out
