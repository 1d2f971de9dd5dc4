"""Image–image and image–text similarity metrics: CLIP-I, CLIP-T and DINO (DreamBench).

All three are cosine similarities of embeddings, multiplied by 100 as in the DreamBooth and
MOSAIC papers:

- **CLIP-I**: CLIP image embedding of a generated image against the CLIP image embeddings of the
  subject's real images (mean over the real images);
- **CLIP-T**: CLIP image embedding of a generated image against the CLIP text embedding of its
  prompt;
- **DINO**: the CLS token of a self-supervised DINO ViT-S/16 (`facebook/dino-vits16`) for a
  generated image against the same for the real images (mean over the real images).

Models come through transformers, from a local folder or a hub id (`CLIPScorer.from_pretrained`,
`DINOScorer.from_pretrained`), or as model objects built by the caller; `tiny_clip_scorer` and
`tiny_dino_scorer` build tiny random ones in code for tests and smoke runs. Preprocessing is the
model's own transformers image processor. Images go through the model in batches of
`batch_size`, with an optional tqdm progress bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "CLIPScorer",
    "DINOScorer",
    "ImageEmbedder",
    "mean_similarity",
    "similarity_matrix",
    "tiny_clip_scorer",
    "tiny_dino_scorer",
]


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The evaluation metrics need transformers; install it with `pip install mosaic_kit[flux]`."
        ) from error
    return transformers


def _check_images(name: str, images: object) -> list:
    """Returns ``images`` as a non-empty list of RGB PIL images; raises ValueError otherwise."""
    from PIL import Image

    if isinstance(images, Image.Image):
        raise ValueError(f"Expected `{name}` to be a list of PIL images, but got a single PIL image; wrap it in a list.")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"Expected `{name}` to be a non-empty list of PIL images, but got {images!r:.80}.")
    out = []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"Expected `{name}[{index}]` to be a PIL image, but got {type(image).__name__}.")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be an int >= 1, but got {batch_size!r}.")
    return batch_size


def _pooled(output: Any) -> torch.Tensor:
    """The embedding tensor of a `get_*_features` result (a tensor in transformers 4, an output
    object whose `pooler_output` is the projected embedding in transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ×100 of every row of `a` with every row of `b`.

    Args:
        a: `(N_a, D)` float embeddings (any norm, not all-zero rows).
        b: `(N_b, D)` float embeddings.

    Returns:
        `(N_a, N_b)` float32 tensor in [-100, 100].

    Raises:
        ValueError: if `a` or `b` is not 2-D or their widths differ.

    Example:
        >>> similarity_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0]]))
        tensor([[100.0000],
                [ 70.7107]])
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"Expected `{name}` to be a (N, D) tensor, but got {shape}.")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Expected `a` and `b` with the same width D, but got {a.shape[1]} and {b.shape[1]}.")
    a = nn.functional.normalize(a.float(), dim=-1)
    b = nn.functional.normalize(b.float(), dim=-1)
    return 100.0 * a @ b.T


