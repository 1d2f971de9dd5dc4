"""Stage 4: every listed subject detected and segmented in the image.

- `GroundingDinoSam`: open-vocabulary detection (Grounding DINO in transformers), one text query
  per distinct subject name, then segmentation prompted by each box (SAM in transformers). SAM's
  predicted IoU is the mask-quality score.
- `SubjectsFromFiles`: boxes and masks you already have (``<folder>/<id>.json`` with optional
  PNG masks); a box without a mask is segmented by a given segmenter, or becomes a box mask.

Both return `DetectedSubjects`: per listed subject, the box, detection score, mask and mask score,
and per distinct name the number of detections above the threshold (what the filter's
"every subject exactly once" criterion checks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data import load_mask, resize_mask
from .records import read_text_utf8

__all__ = ["DetectedSubjects", "GroundingDinoSam", "SubjectsFromFiles", "box_iou", "box_mask", "nms",
           "tiny_grounding_dino", "tiny_sam"]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes ``(x0, y0, x1, y1)`` → ``(N, M)``.

    Examples:
        >>> box_iou(torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[1., 1., 3., 3.], [0., 0., 2., 2.]]))
        tensor([[0.1429, 1.0000]])
    """
    for name, boxes in (("a", a), ("b", b)):
        if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"Expected `{name}` of shape (N, 4), but got {getattr(boxes, 'shape', type(boxes).__name__)}.")
    a, b = a.double(), b.double()
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp_min(0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp_min(0).prod(-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return (inter / union.clamp_min(1e-12)).float()


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, by decreasing score.

    Args:
        boxes: ``(N, 4)`` boxes ``(x0, y0, x1, y1)``.
        scores: ``(N,)`` scores.
        iou_threshold: a box overlapping a kept one by more than this is dropped.

    Examples:
        >>> nms(torch.tensor([[0., 0., 2., 2.], [0., 0., 2., 2.1], [5., 5., 6., 6.]]), torch.tensor([0.9, 0.8, 0.7]))
        tensor([0, 2])
    """
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"Expected `scores` of shape ({boxes.shape[0]},), but got {tuple(scores.shape)}.")
    order = scores.argsort(descending=True, stable=True)
    iou = box_iou(boxes, boxes)
    keep: list[int] = []
    for index in order.tolist():
        if all(iou[index, kept] <= iou_threshold for kept in keep):
            keep.append(index)
    return torch.tensor(keep, dtype=torch.long)


def box_mask(box: Sequence[float], height: int, width: int) -> torch.Tensor:
    """``(H, W)`` bool mask of the pixels whose centres lie inside ``box = (x0, y0, x1, y1)``.

    Examples:
        >>> box_mask([1, 0, 3, 2], 3, 4).int().tolist()
        [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = torch.arange(width) + 0.5
    ys = torch.arange(height) + 0.5
    return ((ys[:, None] >= y0) & (ys[:, None] < y1)) & ((xs[None, :] >= x0) & (xs[None, :] < x1))


@dataclass
class DetectedSubjects:
    """The subjects found in one image.

    Attributes:
        names: the listed subject names, in the prompt's order.
        boxes: per listed subject, its box ``[x0, y0, x1, y1]`` in pixels, or None when fewer
            detections than listed subjects of that name were found.
        scores: per listed subject, the detection score (0 when not found).
        masks: per listed subject, an ``(H, W)`` bool mask or None.
        mask_scores: per listed subject, the mask-quality score (SAM's predicted IoU; 1 for a mask
            from a file; 0 when absent).
        counts: per distinct name, the number of detections above the threshold.
        provenance: how they were found.

    Examples:
        >>> found = DetectedSubjects(["dog"], [[0, 0, 4, 4]], [0.9], [box_mask([0, 0, 4, 4], 8, 8)], [0.0], {"dog": 1})
        >>> int(found.masks[0].sum())
        16
    """

    names: list[str]
    boxes: list[list[float] | None]
    scores: list[float]
    masks: list[torch.Tensor | None]
    mask_scores: list[float]
    counts: dict[str, int]
    provenance: dict[str, Any] = field(default_factory=dict)


def _slot_assign(names: Sequence[str], detections: dict[str, list[tuple[list[float], float]]]):
    """Listed subjects of a name get that name's detections in decreasing score order."""
    used: dict[str, int] = {}
    boxes, scores = [], []
    for name in names:
        index = used.get(name, 0)
        used[name] = index + 1
        found = detections.get(name, [])
        if index < len(found):
            boxes.append(found[index][0])
            scores.append(float(found[index][1]))
        else:
            boxes.append(None)
            scores.append(0.0)
    return boxes, scores


class GroundingDinoSam:
    """Grounding DINO boxes per subject name, SAM masks per box (transformers models).

    Args:
        detector: a `transformers.GroundingDinoForObjectDetection`.
        detector_processor: its `GroundingDinoProcessor`.
        segmenter: a `transformers.SamModel`, or None (then each mask is its box).
        segmenter_processor: its `SamProcessor`.
        box_threshold: detections scoring at least this count.
        text_threshold: Grounding DINO's text threshold.
        nms_iou: boxes of one name overlapping more than this are merged (greedy NMS).
        name: what the provenance calls the models.

    Examples:
        >>> detector, detector_processor = tiny_grounding_dino()
        >>> sam, sam_processor = tiny_sam()
        >>> found = GroundingDinoSam(detector, detector_processor, sam, sam_processor)(Image.new("RGB", (64, 48)), ["dog", "cat"])
        >>> found.names, [m is None or tuple(m.shape) == (48, 64) for m in found.masks]
        (['dog', 'cat'], [True, True])
    """

    def __init__(self, detector: Any, detector_processor: Any, segmenter: Any = None, segmenter_processor: Any = None, *,
                 box_threshold: float = 0.35, text_threshold: float = 0.25, nms_iou: float = 0.5,
                 name: str = "grounding-dino+sam") -> None:
        if not callable(detector) or detector_processor is None:
            raise ValueError("Expected `detector` to be a GroundingDinoForObjectDetection with its processor.")
        if (segmenter is None) != (segmenter_processor is None):
            raise ValueError("Expected `segmenter` and `segmenter_processor` both given or both None.")
        for label, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold), ("nms_iou", nms_iou)):
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"Expected `{label}` in [0, 1], but got {value!r}.")
        self.detector, self.detector_processor = detector, detector_processor
        self.segmenter, self.segmenter_processor = segmenter, segmenter_processor
        self.box_threshold, self.text_threshold, self.nms_iou, self.name = box_threshold, text_threshold, nms_iou, name

    @classmethod
    def from_pretrained(cls, detector: str, segmenter: str | None = None, *, device: str = "cpu",
                        **kwargs: Any) -> GroundingDinoSam:
        """Loads Grounding DINO (e.g. ``IDEA-Research/grounding-dino-base``) and SAM (e.g.
        ``facebook/sam-vit-huge``) from hub ids or local folders."""
        import transformers

        model = transformers.GroundingDinoForObjectDetection.from_pretrained(detector).to(device).eval()
        processor = transformers.AutoProcessor.from_pretrained(detector)
        sam = sam_processor = None
        if segmenter:
            sam = transformers.SamModel.from_pretrained(segmenter).to(device).eval()
            sam_processor = transformers.SamProcessor.from_pretrained(segmenter)
        return cls(model, processor, sam, sam_processor, name=f"{detector}+{segmenter}", **kwargs)

    @torch.no_grad()
    def detect(self, image: Image.Image, name: str) -> list[tuple[list[float], float]]:
        """Boxes ``[x0, y0, x1, y1]`` and scores of ``name`` at or above the threshold, after NMS, best first."""
        device = next(self.detector.parameters()).device
        inputs = self.detector_processor(images=image, text=f"{name.lower()}.", return_tensors="pt").to(device)
        outputs = self.detector(**inputs)
        result = self.detector_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        boxes, scores = result["boxes"].float().cpu(), result["scores"].float().cpu()
        if boxes.numel() == 0:
            return []
        keep = nms(boxes, scores, self.nms_iou)
        return [(boxes[i].tolist(), float(scores[i])) for i in keep.tolist()]

    @torch.no_grad()
    def segment(self, image: Image.Image, box: Sequence[float]) -> tuple[torch.Tensor, float]:
        """``(H, W)`` bool mask of the object in ``box`` and SAM's predicted IoU; without a
        segmenter, the box's mask and score 0 (nothing was predicted)."""
        (mask,), (score,) = self.segment_boxes(image, [box])
        return mask, score

    @torch.no_grad()
    def segment_boxes(self, image: Image.Image, boxes: Sequence[Sequence[float]]) -> tuple[list[torch.Tensor], list[float]]:
        """`segment` for several boxes of one image, with one SAM image encoding for all."""
        if not boxes:
            return [], []
        if self.segmenter is None:
            return [box_mask(box, image.height, image.width) for box in boxes], [0.0] * len(boxes)
        device = next(self.segmenter.parameters()).device
        inputs = self.segmenter_processor(images=image, input_boxes=[[list(map(float, b)) for b in boxes]],
                                          return_tensors="pt").to(device)
        outputs = self.segmenter(**inputs, multimask_output=False)
        masks = self.segmenter_processor.post_process_masks(outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                                            inputs["reshaped_input_sizes"].cpu())[0]
        return [masks[i, 0].bool() for i in range(len(boxes))], outputs.iou_scores[0, :, 0].float().cpu().tolist()

    def __call__(self, image: Image.Image, names: Sequence[str]) -> DetectedSubjects:
        """Detects every distinct name once and segments the listed subjects' boxes (one SAM pass)."""
        detections = {name: self.detect(image, name) for name in dict.fromkeys(names)}
        boxes, scores = _slot_assign(names, detections)
        found = [k for k, box in enumerate(boxes) if box is not None]
        masks: list[torch.Tensor | None] = [None] * len(boxes)
        mask_scores = [0.0] * len(boxes)
        for k, mask, score in zip(found, *self.segment_boxes(image, [boxes[k] for k in found])):
            masks[k], mask_scores[k] = mask, score
        return DetectedSubjects(list(names), boxes, scores, masks, mask_scores,
                                {name: len(found) for name, found in detections.items()},
                                {"model": self.name, "box_threshold": self.box_threshold})


