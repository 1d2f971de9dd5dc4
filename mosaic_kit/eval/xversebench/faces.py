"""ID-Sim: faces detected, aligned, embedded and compared (`FaceIdentityScorer`).

XVerse's protocol (``eval/tools/face_id.py``, ``idip_face_score.py``), followed here:

1. detect the faces of the generated image and enlarge each box ×1.3 about its centre;
2. crop each enlarged box (PIL crop: rounded coordinates, black outside the image);
3. in each crop and in the reference photo, detect again and align the **first** face with its
   five landmarks onto the 112×112 ArcFace template (a least-squares similarity transform);
4. embed both with a face-recognition network (input in [-1, 1]); the score of a crop is the
   cosine ×100, 0 when either side has no face;
5. a human subject's score on an image is the best crop's, 0 when the image has no face.

The published models, facer's RetinaFace (``retinaface/resnet50``) and an IR-SE50 ArcFace backbone
(``model_ir_se50.pth``), are not in transformers: `FacerRetinaFace` wraps facer where it is
installed, and the embedder is any module given to `ModuleFaceEmbedder` (the IR-SE50 weights need
their own architecture code). `tiny_face_models` builds tiny random stand-ins for tests.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from ...utils.images import pil_to_tensor

__all__ = [
    "ARCFACE_TEMPLATE",
    "FACE_BOX_EXPANSION",
    "Face",
    "FaceDetector",
    "FaceEmbedder",
    "FaceIdentityScorer",
    "FacerRetinaFace",
    "ModuleFaceEmbedder",
    "align_face",
    "expand_box",
    "similarity_transform",
    "tiny_face_models",
]

FACE_BOX_EXPANSION = 1.3
"""XVerse enlarges each detected face box by this factor about its centre before cropping."""

ARCFACE_TEMPLATE = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
"""The five landmarks (left eye, right eye, nose, left and right mouth corner) of a 112×112
aligned face, as face-recognition networks of the ArcFace family expect them."""


@dataclass(frozen=True)
class Face:
    """A detected face.

    Args:
        box: ``(left, top, right, bottom)`` in pixels.
        landmarks: five ``(x, y)`` points in pixels, in `ARCFACE_TEMPLATE` order.
        score: the detector's confidence.
    """

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float = 1.0


class FaceDetector(abc.ABC):
    """Face detection: the faces of an image, most confident first."""

    @abc.abstractmethod
    def detect(self, image: Image.Image) -> list[Face]:
        """The faces of an RGB image."""


class FaceEmbedder(abc.ABC):
    """Face recognition: aligned 112×112 faces in [-1, 1] → one embedding each."""

    @abc.abstractmethod
    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 112, 112)`` → ``(N, D)``."""


