"""IP-Sim: each non-human subject grounded by its label, segmented, and compared with DINO
(`SubjectSimilarityScorer`).

XVerse's protocol (``eval/tools/florence_sam.py``, ``idip_sam-dino_score.py``,
``eval/tools/dino.py``), followed here:

1. ground the subject's label in the generated image (Florence-2-large,
   ``<OPEN_VOCABULARY_DETECTION>``, 3 beams, greedy, up to 768 new tokens);
2. segment each box (SAM 2.1 hiera-L, one mask per box);
3. paint everything outside the mask white and crop the box;
4. drop instances smaller than ``min_size = image width // 20`` (area below ``min_size²`` or a
   side below ``min_size // 4``), keep the first 3;
5. pad each instance to a square on white (centred);
6. DINO similarity with the subject photo as given: CLS token of ``facebook/dino-vits16``
   after resizing the shorter side to 256 (bicubic) and centre-cropping 224, cosine ×100;
   the subject's score is the best instance's, 0 when none is found.

XVerse loads Florence-2 with its own remote code in bfloat16 and SAM 2.1 through the ``sam2``
package; here both come from transformers (`Florence2ForConditionalGeneration` with the converted
checkpoint ``florence-community/Florence-2-large``, `Sam2Model` with
``facebook/sam2.1-hiera-large``, preprocessing written here because transformers' SAM 2 image
processor needs torchvision). `tiny_subject_models` builds tiny random stand-ins of all three.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ...utils.images import pil_to_tensor
from ..metrics import DINOScorer

__all__ = [
    "DEFAULT_DINO_MODEL",
    "DEFAULT_GROUNDING_MODEL",
    "DEFAULT_SEGMENTATION_MODEL",
    "MAX_INSTANCES",
    "Florence2Grounder",
    "Sam2Segmenter",
    "SubjectGrounder",
    "SubjectSegmenter",
    "SubjectSimilarityScorer",
    "keep_instance",
    "masked_instance",
    "pad_to_square",
    "tiny_subject_models",
    "xverse_dino_scorer",
]

DEFAULT_GROUNDING_MODEL = "florence-community/Florence-2-large"
"""Florence-2-large in transformers' own format (XVerse: ``microsoft/Florence-2-large``, remote code)."""

DEFAULT_SEGMENTATION_MODEL = "facebook/sam2.1-hiera-large"
"""SAM 2.1 hiera-L in transformers' format (XVerse: the ``sam2`` package, ``sam2.1_hiera_l.yaml``)."""

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
"""The DINO of XVerse's code (its readme says DINOv2; the code loads this)."""

MAX_INSTANCES = 3
"""At most this many grounded instances of a subject are compared (the first ones)."""


class SubjectGrounder(abc.ABC):
    """Open-vocabulary grounding: boxes of a label in an image."""

    @abc.abstractmethod
    def ground(self, image: Image.Image, label: str) -> list[tuple[float, float, float, float]]:
        """``(left, top, right, bottom)`` boxes in pixels, in the model's order."""


class SubjectSegmenter(abc.ABC):
    """Box-prompted segmentation: one mask per box."""

    @abc.abstractmethod
    def segment(self, image: Image.Image, boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """``(len(boxes), H, W)`` bool masks of the image's size."""


def masked_instance(image: Image.Image, mask: torch.Tensor, box: Sequence[float]) -> Image.Image:
    """The pixels of `image` inside `mask` (white elsewhere), cropped to `box` (rounded to whole
    pixels and clipped to the image).

    Example:
        >>> mask = torch.zeros(4, 6, dtype=torch.bool); mask[1:3, 1:3] = True
        >>> crop = masked_instance(Image.new("RGB", (6, 4), "red"), mask, (0.6, 0.6, 4.2, 3.4))
        >>> crop.size, crop.getpixel((0, 0)), crop.getpixel((2, 0))
        ((3, 2), (255, 0, 0), (255, 255, 255))
    """
    width, height = image.size
    if tuple(mask.shape) != (height, width):
        raise ValueError(f"Expected `mask` of shape ({height}, {width}) (the image's), but got {tuple(mask.shape)}.")
    pixels = pil_to_tensor(image.convert("RGB"))
    painted = torch.where(mask[None].bool(), pixels, torch.ones_like(pixels))
    left, top, right, bottom = (int(round(float(v))) for v in box)
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, width), min(bottom, height)
    crop = (painted[:, top:bottom, left:right] * 255).round().to(torch.uint8)
    return Image.fromarray(crop.permute(1, 2, 0).numpy(), "RGB") if crop.numel() else Image.new("RGB", (0, 0))


