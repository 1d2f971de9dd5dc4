"""A local vision-language model behind one call: images + text in, text out (`VisionLanguageModel`).

The XVerseBench DPG score asks it yes/no questions about a generated image
(`mosaic_kit.eval.xversebench.VLMQuestionAnswerer`), and the OmniContext-style judge asks it for
0-10 ratings (`mosaic_kit.eval.judge.MLLMJudge`). Any transformers image-text-to-text model with a
chat template loads by folder or hub id (`VisionLanguageModel.from_pretrained`: Qwen2.5-VL,
Idefics3/SmolVLM, LLaVA, ...); `tiny_vision_language_model` builds a tiny random LLaVA in code
for tests and smoke runs (its answers are noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

__all__ = ["VisionLanguageModel", "tiny_vision_language_model"]


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The vision-language scorers need transformers; install it with `pip install mosaic_kit[flux]`."
        ) from error
    return transformers


def _check_image_list(name: str, images: object) -> list[Image.Image]:
    if isinstance(images, Image.Image) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"Expected `{name}` to be a non-empty list of PIL images, but got {type(images).__name__}.")
    out = []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"Expected `{name}[{index}]` to be a PIL image, but got {type(image).__name__}.")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


class VisionLanguageModel:
    """A transformers vision-language model and its processor, asked one prompt at a time.

    `generate(images, text)` builds one user turn holding the images (in order) and then the text,
    renders it with the processor's chat template, and decodes greedily (deterministic).

    Args:
        model: a transformers image-text-to-text model (e.g. from `AutoModelForImageTextToText`).
        processor: its processor (`AutoProcessor`), with a chat template.
        max_new_tokens: the answer length limit; defaults to 256.

    Raises:
        ValueError: if the processor has no chat template or `max_new_tokens` < 1.

    Example:
        >>> vlm = tiny_vision_language_model()
        >>> answer = vlm.generate([Image.new("RGB", (24, 24), "red")], "Is there a dog?", max_new_tokens=3)
        >>> isinstance(answer, str)
        True
    """

    def __init__(self, model: torch.nn.Module, processor: Any, *, max_new_tokens: int = 256) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate"):
            raise ValueError(f"Expected `model` to be a transformers generation model, but got {type(model).__name__}.")
        if not getattr(processor, "chat_template", None):
            raise ValueError(
                f"Expected `processor` to have a chat template, but {type(processor).__name__} has none; "
                "set `processor.chat_template`."
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"Expected `max_new_tokens` to be an int >= 1, but got {max_new_tokens!r}.")
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        max_new_tokens: int = 256,
    ) -> VisionLanguageModel:
        """Loads `AutoModelForImageTextToText` and `AutoProcessor` from a local folder or hub id
        (never with remote code).

        Args:
            name_or_path: e.g. `Qwen/Qwen2.5-VL-7B-Instruct` or a local folder.
            device: where the model runs; defaults to "cpu".
            dtype: model dtype; defaults to bfloat16.
            max_new_tokens: the answer length limit; defaults to 256.

        Returns:
            A `VisionLanguageModel`.

        Example:
            >>> vlm = VisionLanguageModel.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", device="cuda")  # doctest: +SKIP
        """
        if not isinstance(name_or_path, str) or not name_or_path:
            raise ValueError(f"Expected `name_or_path` to be a folder or hub id, but got {name_or_path!r}.")
        transformers = _require_transformers()
        model = transformers.AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).to(device)
        processor = transformers.AutoProcessor.from_pretrained(name_or_path)
        return cls(model, processor, max_new_tokens=max_new_tokens)

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return next(self.model.parameters()).device

    def generate(self, images: Sequence[Image.Image], text: str, *, max_new_tokens: int | None = None) -> str:
        """The model's answer to one user turn: `images` (in order), then `text`.

        Args:
            images: PIL images, at least one (converted to RGB).
            text: the question or instruction.
            max_new_tokens: overrides the instance's limit for this call.

        Returns:
            The decoded answer without special tokens, stripped.

        Raises:
            ValueError: on an empty image list or a non-string `text`.
        """
        images = _check_image_list("images", images)
        if not isinstance(text, str) or not text:
            raise ValueError(f"Expected `text` to be a non-empty string, but got {text!r:.80}.")
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(images=images, text=prompt, return_tensors="pt").to(self.device)
        floating = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(floating)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=limit, do_sample=False)
        answer = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(answer, skip_special_tokens=True)[0].strip()


_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vision_language_model(seed: int = 0, *, max_new_tokens: int = 16) -> VisionLanguageModel:
    """A tiny random LLaVA (CLIP vision tower + Qwen2 language model) built in code, with a
    byte-level tokenizer and a chat template: every step of `VisionLanguageModel` runs, in well
    under a second per answer on a CPU; its answers are noise. Deterministic given `seed`; the
    global RNG is untouched.

    Images are resized and centre-cropped to 16×16 (2×2 patches of 8, plus CLS: 5 image tokens).

    Args:
        seed: seed of the random weights; defaults to 0.
        max_new_tokens: the answer length limit; defaults to 16.

    Returns:
        A `VisionLanguageModel` on the CPU in float32.

    Example:
        >>> type(tiny_vision_language_model().model).__name__
        'LlavaForConditionalGeneration'
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Expected `seed` to be a non-negative int, but got {seed!r}.")
    transformers = _require_transformers()
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = transformers.Qwen2TokenizerFast(
        vocab=vocab, merges=[], unk_token="<|endoftext|>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        bos_token=None,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [transformers.AddedToken(t, special=True, normalized=False) for t in specials[1:]]}
    )
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_processor_class(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        image_token="<image>", chat_template=_TINY_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=8,
        ),
        text_config=transformers.Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return VisionLanguageModel(model, processor, max_new_tokens=max_new_tokens)