def expand_box(box: Sequence[float], factor: float = FACE_BOX_EXPANSION) -> tuple[float, float, float, float]:
    """A box scaled by `factor` about its centre (XVerse's ``expand_bounding_box``).

    Example:
        >>> expand_box((10, 20, 30, 60), 1.5)
        (5.0, 10.0, 35.0, 70.0)
    """
    left, top, right, bottom = (float(v) for v in box)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half_w, half_h = factor * (right - left) / 2, factor * (bottom - top) / 2
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def similarity_transform(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The least-squares similarity transform (rotation, uniform scale, translation) taking the
    `source` points onto the `target` points (Umeyama's closed form, no reflection).

    Args:
        source: ``(P, 2)`` points.
        target: ``(P, 2)`` points, P >= 2.

    Returns:
        ``(2, 3)`` float64 matrix ``M`` with ``target ≈ M[:, :2] @ source + M[:, 2]``.

    Example:
        >>> src = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> m = similarity_transform(src, 2 * src + torch.tensor([3.0, 4.0]))
        >>> m.round(decimals=6).tolist()
        [[2.0, 0.0, 3.0], [0.0, 2.0, 4.0]]
    """
    source, target = source.double(), target.double()
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or source.shape[0] < 2:
        raise ValueError(f"Expected `source` and `target` of shape (P >= 2, 2), but got {tuple(source.shape)} and {tuple(target.shape)}.")
    mean_s, mean_t = source.mean(0), target.mean(0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / source.shape[0]
    u, singular, vh = torch.linalg.svd(covariance)
    sign = torch.ones(2, dtype=torch.float64)
    if torch.det(u) * torch.det(vh) < 0:
        sign[-1] = -1.0
    rotation = u @ torch.diag(sign) @ vh
    variance = centred_s.pow(2).sum(1).mean()
    scale = (singular * sign).sum() / variance
    translation = mean_t - scale * rotation @ mean_s
    return torch.cat([scale * rotation, translation[:, None]], dim=1)


def align_face(image: Image.Image, landmarks: Sequence[Sequence[float]], size: int = 112) -> torch.Tensor:
    """The face of `image` warped so its landmarks land on `ARCFACE_TEMPLATE` (scaled to `size`),
    bilinear, zeros outside the image, as a ``(3, size, size)`` float32 tensor in [-1, 1].

    Example:
        >>> face = align_face(Image.new("RGB", (200, 200), "white"), [(70, 90), (130, 90), (100, 120), (75, 150), (125, 150)])
        >>> face.shape, float(face[:, 56, 56].min())
        (torch.Size([3, 112, 112]), 1.0)
    """
    from kornia.geometry.transform import warp_affine

    points = torch.tensor([list(map(float, p)) for p in landmarks], dtype=torch.float64)
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64) * (size / 112.0)
    if points.shape != template.shape:
        raise ValueError(f"Expected `landmarks` to hold 5 (x, y) points, but got shape {tuple(points.shape)}.")
    matrix = similarity_transform(points, template).float()[None]
    pixels = pil_to_tensor(image.convert("RGB"))[None]
    warped = warp_affine(pixels, matrix, (size, size), mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return warped * 2.0 - 1.0


class ModuleFaceEmbedder(FaceEmbedder):
    """Any `nn.Module` mapping aligned faces ``(N, 3, 112, 112)`` in [-1, 1] to embeddings
    (e.g. an IR-SE50 ArcFace backbone with its weights loaded).

    Args:
        module: the network (put in eval mode).

    Example:
        >>> embedder = ModuleFaceEmbedder(nn.Sequential(nn.Flatten(), nn.Linear(3 * 112 * 112, 8)))
        >>> embedder.embed(torch.zeros(2, 3, 112, 112)).shape
        torch.Size([2, 8])
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"Expected `module` to be a torch.nn.Module, but got {type(module).__name__}.")
        self.module = module.eval()

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """The module's output on `faces` (moved to its device and dtype), float32 on the CPU."""
        parameter = next(self.module.parameters())
        with torch.inference_mode():
            return self.module(faces.to(parameter.device, parameter.dtype)).float().cpu()


class FaceIdentityScorer:
    """ID-Sim of human subjects on generated images (see the module docstring for the protocol).

    Args:
        detector: a `FaceDetector`.
        embedder: a `FaceEmbedder`.
        expansion: box enlargement before cropping; defaults to `FACE_BOX_EXPANSION` (1.3).

    Example:
        >>> detector, embedder = tiny_face_models()
        >>> scorer = FaceIdentityScorer(detector, embedder)
        >>> photo = Image.new("RGB", (64, 64), "tan")
        >>> reference = scorer.embed_reference(photo)
        >>> [round(s) for s in scorer.score(photo, [reference, None])]   # the same picture; no face
        [100, 0]
    """

    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder, *, expansion: float = FACE_BOX_EXPANSION) -> None:
        if not isinstance(detector, FaceDetector):
            raise ValueError(f"Expected `detector` to be a FaceDetector, but got {type(detector).__name__}.")
        if not isinstance(embedder, FaceEmbedder):
            raise ValueError(f"Expected `embedder` to be a FaceEmbedder, but got {type(embedder).__name__}.")
        if isinstance(expansion, bool) or not isinstance(expansion, (int, float)) or expansion <= 0:
            raise ValueError(f"Expected `expansion` to be a number > 0, but got {expansion!r}.")
        self.detector = detector
        self.embedder = embedder
        self.expansion = float(expansion)

    def embed_reference(self, image: Image.Image) -> torch.Tensor | None:
        """The embedding of the first face of `image` (aligned), or None when it has no face."""
        faces = self.detector.detect(image.convert("RGB"))
        if not faces:
            return None
        return self.embedder.embed(align_face(image, faces[0].landmarks)[None])[0]

    def face_crops(self, image: Image.Image) -> list[Image.Image]:
        """The enlarged crops of every face detected in `image`."""
        image = image.convert("RGB")
        return [image.crop(expand_box(face.box, self.expansion)) for face in self.detector.detect(image)]

    def score(self, image: Image.Image, references: Sequence[torch.Tensor | None]) -> list[float]:
        """For each reference embedding, the best cosine ×100 over the faces of `image` (0 when the
        image or the reference has no face, or no crop holds a detectable face).

        Args:
            image: a generated image.
            references: `embed_reference` results, one per human subject.

        Returns:
            One score per reference.
        """
        embeddings = [self.embed_reference(crop) for crop in self.face_crops(image)]
        found = [e for e in embeddings if e is not None]
        scores = []
        for reference in references:
            if reference is None or not found:
                scores.append(0.0)
                continue
            # crops without a face score 0 in XVerse's max, which never beats a cosine ×100 above 0
            best = max(100.0 * float(nn.functional.cosine_similarity(reference, e, dim=0)) for e in found)
            scores.append(max(best, 0.0) if len(found) < len(embeddings) else best)
        return scores