def mean_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each generated embedding, the mean cosine similarity ×100 to all reference embeddings
    (the DreamBench CLIP-I / DINO score of one image).

    Args:
        generated: `(N_gen, D)` embeddings of generated images.
        references: `(N_ref, D)` embeddings of the subject's real images.

    Returns:
        `(N_gen,)` float32 tensor.

    Example:
        >>> mean_similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([50.])
    """
    return similarity_matrix(generated, references).mean(dim=1)


class ImageEmbedder:
    """Base of the scorers: runs an image model in batches and returns unit-norm embeddings.

    Subclasses implement `_embed_batch` (pixel values → embeddings). Not meant to be built
    directly; use `CLIPScorer` or `DINOScorer`.

    Args:
        model: the transformers model (put in eval mode; inputs go to its device and dtype).
        image_processor: a transformers image processor; `image_processor(images=[...],
            return_tensors="pt")["pixel_values"]` must give the model's input.
        batch_size: images per forward pass; defaults to 32.
        progress: show a tqdm progress bar over batches; defaults to False.

    Example:
        >>> scorer = tiny_dino_scorer()
        >>> isinstance(scorer, ImageEmbedder)
        True
    """

    def __init__(self, model: nn.Module, image_processor: Any, *, batch_size: int = 32, progress: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
        if not callable(image_processor):
            raise ValueError(
                f"Expected `image_processor` to be a transformers image processor, but got {type(image_processor).__name__}."
            )
        self.model = model.eval()
        self.image_processor = image_processor
        self.batch_size = _check_batch_size(batch_size)
        self.progress = bool(progress)

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def _embed_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _batches(self, count: int, description: str):
        starts = range(0, count, self.batch_size)
        return tqdm(starts, desc=description, disable=not self.progress or len(starts) < 2, leave=False)

    def embed_images(self, images: Sequence) -> torch.Tensor:
        """Unit-norm embeddings of PIL images, in batches of `batch_size`.

        Args:
            images: a non-empty list of PIL images (converted to RGB).

        Returns:
            `(N, D)` float32 tensor on the CPU, each row of norm 1.

        Raises:
            ValueError: if `images` is not a non-empty list of PIL images.

        Example:
            >>> from PIL import Image
            >>> scorer = tiny_dino_scorer()
            >>> scorer.embed_images([Image.new("RGB", (40, 30), "red")]).shape
            torch.Size([1, 32])
        """
        images = _check_images("images", images)
        out = []
        with torch.inference_mode():
            for start in self._batches(len(images), f"{type(self).__name__}: images"):
                pixels = self.image_processor(images=images[start : start + self.batch_size], return_tensors="pt")
                pixels = pixels["pixel_values"].to(device=self.device, dtype=self.dtype)
                out.append(self._embed_batch(pixels).float().cpu())
        return nn.functional.normalize(torch.cat(out), dim=-1)

    def image_similarity(self, generated: Sequence, references: Sequence) -> torch.Tensor:
        """For each generated image, the mean cosine similarity ×100 of its embedding to the
        embeddings of all `references` (CLIP-I for `CLIPScorer`, DINO for `DINOScorer`).

        Args:
            generated: PIL images to score.
            references: PIL images of the subject (the real photos).

        Returns:
            `(len(generated),)` float32 tensor; its mean is the DreamBench score of the set.

        Example:
            >>> from PIL import Image
            >>> scorer = tiny_dino_scorer()
            >>> red = Image.new("RGB", (32, 32), "red")
            >>> scorer.image_similarity([red], [red]).round()
            tensor([100.])
        """
        return mean_similarity(self.embed_images(generated), self.embed_images(references))


class CLIPScorer(ImageEmbedder):
    """CLIP-I and CLIP-T with a transformers `CLIPModel`.

    Image embeddings are `model.get_image_features` (the projected pooled vision output), text
    embeddings `model.get_text_features`; both unit-normalised. Prompts longer than the text
    model's positions are truncated.

    Args:
        model: a `transformers.CLIPModel`.
        image_processor: its image processor (e.g. `CLIPImageProcessor`).
        tokenizer: its tokenizer (e.g. `CLIPTokenizer`).
        batch_size: images or prompts per forward pass; defaults to 32.
        progress: show a tqdm progress bar over batches; defaults to False.

    Example:
        >>> from PIL import Image
        >>> scorer = tiny_clip_scorer()
        >>> images = [Image.new("RGB", (48, 32), "red"), Image.new("RGB", (32, 32), "blue")]
        >>> scorer.clip_i(images, images[:1]).shape, scorer.clip_t(images, "a red square").shape
        (torch.Size([2]), torch.Size([2]))
    """

    def __init__(
        self,
        model: nn.Module,
        image_processor: Any,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        progress: bool = False,
    ) -> None:
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise ValueError(
                "Expected `model` to be a transformers CLIPModel (with get_image_features and get_text_features), "
                f"but got {type(model).__name__}."
            )
        if not callable(tokenizer):
            raise ValueError(f"Expected `tokenizer` to be a transformers tokenizer, but got {type(tokenizer).__name__}.")
        super().__init__(model, image_processor, batch_size=batch_size, progress=progress)
        self.tokenizer = tokenizer
        self.max_text_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        progress: bool = False,
    ) -> CLIPScorer:
        """Loads a CLIP model, image processor and tokenizer from a local folder or hub id.

        Args:
            name_or_path: e.g. `openai/clip-vit-base-patch32` (a hub id is downloaded by
                transformers on first use) or a local folder with the same files.
            device: where the model runs; defaults to "cpu".
            dtype: model dtype; defaults to float32.
            batch_size: images or prompts per forward pass; defaults to 32.
            progress: show progress bars; defaults to False.

        Returns:
            A `CLIPScorer`.

        Example:
            >>> scorer = CLIPScorer.from_pretrained("openai/clip-vit-base-patch32")  # doctest: +SKIP
        """
        if not isinstance(name_or_path, str) or not name_or_path:
            raise ValueError(f"Expected `name_or_path` to be a folder or hub id, but got {name_or_path!r}.")
        transformers = _require_transformers()
        model = transformers.CLIPModel.from_pretrained(name_or_path).to(device=device, dtype=dtype)
        image_processor = transformers.AutoImageProcessor.from_pretrained(name_or_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        return cls(model, image_processor, tokenizer, batch_size=batch_size, progress=progress)

    def _embed_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings, in batches of `batch_size`.

        Args:
            texts: a non-empty list of strings.

        Returns:
            `(N, D)` float32 tensor on the CPU.

        Raises:
            ValueError: if `texts` is not a non-empty list of strings.

        Example:
            >>> tiny_clip_scorer().embed_texts(["a dog", "a cat"]).shape
            torch.Size([2, 16])
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts or not all(
            isinstance(text, str) for text in texts
        ):
            raise ValueError(f"Expected `texts` to be a non-empty list of strings, but got {texts!r:.80}.")
        out = []
        with torch.inference_mode():
            for start in self._batches(len(texts), "CLIPScorer: texts"):
                tokens = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_text_length,
                    return_tensors="pt",
                )
                features = self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
                out.append(_pooled(features).float().cpu())
        return nn.functional.normalize(torch.cat(out), dim=-1)

    def clip_i(self, generated: Sequence, references: Sequence) -> torch.Tensor:
        """CLIP-I of each generated image: mean cosine ×100 to the references' CLIP embeddings.

        Args:
            generated: PIL images to score.
            references: PIL images of the subject.

        Returns:
            `(len(generated),)` float32 tensor.

        Example:
            >>> from PIL import Image
            >>> image = Image.new("RGB", (32, 32), "green")
            >>> tiny_clip_scorer().clip_i([image], [image]).round()
            tensor([100.])
        """
        return self.image_similarity(generated, references)

    def clip_t(self, images: Sequence, texts: str | Sequence[str]) -> torch.Tensor:
        """CLIP-T of each image: cosine ×100 of its CLIP embedding and its prompt's.

        Args:
            images: PIL images.
            texts: one prompt for all images, or one prompt per image.

        Returns:
            `(len(images),)` float32 tensor.

        Raises:
            ValueError: if `texts` is a list whose length differs from `images`.

        Example:
            >>> from PIL import Image
            >>> scores = tiny_clip_scorer().clip_t([Image.new("RGB", (32, 32))] * 2, ["a", "b"])
            >>> scores.shape, bool((scores.abs() <= 100).all())
            (torch.Size([2]), True)
        """
        images = _check_images("images", images)
        if isinstance(texts, str):
            unique = [texts]
            index = torch.zeros(len(images), dtype=torch.long)
        else:
            if not isinstance(texts, Sequence) or len(texts) != len(images):
                got = len(texts) if isinstance(texts, Sequence) else type(texts).__name__
                raise ValueError(f"Expected `texts` to be a string or {len(images)} strings (one per image), but got {got}.")
            unique = sorted(set(texts))
            position = {text: i for i, text in enumerate(unique)}
            index = torch.tensor([position[text] for text in texts], dtype=torch.long)
        text_embeddings = self.embed_texts(unique)[index]
        image_embeddings = self.embed_images(images)
        return 100.0 * (image_embeddings * text_embeddings).sum(dim=-1)


class DINOScorer(ImageEmbedder):
    """The DreamBench DINO score with a transformers ViT (DINO ViT-S/16, `facebook/dino-vits16`).

    The embedding of an image is the CLS token of the model's last hidden state (after its final
    layer norm), unit-normalised; the pooler head, if any, is not used.

    Args:
        model: a transformers vision model whose output has `last_hidden_state` with the CLS
            token first (`ViTModel`, `Dinov2Model`, ...).
        image_processor: its image processor (e.g. `ViTImageProcessor`).
        batch_size: images per forward pass; defaults to 32.
        progress: show a tqdm progress bar over batches; defaults to False.

    Example:
        >>> from PIL import Image
        >>> scorer = tiny_dino_scorer()
        >>> a, b = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
        >>> scorer.dino([a, b], [a]).shape
        torch.Size([2])
    """

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        progress: bool = False,
    ) -> DINOScorer:
        """Loads a DINO ViT and its image processor from a local folder or hub id.

        Args:
            name_or_path: e.g. `facebook/dino-vits16` (DreamBench's DINO ViT-S/16) or a local
                folder with the same files.
            device: where the model runs; defaults to "cpu".
            dtype: model dtype; defaults to float32.
            batch_size: images per forward pass; defaults to 32.
            progress: show progress bars; defaults to False.

        Returns:
            A `DINOScorer`.

        Example:
            >>> scorer = DINOScorer.from_pretrained("facebook/dino-vits16")  # doctest: +SKIP
        """
        if not isinstance(name_or_path, str) or not name_or_path:
            raise ValueError(f"Expected `name_or_path` to be a folder or hub id, but got {name_or_path!r}.")
        transformers = _require_transformers()
        model = transformers.AutoModel.from_pretrained(name_or_path).to(device=device, dtype=dtype)
        image_processor = transformers.AutoImageProcessor.from_pretrained(name_or_path)
        return cls(model, image_processor, batch_size=batch_size, progress=progress)

    def _embed_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]

    def dino(self, generated: Sequence, references: Sequence) -> torch.Tensor:
        """DINO score of each generated image: mean cosine ×100 of CLS embeddings to the references'.

        Args:
            generated: PIL images to score.
            references: PIL images of the subject.

        Returns:
            `(len(generated),)` float32 tensor.

        Example:
            >>> from PIL import Image
            >>> image = Image.new("RGB", (32, 32), "green")
            >>> tiny_dino_scorer().dino([image], [image]).round()
            tensor([100.])
        """
        return self.image_similarity(generated, references)


def _image_processor(transformers: Any, name: str, **kwargs: Any) -> Any:
    """The PIL-backend image processor class when transformers has one (v5: the default class
    needs torchvision), else the classic class."""
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return cls(**kwargs)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Expected `seed` to be a non-negative int, but got {seed!r}.")
    return seed


def _tiny_clip_tokenizer(transformers: Any) -> Any:
    """A CLIP tokenizer over the 256 byte-level symbols (with and without `</w>`), no merges:
    any text tokenizes, one token per byte (the same vocabulary as
    `mosaic_kit.pipelines.tiny.tiny_clip_tokenizer`, built here so that the metrics do not import
    the pipelines and diffusers)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def tiny_clip_scorer(seed: int = 0, *, batch_size: int = 32, progress: bool = False) -> CLIPScorer:
    """A `CLIPScorer` around a tiny random CLIP built in code (tests, smoke runs, CPU demos).

    Vision: 32×32 input (images are resized to 32 on the short side and centre-cropped, with
    CLIP's normalisation), 8×8 patches, 2 layers of width 32; text: a byte-level CLIP tokenizer
    (the vocabulary of `mosaic_kit.pipelines.tiny.tiny_clip_tokenizer`), 2 layers of width 32;
    projection 16. Its
    scores mean nothing; they only exercise the code. Deterministic given `seed`; the global RNG
    is untouched.

    Args:
        seed: seed of the random weights; defaults to 0.
        batch_size: images or prompts per forward pass; defaults to 32.
        progress: show progress bars; defaults to False.

    Returns:
        A `CLIPScorer`.

    Example:
        >>> scorer = tiny_clip_scorer(seed=1)
        >>> scorer.embed_texts(["a photo"]).norm().round()
        tensor(1.)
    """
    seed = _check_seed(seed)
    transformers = _require_transformers()
    tokenizer = _tiny_clip_tokenizer(transformers)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
    image_processor = _image_processor(
        transformers, "CLIPImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPScorer(model, image_processor, tokenizer, batch_size=batch_size, progress=progress)


def tiny_dino_scorer(seed: int = 0, *, batch_size: int = 32, progress: bool = False) -> DINOScorer:
    """A `DINOScorer` around a tiny random ViT built in code (tests, smoke runs, CPU demos).

    A `transformers.ViTModel` with 32×32 input (images resized to 32×32 with ImageNet
    normalisation), 8×8 patches, 2 layers of width 32, no pooler. Its scores mean nothing.
    Deterministic given `seed`; the global RNG is untouched.

    Args:
        seed: seed of the random weights; defaults to 0.
        batch_size: images per forward pass; defaults to 32.
        progress: show progress bars; defaults to False.

    Returns:
        A `DINOScorer`.

    Example:
        >>> tiny_dino_scorer(seed=2).model.config.hidden_size
        32
    """
    seed = _check_seed(seed)
    transformers = _require_transformers()
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.ViTModel(config, add_pooling_layer=False)
    image_processor = _image_processor(
        transformers,
        "ViTImageProcessor",
        size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return DINOScorer(model, image_processor, batch_size=batch_size, progress=progress)