def keep_instance(instance: Image.Image, min_size: int) -> bool:
    """XVerse's size filter: keep an instance whose area is at least ``min_size²`` and whose
    shorter side is at least ``min_size // 4``.

    Example:
        >>> keep_instance(Image.new("RGB", (40, 10)), 20), keep_instance(Image.new("RGB", (40, 4)), 20)
        (True, False)
    """
    width, height = instance.size
    return width * height >= min_size * min_size and min(width, height) >= min_size // 4


def pad_to_square(image: Image.Image) -> Image.Image:
    """`image` centred on a white square whose side is its longer side (offsets rounded down).

    Example:
        >>> square = pad_to_square(Image.new("RGB", (4, 2), "black"))
        >>> square.size, square.getpixel((0, 0)), square.getpixel((0, 1))
        ((4, 4), (255, 255, 255), (0, 0, 0))
    """
    side = max(image.size)
    square = Image.new("RGB", (side, side), "white")
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def xverse_dino_scorer(model: torch.nn.Module, *, batch_size: int = 32) -> DINOScorer:
    """A `DINOScorer` with XVerse's preprocessing: shorter side to 256 (bicubic), centre crop
    224, ImageNet normalisation (a PIL `BitImageProcessor`); the embedding is the CLS token.

    Example:
        >>> import transformers
        >>> config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                                 intermediate_size=64, image_size=224, patch_size=32)
        >>> scorer = xverse_dino_scorer(transformers.ViTModel(config, add_pooling_layer=False))
        >>> scorer.embed_images([Image.new("RGB", (300, 200))]).shape
        torch.Size([1, 32])
    """
    import transformers

    processor_class = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    processor = processor_class(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=Image.Resampling.BICUBIC,
        do_center_crop=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
    )
    return DINOScorer(model, processor, batch_size=batch_size)