class FacerRetinaFace(FaceDetector):
    """XVerse's face detector, facer's ``retinaface/resnet50`` (not tested here: facer is not a
    dependency of mosaic_kit; facer downloads its weights on first use).

    Args:
        device: where it runs; defaults to "cuda".

    Raises:
        ImportError: naming the package to install, when facer is missing.

    Example:
        >>> detector = FacerRetinaFace("cuda")  # doctest: +SKIP
    """

    def __init__(self, device: str = "cuda") -> None:
        try:
            import facer
        except ImportError as error:
            raise ImportError(
                "XVerse's face detector is facer's RetinaFace, which is not installed: `pip install pyfacer` "
                "(or pass another FaceDetector to FaceIdentityScorer)."
            ) from error
        self.device = torch.device(device)
        self._detector = facer.face_detector("retinaface/resnet50", device=self.device)

    def detect(self, image: Image.Image) -> list[Face]:
        """facer's detections, in its order."""
        pixels = (pil_to_tensor(image.convert("RGB")) * 255).round().to(torch.uint8)[None].to(self.device)
        with torch.inference_mode():
            found = self._detector(pixels)
        if not found or len(found.get("rects", [])) == 0:
            return []
        rects, points = found["rects"].float().cpu().tolist(), found["points"].float().cpu().tolist()
        scores = found["scores"].float().cpu().tolist() if "scores" in found else [1.0] * len(rects)
        return [Face(tuple(r[:4]), tuple(tuple(p) for p in pts), s) for r, pts, s in zip(rects, points, scores)]


class _TinyFaceDetector(nn.Module, FaceDetector):
    """A tiny random network that "finds" one face per image: a box and five landmarks regressed
    from a 32×32 view of the image (noise; only exercises the plumbing)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 14))

    def detect(self, image: Image.Image) -> list[Face]:
        width, height = image.size
        pixels = nn.functional.interpolate(pil_to_tensor(image.convert("RGB"))[None], size=(32, 32), mode="bilinear",
                                           align_corners=False)
        with torch.inference_mode():
            out = torch.sigmoid(self.net(pixels)[0]).tolist()
        x0, x1 = sorted((out[0] * 0.5, 0.5 + out[1] * 0.5))
        y0, y1 = sorted((out[2] * 0.5, 0.5 + out[3] * 0.5))
        box = (x0 * width, y0 * height, x1 * width, y1 * height)
        landmarks = tuple(
            (box[0] + (tx / 112 * 0.8 + 0.1 * out[4 + i]) * (box[2] - box[0]),
             box[1] + (ty / 112 * 0.8 + 0.1 * out[9 + i]) * (box[3] - box[1]))
            for i, (tx, ty) in enumerate(ARCFACE_TEMPLATE)
        )
        return [Face(box, landmarks, 1.0)]


def tiny_face_models(seed: int = 0) -> tuple[FaceDetector, FaceEmbedder]:
    """A tiny random face detector (one face per image, box and landmarks regressed by a small
    conv net) and embedder (a small conv net, 16-dim), built in code for tests and smoke runs.
    Their scores mean nothing. Deterministic given `seed`; the global RNG is untouched.

    Example:
        >>> detector, embedder = tiny_face_models()
        >>> len(detector.detect(Image.new("RGB", (40, 30)))), embedder.embed(torch.zeros(1, 3, 112, 112)).shape
        (1, torch.Size([1, 16]))
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        detector = _TinyFaceDetector().eval()
        embedder = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(32, 16))
    return detector, ModuleFaceEmbedder(embedder)
