"""Per-subject similarity in multi-subject images: the whole image and the best sliding crop.

With several subjects in one generated image, the whole-image embedding mixes them, so a subject
is partly scored against the others. `subject_similarity` scores each subject both on the whole
image and on the crop (from a set of square sliding crops, `sliding_crops`) that resembles that
subject's real images most. It only needs an embedding function, so it works with any metric:
`CLIPScorer.embed_images`, `DINOScorer.embed_images`, or anything mapping a list of PIL images to
`(N, D)` embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .metrics import _check_images, similarity_matrix

__all__ = ["DEFAULT_CROP_SIZES", "DEFAULT_CROP_STRIDE", "SubjectSimilarity", "sliding_crops", "subject_similarity"]

DEFAULT_CROP_SIZES: tuple[float, ...] = (0.5, 0.75, 1.0)
"""Default crop sides, as fractions of the image's shorter side."""

DEFAULT_CROP_STRIDE: float = 0.5
"""Default step between crops, as a fraction of the crop side."""

Box = tuple[int, int, int, int]


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"Expected `{name}` to be a number in (0, 1], but got {value!r}.")
    return float(value)


def _axis_offsets(length: int, side: int, step: int) -> list[int]:
    last = length - side
    offsets = list(range(0, last + 1, step))
    if offsets[-1] != last:
        offsets.append(last)  # the crops always reach the far edge
    return offsets


def sliding_crops(
    width: int,
    height: int,
    sizes: Sequence[float] = DEFAULT_CROP_SIZES,
    stride: float = DEFAULT_CROP_STRIDE,
) -> list[Box]:
    """Square sliding-window crops of an image, at several sizes.

    For each size `s`, the crop side is `round(s * min(width, height))` pixels (at least 1); crops
    start at 0 and step by `round(stride * side)` pixels (at least 1) along each axis, with a last
    crop flush with the far edge, so every pixel is covered. Duplicates are dropped; the order is
    by size as given, then row-major.

    Args:
        width: image width in pixels (>= 1).
        height: image height in pixels (>= 1).
        sizes: crop sides as fractions in (0, 1] of the shorter side; defaults to
            `DEFAULT_CROP_SIZES` (0.5, 0.75, 1.0).
        stride: step as a fraction in (0, 1] of the crop side; defaults to 0.5.

    Returns:
        A list of `(left, top, right, bottom)` pixel boxes (PIL's `Image.crop` convention).

    Raises:
        ValueError: if a size is not positive, `sizes` is empty, or a fraction is outside (0, 1].

    Example:
        >>> sliding_crops(64, 32, sizes=[1.0], stride=0.5)
        [(0, 0, 32, 32), (16, 0, 48, 32), (32, 0, 64, 32)]
        >>> len(sliding_crops(512, 512))  # side 256: 3×3; side 384: 2×2 (offsets 0, 128); side 512: 1
        14
    """
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}.")
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError(f"Expected `sizes` to be a non-empty list of fractions in (0, 1], but got {sizes!r}.")
    stride = _check_fraction("stride", stride)
    boxes: list[Box] = []
    seen: set[Box] = set()
    for index, size in enumerate(sizes):
        side = max(1, round(_check_fraction(f"sizes[{index}]", size) * min(width, height)))
        step = max(1, round(stride * side))
        for top in _axis_offsets(height, side, step):
            for left in _axis_offsets(width, side, step):
                box = (left, top, left + side, top + side)
                if box not in seen:
                    seen.add(box)
                    boxes.append(box)
    return boxes


@dataclass(frozen=True)
class SubjectSimilarity:
    """Per-image, per-subject similarities ×100 of a multi-subject case (see `subject_similarity`).

    Args:
        whole: `(N_img, S)` float32, mean similarity of the whole image to subject s's references.
        crop: `(N_img, S)` float32, the same for the best crop of the image for subject s.
        best_box: `(N_img, S, 4)` long, `(left, top, right, bottom)` of that crop.

    Example:
        >>> scores = SubjectSimilarity(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3, 4, dtype=torch.long))
        >>> scores.num_images, scores.num_subjects
        (2, 3)
    """

    whole: torch.Tensor
    crop: torch.Tensor
    best_box: torch.Tensor

    @property
    def num_images(self) -> int:
        """N_img, the number of images scored."""
        return self.whole.shape[0]

    @property
    def num_subjects(self) -> int:
        """S, the number of subjects."""
        return self.whole.shape[1]