class SubjectsFromFiles:
    """Boxes and masks you already have: ``<folder>/<id>.json`` per item::

        {"subjects": [{"name": "dog", "box": [x0, y0, x1, y1], "score": 0.9, "mask": "p0_dog.png"}, ...]}

    ``score`` (default 1) and ``mask`` (a PNG path relative to the folder, non-zero inside) are
    optional. Every entry counts as one detection of its name. A subject without a mask is
    segmented by ``segmenter`` (a `GroundingDinoSam`, only its SAM is used) when given, else its
    mask is its box (`box_mask`, mask score 0). A mask from a file has mask score 1.

    Args:
        folder: the folder of JSON files.
        segmenter: optional, segments boxes without masks.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "p0.json").write_text(json.dumps({"subjects": [{"name": "dog", "box": [0, 0, 4, 4]}]}))
        >>> found = SubjectsFromFiles(folder)("p0", Image.new("RGB", (8, 8)), ["dog", "cat"])
        >>> found.counts, int(found.masks[0].sum()), found.masks[1]
        ({'dog': 1, 'cat': 0}, 16, None)
    """

    def __init__(self, folder: str | Path, segmenter: GroundingDinoSam | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"Expected `folder` to be a folder of <id>.json box files, but {self.folder} is not a folder.")
        self.segmenter = segmenter

    def __call__(self, item_id: str, image: Image.Image, names: Sequence[str]) -> DetectedSubjects:
        """The item's subjects; raises ValueError naming the file when it is missing or malformed."""
        path = self.folder / f"{item_id}.json"
        if not path.is_file():
            raise ValueError(f"Expected a box file {path} for item {item_id!r}, but there is none.")
        try:
            entries = json.loads(read_text_utf8(path))["subjects"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: expected {{\"subjects\": [{{\"name\", \"box\", ...}}]}}, but got an error: {error}") from None
        detections: dict[str, list[tuple[list[float], float]]] = {}
        files: dict[tuple[float, ...], str] = {}
        for index, entry in enumerate(entries):
            box = entry.get("box") if isinstance(entry, dict) else None
            if (not isinstance(entry.get("name"), str) or not isinstance(box, list) or len(box) != 4
                    or not all(isinstance(v, (int, float)) for v in box) or box[2] <= box[0] or box[3] <= box[1]):
                raise ValueError(f"{path}: subject {index} must have a `name` and a `box` [x0, y0, x1, y1] with x1 > x0 "
                                 f"and y1 > y0, but got {entry!r}")
            detections.setdefault(entry["name"], []).append(([float(v) for v in box], float(entry.get("score", 1.0))))
            if entry.get("mask"):
                files[tuple(float(v) for v in box)] = entry["mask"]
        for found in detections.values():
            found.sort(key=lambda item: -item[1])
        boxes, scores = _slot_assign(names, detections)
        masks, mask_scores = [], []
        for box in boxes:
            if box is None:
                masks.append(None)
                mask_scores.append(0.0)
            elif tuple(box) in files:
                mask_path = self.folder / files[tuple(box)]
                masks.append(resize_mask(load_mask(mask_path), (image.height, image.width)))
                mask_scores.append(1.0)
            elif self.segmenter is not None:
                mask, score = self.segmenter.segment(image, box)
                masks.append(mask)
                mask_scores.append(score)
            else:
                masks.append(box_mask(box, image.height, image.width))
                mask_scores.append(0.0)
        return DetectedSubjects(list(names), boxes, scores, masks, mask_scores,
                                {name: len(detections.get(name, [])) for name in dict.fromkeys(names)},
                                {"source": "files", "file": str(path)})


def _tiny_bert_tokenizer() -> Any:
    import transformers

    characters = [chr(c) for c in range(97, 123)] + [chr(c) for c in range(48, 58)] + list(".,'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters + ["##" + c for c in characters]
    return transformers.BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def tiny_grounding_dino(seed: int = 0, image_size: int = 64) -> tuple[Any, Any]:
    """A tiny random Grounding DINO (ResNet backbone, 1-layer BERT, 10 queries) and its processor,
    built in code. Its boxes mean nothing; it only exercises the code. The global RNG is untouched.

    Returns:
        ``(GroundingDinoForObjectDetection, GroundingDinoProcessor)``.

    Examples:
        >>> model, processor = tiny_grounding_dino()
        >>> model.config.num_queries
        10
    """
    import transformers

    tokenizer = _tiny_bert_tokenizer()
    text = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=37, max_position_embeddings=64)
    backbone = transformers.ResNetConfig(num_channels=3, embeddings_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage2", "stage3", "stage4"])
    config = transformers.GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
        num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, max_text_len=32, use_timm_backbone=False,
        backbone=None, use_pretrained_backbone=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GroundingDinoForObjectDetection(config).eval()
    image_processor = _pil_processor(transformers, "GroundingDinoImageProcessor",
                                     size={"shortest_edge": image_size, "longest_edge": image_size})
    return model, transformers.GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_sam(seed: int = 0, image_size: int = 64) -> tuple[Any, Any]:
    """A tiny random SAM (1-layer ViT encoder on ``image_size`` inputs) and its processor, built in
    code. Its masks mean nothing; it only exercises the code. The global RNG is untouched.

    Returns:
        ``(SamModel, SamProcessor)``.

    Examples:
        >>> model, processor = tiny_sam()
        >>> model.config.vision_config.image_size
        64
    """
    import transformers

    config = transformers.SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64, image_size=image_size,
                           patch_size=8, output_channels=16, window_size=2, global_attn_indexes=[0], num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=image_size, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.SamModel(config).eval()
    image_processor = _pil_processor(transformers, "SamImageProcessor", size={"longest_edge": image_size},
                                     pad_size={"height": image_size, "width": image_size},
                                     mask_size={"longest_edge": image_size // 4})
    return model, transformers.SamProcessor(image_processor=image_processor)


def _pil_processor(transformers: Any, name: str, **kwargs: Any) -> Any:
    """The PIL-backend image processor when transformers has one (no torchvision needed)."""
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return cls(**kwargs)