class SubjectSimilarityScorer:
    """IP-Sim of non-human subjects on generated images (see the module docstring).

    Args:
        grounder: a `SubjectGrounder`.
        segmenter: a `SubjectSegmenter`.
        dino: a `DINOScorer` (`xverse_dino_scorer` for XVerse's preprocessing).
        max_instances: instances compared per subject; defaults to `MAX_INSTANCES` (3).
        min_size_divisor: ``min_size = image width // min_size_divisor``; defaults to 20.

    Example:
        >>> grounder, segmenter, dino = tiny_subject_models()
        >>> scorer = SubjectSimilarityScorer(grounder, segmenter, dino)
        >>> score, instances = scorer.score(Image.new("RGB", (64, 64), "red"), "dog", dino.embed_images([Image.new("RGB", (8, 8))])[0])
        >>> 0 <= len(instances) <= 3 and (score == 0.0) == (len(instances) == 0)
        True
    """

    def __init__(self, grounder: SubjectGrounder, segmenter: SubjectSegmenter, dino: DINOScorer, *,
                 max_instances: int = MAX_INSTANCES, min_size_divisor: int = 20) -> None:
        if not isinstance(grounder, SubjectGrounder):
            raise ValueError(f"Expected `grounder` to be a SubjectGrounder, but got {type(grounder).__name__}.")
        if not isinstance(segmenter, SubjectSegmenter):
            raise ValueError(f"Expected `segmenter` to be a SubjectSegmenter, but got {type(segmenter).__name__}.")
        if not isinstance(dino, DINOScorer):
            raise ValueError(f"Expected `dino` to be a DINOScorer, but got {type(dino).__name__}.")
        for name, value in (("max_instances", max_instances), ("min_size_divisor", min_size_divisor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}.")
        self.grounder, self.segmenter, self.dino = grounder, segmenter, dino
        self.max_instances, self.min_size_divisor = max_instances, min_size_divisor

    def instances(self, image: Image.Image, label: str) -> list[Image.Image]:
        """The subject's instances in `image`: grounded, segmented, cropped, filtered by size,
        the first `max_instances`, padded to squares."""
        image = image.convert("RGB")
        boxes = self.grounder.ground(image, label)
        if not boxes:
            return []
        masks = self.segmenter.segment(image, boxes)
        min_size = image.width // self.min_size_divisor
        kept = [crop for crop in (masked_instance(image, mask, box) for mask, box in zip(masks, boxes))
                if keep_instance(crop, min_size)]
        return [pad_to_square(crop) for crop in kept[: self.max_instances]]

    def score(self, image: Image.Image, label: str, reference: torch.Tensor) -> tuple[float, list[Image.Image]]:
        """The best DINO cosine ×100 of the subject's instances against the reference embedding
        (`dino.embed_images([photo])[0]`), 0 without an instance; and the instances."""
        found = self.instances(image, label)
        if not found:
            return 0.0, []
        embeddings = self.dino.embed_images(found)
        return float((100.0 * embeddings @ reference).max()), found


class Florence2Grounder(SubjectGrounder):
    """Open-vocabulary detection with a transformers Florence-2 (XVerse's settings: 3 beams,
    greedy, up to 768 new tokens).

    Args:
        model: a `Florence2ForConditionalGeneration`.
        processor: its `Florence2Processor`.
        num_beams: beams; defaults to 3.
        max_new_tokens: defaults to 768.
    """

    TASK = "<OPEN_VOCABULARY_DETECTION>"

    def __init__(self, model: torch.nn.Module, processor: Any, *, num_beams: int = 3, max_new_tokens: int = 768) -> None:
        self.model, self.processor = model.eval(), processor
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_GROUNDING_MODEL, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Florence2Grounder:
        """Loads Florence-2 (transformers format) from a local folder or hub id.

        Example:
            >>> grounder = Florence2Grounder.from_pretrained(device="cuda")  # doctest: +SKIP
        """
        import transformers

        model = transformers.Florence2ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype).to(device)
        return cls(model, transformers.AutoProcessor.from_pretrained(name_or_path))

    def ground(self, image: Image.Image, label: str) -> list[tuple[float, float, float, float]]:
        """The boxes Florence-2 finds for `label`, in its order."""
        parameter = next(self.model.parameters())
        inputs = self.processor(text=self.TASK + label, images=image, return_tensors="pt")
        with torch.inference_mode():
            ids = self.model.generate(
                input_ids=inputs["input_ids"].to(parameter.device),
                pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
                max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=self.num_beams,
            )
        text = self.processor.batch_decode(ids, skip_special_tokens=False)[0]
        parsed = self.processor.post_process_generation(text, task=self.TASK, image_size=image.size)[self.TASK]
        return [tuple(float(v) for v in box) for box in parsed.get("bboxes", [])]