def subject_similarity(
    embed: Callable[[list], torch.Tensor],
    images: Sequence,
    references: Sequence,
    *,
    sizes: Sequence[float] = DEFAULT_CROP_SIZES,
    stride: float = DEFAULT_CROP_STRIDE,
) -> SubjectSimilarity:
    """Scores every subject of a multi-subject case on the whole image and on its best crop.

    With embeddings normalised, for image i, subject s with real images r_1..r_n and crop c:

    - `whole[i, s] = 100 · mean_j cos(e(image_i), e(r_j))`;
    - `crop[i, s] = max_c 100 · mean_j cos(e(crop_c(image_i)), e(r_j))`, over the crops of
      `sliding_crops(image_i.width, image_i.height, sizes, stride)`; `best_box[i, s]` is the
      maximising crop (the first one on ties).

    Each subject picks its own crop, so with subjects in different places each is scored where
    it is. The crop score is an upper bound of sorts (a max over crops); compare methods with the
    same crop settings. All crops of all images go through `embed` in one call.

    Args:
        embed: maps a list of PIL images to `(N, D)` embeddings (e.g. `scorer.embed_images`).
        images: the generated PIL images of the case.
        references: one entry per subject: a list of that subject's PIL images, or their
            `(N_s, D)` embeddings precomputed with the same `embed`.
        sizes: crop sides as fractions of the shorter image side; defaults to (0.5, 0.75, 1.0).
        stride: crop step as a fraction of the crop side; defaults to 0.5.

    Returns:
        A `SubjectSimilarity` with `(N_img, S)` scores.

    Raises:
        ValueError: if `images` or a subject's references are empty or not images, or `embed`
            returns the wrong number of rows.

    Example:
        >>> from PIL import Image
        >>> def mean_colour(images):  # a toy embedding: the mean RGB colour plus a constant
        ...     return torch.tensor([[*Image.Image.resize(im, (1, 1)).getpixel((0, 0)), 1.0] for im in images])
        >>> image = Image.new("RGB", (64, 32), "red")
        >>> image.paste((0, 0, 255), (32, 0, 64, 32))  # red left half, blue right half
        >>> scores = subject_similarity(mean_colour, [image], [[Image.new("RGB", (8, 8), "red")],
        ...                                                    [Image.new("RGB", (8, 8), "blue")]], sizes=[1.0])
        >>> scores.best_box[0].tolist()  # red is found on the left, blue on the right
        [[0, 0, 32, 32], [32, 0, 64, 32]]
        >>> scores.crop.round()
        tensor([[100., 100.]])
    """
    if not callable(embed):
        raise ValueError(f"Expected `embed` to map a list of PIL images to (N, D) embeddings, but got {type(embed).__name__}.")
    images = _check_images("images", images)
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence) or len(references) == 0:
        raise ValueError(f"Expected `references` to be a non-empty list (one entry per subject), but got {references!r:.80}.")

    def run(batch: list) -> torch.Tensor:
        out = embed(batch)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(batch):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"Expected `embed` to return ({len(batch)}, D) embeddings, but got {shape}.")
        return out.float()

    reference_embeddings = []
    for index, entry in enumerate(references):
        if isinstance(entry, torch.Tensor):
            if entry.ndim != 2 or entry.shape[0] == 0:
                raise ValueError(f"Expected `references[{index}]` embeddings of shape (N_s >= 1, D), but got {tuple(entry.shape)}.")
            reference_embeddings.append(entry.float())
        else:
            reference_embeddings.append(run(_check_images(f"references[{index}]", entry)))

    boxes_per_image = [sliding_crops(image.width, image.height, sizes, stride) for image in images]
    pieces = list(images)
    for image, boxes in zip(images, boxes_per_image):
        pieces.extend(image.crop(box) for box in boxes)
    embeddings = run(pieces)
    whole_embeddings, crop_embeddings = embeddings[: len(images)], embeddings[len(images) :]

    whole = torch.stack([similarity_matrix(whole_embeddings, refs).mean(dim=1) for refs in reference_embeddings], dim=1)
    crop_scores = torch.stack(
        [similarity_matrix(crop_embeddings, refs).mean(dim=1) for refs in reference_embeddings], dim=1
    )  # (total crops, S)
    crop_rows, best_rows = [], []
    start = 0
    for boxes in boxes_per_image:
        scores = crop_scores[start : start + len(boxes)]  # (C_i, S)
        best = scores.argmax(dim=0)  # (S,), first maximum on ties
        crop_rows.append(scores.gather(0, best[None]).squeeze(0))
        best_rows.append(torch.tensor(boxes, dtype=torch.long)[best])
        start += len(boxes)
    return SubjectSimilarity(whole=whole, crop=torch.stack(crop_rows), best_box=torch.stack(best_rows))