class Sam2Segmenter(SubjectSegmenter):
    """Box-prompted masks with a transformers `Sam2Model`, one mask per box.

    Preprocessing as transformers' SAM 2 processor (which needs torchvision): the image resized to
    the model's square input (bilinear), ImageNet normalisation, boxes scaled to it; the low-
    resolution mask logits resized to the image (bilinear) and thresholded at 0.

    Args:
        model: a `Sam2Model`.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.size = int(model.config.prompt_encoder_config.image_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_SEGMENTATION_MODEL, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Sam2Segmenter:
        """Loads SAM 2.1 (transformers format) from a local folder or hub id.

        Example:
            >>> segmenter = Sam2Segmenter.from_pretrained(device="cuda")  # doctest: +SKIP
        """
        import transformers

        return cls(transformers.Sam2Model.from_pretrained(name_or_path, dtype=dtype).to(device))

    def segment(self, image: Image.Image, boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """``(len(boxes), H, W)`` bool masks."""
        parameter = next(self.model.parameters())
        width, height = image.size
        pixels = pil_to_tensor(image.convert("RGB"))[None]
        pixels = torch.nn.functional.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        pixels = ((pixels - mean) / std).to(parameter.device, parameter.dtype)
        scale = torch.tensor([self.size / width, self.size / height] * 2)
        prompts = (torch.tensor([list(map(float, b)) for b in boxes]) * scale)[None].to(parameter.device, parameter.dtype)
        with torch.inference_mode():
            logits = self.model(pixel_values=pixels, input_boxes=prompts, multimask_output=False).pred_masks
        logits = logits[0, :, 0].float().cpu()[:, None]
        logits = torch.nn.functional.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=False)
        logits = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits[:, 0] > 0


def _tiny_florence2(seed: int) -> Florence2Grounder:
    import transformers
    from tokenizers import pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    extra = [f"<loc_{i}>" for i in range(1000)] + ["<od>", "</od>", "<poly>", "</poly>", "<sep>"]
    for token in extra + ["<image>", "<mask>"]:
        vocab[token] = len(vocab)
    tokenizer = transformers.BartTokenizerFast(
        vocab=vocab, merges=[], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_tokens([transformers.AddedToken(t, special=False, normalized=False) for t in extra])
    tokenizer.add_special_tokens({"additional_special_tokens": [transformers.AddedToken("<image>", special=True, normalized=False)]})
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = processor_class(size={"height": 32, "width": 32}, do_center_crop=False,
                                      crop_size={"height": 32, "width": 32})
    image_processor.image_seq_length = 17  # 4×4 patches + 1 pooled token
    processor = transformers.Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer,
        post_processor_config={"description_with_bboxes_or_polygons": {}, "pure_text": {}},
    )
    vision = transformers.Florence2VisionConfig(
        depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1), patch_prenorm=(False, True),
        embed_dim=(16, 32), num_heads=(2, 2), num_groups=(2, 2), window_size=2, projection_dim=32,
        max_temporal_embeddings=4, max_position_embeddings=8,
    )
    text = transformers.BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
    )
    config = transformers.Florence2Config(text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Florence2ForConditionalGeneration(config)
    return Florence2Grounder(model, processor, num_beams=1, max_new_tokens=10)


def _tiny_sam2(seed: int) -> Sam2Segmenter:
    import transformers

    hiera = transformers.Sam2HieraDetConfig(
        hidden_size=8, num_attention_heads=1, image_size=[64, 64], patch_kernel_size=[7, 7], patch_stride=[4, 4],
        patch_padding=[3, 3], query_stride=[2, 2], window_positional_embedding_background_size=[2, 2],
        num_query_pool_stages=3, blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 4, 2, 2], global_attention_blocks=[3],
    )
    vision = transformers.Sam2VisionConfig(
        backbone_config=hiera, backbone_channel_list=[64, 32, 16, 8], backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=32, fpn_top_down_levels=[2, 3], num_feature_levels=3,
    )
    config = transformers.Sam2Config(
        vision_config=vision,
        prompt_encoder_config=transformers.Sam2PromptEncoderConfig(hidden_size=32, image_size=64, patch_size=16,
                                                                   mask_input_channels=4),
        mask_decoder_config=transformers.Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=1,
                                                               num_attention_heads=2, iou_head_hidden_dim=32),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Sam2Model(config)
    return Sam2Segmenter(model)


def tiny_subject_models(seed: int = 0) -> tuple[Florence2Grounder, Sam2Segmenter, DINOScorer]:
    """Tiny random Florence-2 (32×32 input, BART with 1 layer each side, a byte-level tokenizer
    with the 1000 location tokens), SAM 2 (64×64 input, a 5-block Hiera) and DINO ViT (224 input,
    32×32 patches, 1 layer) built in code: the grounding, segmentation and DINO steps of IP-Sim all
    run, in about a second per image on a CPU; their boxes, masks and scores mean nothing.
    Deterministic given `seed`; the global RNG is untouched.

    Example:
        >>> grounder, segmenter, dino = tiny_subject_models()
        >>> segmenter.segment(Image.new("RGB", (40, 30)), [(0, 0, 20, 20)]).shape
        torch.Size([1, 30, 40])
    """
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=224, patch_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = transformers.ViTModel(config, add_pooling_layer=False)
    return _tiny_florence2(seed), _tiny_sam2(seed), xverse_dino_scorer(vit)
