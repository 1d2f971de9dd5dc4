"""Stage 1: prompts for multi-subject scenes, each with the list of subjects it names.

- `PromptTemplates` samples prompts from templates with slots (subjects by category, a count of
  subjects, an interaction, a scene, a style) without repeats under a seed.
- `prompts_from_file` reads prompts you already have (JSON list or JSONL).
- `InstructionRewriter` optionally rewrites prompts with a local instruction model through
  transformers; a rewrite that loses a listed subject is rejected and the template's prompt kept.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .records import item_seed, read_text_utf8

__all__ = ["DEFAULT_TEMPLATES", "InstructionRewriter", "PromptRecord", "PromptTemplates", "prompts_from_file",
           "subjects_mentioned", "tiny_instruction_model"]

DEFAULT_TEMPLATES = (
    "{style} of {subjects} {interaction} {scene}",
    "{subjects} {interaction} {scene}, {style}",
)
"""Templates used when a config names none. Slots: ``{subjects}``, ``{interaction}``, ``{scene}``, ``{style}``."""

_ID = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class PromptRecord:
    """One prompt and what later stages check against it.

    Attributes:
        id: the item id (letters, digits, ``.``, ``_``, ``-``).
        prompt: the text given to the image model.
        subjects: the subject names to detect, one per subject in the scene (a name may repeat:
            two dogs are ``["dog", "dog"]``).
        identities: optional per-subject identities (e.g. DreamBench folder names), else None.
        template: the template (or source file) the prompt came from.
        slots: the slot values.
        rewritten: whether an instruction model's rewrite replaced the template's prompt.
        provenance: how the prompt was made (sampler, seed, rewriter, rejected rewrites).

    Examples:
        >>> PromptRecord("p0", "a dog and a cat", ["dog", "cat"]).to_dict()["subjects"]
        ['dog', 'cat']
    """

    id: str
    prompt: str
    subjects: list[str]
    identities: list[str] | None = None
    template: str = ""
    slots: dict[str, Any] = field(default_factory=dict)
    rewritten: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise ValueError(f"Expected `id` of letters, digits, '.', '_', '-', but got {self.id!r}.")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"Expected `prompt` to be a non-empty string, but got {self.prompt!r} (item {self.id}).")
        if not isinstance(self.subjects, list) or not self.subjects or not all(isinstance(s, str) and s.strip() for s in self.subjects):
            raise ValueError(f"Expected `subjects` to be a non-empty list of names, but got {self.subjects!r} (item {self.id}).")
        if self.identities is not None and len(self.identities) != len(self.subjects):
            raise ValueError(f"Expected `identities` with one entry per subject ({len(self.subjects)}), "
                             f"but got {self.identities!r} (item {self.id}).")

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PromptRecord:
        """The record from `to_dict`'s output."""
        return cls(**dict(values))


def subjects_mentioned(text: str, subjects: Sequence[str]) -> list[str]:
    """The subjects of ``subjects`` that ``text`` does not mention as whole words (case-insensitive).

    A name listed ``n`` times needs ``n`` mentions, or one plural mention (``dogs``, ``boxes``).

    Returns:
        The missing names (empty when every subject is mentioned).

    Examples:
        >>> subjects_mentioned("A dog chases a red ball", ["dog", "ball", "cat"])
        ['cat']
        >>> subjects_mentioned("two dogs in the snow", ["dog", "dog"])
        []
    """
    lowered = text.lower()
    missing = []
    for name in dict.fromkeys(subjects):
        wanted = subjects.count(name)
        word = re.escape(name.lower())
        singular = len(re.findall(rf"\b{word}\b", lowered))
        plural = len(re.findall(rf"\b{word}(?:s|es)\b", lowered))
        if not plural and singular < wanted:
            missing.extend([name] * (wanted - singular))
    return missing


def _article(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


@dataclass
class PromptTemplates:
    """Prompts sampled from templates with slots, without repeats under a seed.

    Each prompt draws a count in ``[min_subjects, max_subjects]``, that many distinct categories
    (with ``distinct_categories``; else categories may repeat), one subject name per category, a
    template, an interaction, a scene and a style. A drawn combination that was already sampled
    is drawn again (no repeated prompt text); sampling stops with an error when ``max_tries`` draws
    in a row repeat. Prompt ``i`` depends only on the seed and on ``i`` (the first ``n`` prompts
    are the same whatever the total).

    Args:
        categories: category → subject names (e.g. ``{"animal": ["dog", "cat"], ...}``).
        templates: format strings with ``{subjects}`` and optionally ``{interaction}``,
            ``{scene}``, ``{style}``.
        interactions: phrases such as ``"playing together"``.
        scenes: phrases such as ``"on a beach"``.
        styles: phrases such as ``"a photo"``.
        min_subjects: fewest subjects per prompt, ``>= 1`` (the paper: 2).
        max_subjects: most subjects per prompt (the paper: up to 6).
        distinct_categories: draw each prompt's subjects from different categories.
        max_tries: consecutive repeated draws before giving up.

    Examples:
        >>> sampler = PromptTemplates({"animal": ["dog", "cat"], "object": ["teapot", "clock"]},
        ...                           scenes=["on a beach"], styles=["a photo"], interactions=["next to each other"])
        >>> records = sampler.sample(3, seed=0)
        >>> [r.id for r in records], all(len(r.subjects) == 2 for r in records)
        (['p000000', 'p000001', 'p000002'], True)
        >>> [r.prompt for r in records] == [r.prompt for r in sampler.sample(3, seed=0)]
        True
    """

    categories: dict[str, list[str]]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    interactions: list[str] = field(default_factory=lambda: ["together"])
    scenes: list[str] = field(default_factory=lambda: ["in a room"])
    styles: list[str] = field(default_factory=lambda: ["a photo"])
    min_subjects: int = 2
    max_subjects: int = 2
    distinct_categories: bool = True
    max_tries: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.categories, Mapping) or not self.categories or not all(
            isinstance(names, Sequence) and not isinstance(names, str) and names and all(isinstance(n, str) and n for n in names)
            for names in self.categories.values()
        ):
            raise ValueError(f"Expected `categories` to map category names to non-empty lists of subject names, "
                             f"but got {self.categories!r}.")
        for name in ("templates", "interactions", "scenes", "styles"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence) or not value or not all(isinstance(v, str) for v in value):
                raise ValueError(f"Expected `{name}` to be a non-empty list of strings, but got {value!r}.")
        for template in self.templates:
            if "{subjects}" not in template:
                raise ValueError(f"Expected every template to hold the slot {{subjects}}, but got {template!r}.")
        for name in ("min_subjects", "max_subjects", "max_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}.")
        if self.max_subjects < self.min_subjects:
            raise ValueError(f"Expected `max_subjects` >= `min_subjects` ({self.min_subjects}), but got {self.max_subjects}.")
        if self.distinct_categories and self.max_subjects > len(self.categories):
            raise ValueError(f"Expected `max_subjects` <= the number of categories ({len(self.categories)}) with "
                             f"`distinct_categories`, but got {self.max_subjects}.")

    def _draw(self, rng: random.Random) -> tuple[str, dict[str, Any], list[str]]:
        count = rng.randint(self.min_subjects, self.max_subjects)
        names = sorted(self.categories)
        chosen = rng.sample(names, count) if self.distinct_categories else [rng.choice(names) for _ in range(count)]
        subjects = [rng.choice(list(self.categories[c])) for c in chosen]
        template = rng.choice(self.templates)
        slots = {
            "subjects": subjects,
            "categories": chosen,
            "interaction": rng.choice(self.interactions),
            "scene": rng.choice(self.scenes),
            "style": rng.choice(self.styles),
        }
        return template, slots, subjects

    def sample(self, count: int, seed: int = 0, prefix: str = "p") -> list[PromptRecord]:
        """``count`` prompts ``<prefix>000000``, ``<prefix>000001``, ... under ``seed``.

        Raises:
            ValueError: when ``count`` is not a non-negative int, or when fewer distinct prompts
                exist than asked (``max_tries`` repeated draws in a row).
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"Expected `count` to be a non-negative int, but got {count!r}.")
        rng = random.Random(seed)
        seen: set[str] = set()
        records = []
        for index in range(count):
            for _ in range(self.max_tries):
                template, slots, subjects = self._draw(rng)
                text = template.format(
                    subjects=_join([_article(s) for s in subjects]), interaction=slots["interaction"],
                    scene=slots["scene"], style=slots["style"],
                )
                text = text[:1].upper() + text[1:]
                if text not in seen:
                    break
            else:
                raise ValueError(f"Expected `count` <= the number of distinct prompts of these templates, but got {count}: "
                                 f"{self.max_tries} draws in a row repeated earlier prompts after {index}.")
            seen.add(text)
            records.append(PromptRecord(
                id=f"{prefix}{index:06d}", prompt=text, subjects=subjects, template=template, slots=slots,
                provenance={"source": "templates", "seed": seed},
            ))
        return records


def prompts_from_file(path: str | Path, names: Mapping[str, str] | None = None, prefix: str = "p") -> list[PromptRecord]:
    """Prompts you already have: a JSON list or a JSONL file of objects.

    Each object holds ``prompt`` and ``subjects`` (one name per subject), and optionally ``id``
    (default ``<prefix>000000``, ... in file order). A prompt may name its subjects with
    placeholders ``{name}`` (the DreamBench ``pairs_multi.json`` form, e.g. ``"a {dog2} and a
    {clock}"``): then each placeholder is replaced by ``names[name]`` (default: the name with
    ``_`` as spaces), the record's ``subjects`` are those display names (what a detector looks
    for) and its ``identities`` the placeholders.

    Args:
        path: ``.json`` (a list) or ``.jsonl`` (one object per line).
        names: optional placeholder → display name (e.g. DreamBench folder → class noun).
        prefix: id prefix for objects without ``id``.

    Returns:
        One `PromptRecord` per object.

    Raises:
        ValueError: naming the file and the entry, for a missing file, text that is not UTF-8 (the
            line and column of the bad byte), bad JSON or a bad entry.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "prompts.json"
        >>> _ = path.write_text(json.dumps([{"subjects": ["dog2", "clock"], "prompt": "a {dog2} and a {clock}"}]))
        >>> record, = prompts_from_file(path, names={"dog2": "dog"})
        >>> record.prompt, record.subjects, record.identities
        ('a dog and a clock', ['dog', 'clock'], ['dog2', 'clock'])
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Expected `path` to be a prompt file (.json or .jsonl), but {path} is not a file.")
    text = read_text_utf8(path)
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: expected JSON, but parsing failed: {error}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of prompt objects, but got {type(rows).__name__}")
    names = dict(names or {})
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("subjects"), list):
            raise ValueError(f"{path}: entry {index} must be an object with `prompt` (string) and `subjects` (list), "
                             f"but got {row!r}")
        subjects = row["subjects"]
        prompt = row["prompt"]
        identities = None
        if any("{" + str(s) + "}" in prompt for s in subjects):
            identities = list(subjects)
            display = {s: names.get(s, str(s).replace("_", " ")) for s in subjects}
            subjects = [display[s] for s in identities]
            for placeholder, shown in display.items():
                prompt = prompt.replace("{" + placeholder + "}", shown)
        try:
            records.append(PromptRecord(
                id=row.get("id", f"{prefix}{index:06d}"), prompt=prompt, subjects=subjects, identities=identities,
                template=row["prompt"], provenance={"source": "file", "path": str(path), "index": index},
            ))
        except ValueError as error:
            raise ValueError(f"{path}: entry {index}: {error}") from None
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ValueError(f"{path}: expected unique ids, but {record.id!r} repeats")
        seen.add(record.id)
    return records


class InstructionRewriter:
    """Rewrites prompts with a local instruction model (any transformers causal LM).

    The model is asked (through its chat template when the tokenizer has one) to rewrite the prompt
    into a richer scene description keeping every subject. The answer is kept only when it still
    names every listed subject (`subjects_mentioned`) and is at most ``max_chars`` long; otherwise
    the template's prompt is kept and the rejected answer is recorded in the provenance. Decoding
    is seeded per item (`item_seed`), so a rerun gives the same rewrite.

    Args:
        model: a transformers causal LM (`generate`).
        tokenizer: its tokenizer.
        instruction: the request; ``{prompt}`` and ``{subjects}`` are filled in.
        max_new_tokens: most generated tokens.
        temperature: sampling temperature; 0 decodes greedily.
        max_chars: longest accepted rewrite.
        seed: the run's seed.
        name: what the provenance calls the model (its hub id or path).

    Examples:
        >>> model, tokenizer = tiny_instruction_model()
        >>> rewriter = InstructionRewriter(model, tokenizer, max_new_tokens=4)
        >>> record = rewriter(PromptRecord("p0", "a dog and a cat", ["dog", "cat"]))
        >>> record.prompt, record.rewritten, "rejected" in record.provenance["rewrite"]  # gibberish is refused
        ('a dog and a cat', False, True)
    """

    INSTRUCTION = ("Rewrite this image prompt as one vivid sentence. Keep every subject ({subjects}) and nothing "
                   "else important. Prompt: {prompt}\nRewritten:")

    def __init__(self, model: Any, tokenizer: Any, *, instruction: str | None = None, max_new_tokens: int = 77,
                 temperature: float = 0.7, max_chars: int = 400, seed: int = 0, name: str = "model") -> None:
        if not hasattr(model, "generate"):
            raise ValueError(f"Expected `model` to be a transformers causal LM (with generate), but got {type(model).__name__}.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"Expected `max_new_tokens` to be an int >= 1, but got {max_new_tokens!r}.")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"Expected `temperature` >= 0, but got {temperature!r}.")
        self.model, self.tokenizer = model, tokenizer
        self.instruction = instruction or self.INSTRUCTION
        self.max_new_tokens, self.temperature, self.max_chars = max_new_tokens, float(temperature), max_chars
        self.seed, self.name = seed, name

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> InstructionRewriter:
        """Loads a causal LM and its tokenizer from a hub id or a local folder (no remote code)."""
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        return cls(model, tokenizer, name=name_or_path, **kwargs)

    def _request(self, record: PromptRecord) -> str:
        text = self.instruction.format(prompt=record.prompt, subjects=", ".join(record.subjects))
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    @torch.no_grad()
    def rewrite(self, record: PromptRecord) -> str:
        """The model's raw answer for one record (decoded, stripped)."""
        inputs = self.tokenizer(self._request(record), return_tensors="pt").to(self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, record.id))
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                temperature=self.temperature if self.temperature > 0 else None, top_p=None, top_k=None, pad_token_id=pad,
            )
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return " ".join(answer.split())

    def __call__(self, record: PromptRecord) -> PromptRecord:
        """The record with the model's rewrite when it keeps every subject (`apply`)."""
        return self.apply(record, self.rewrite(record))

    def apply(self, record: PromptRecord, answer: str) -> PromptRecord:
        """The record with ``answer`` as its prompt when ``answer`` is non-empty, at most
        ``max_chars`` long and names every listed subject; else the record unchanged, with the
        refusal and its reason in ``provenance["rewrite"]``.

        Examples:
            >>> model, tokenizer = tiny_instruction_model()
            >>> rewriter = InstructionRewriter(model, tokenizer)
            >>> record = PromptRecord("p0", "a dog and a cat", ["dog", "cat"])
            >>> rewriter.apply(record, "A fluffy dog naps beside a grey cat.").prompt
            'A fluffy dog naps beside a grey cat.'
            >>> rewriter.apply(record, "A fluffy dog naps.").provenance["rewrite"]["rejected"]
            "missing subjects ['cat']"
        """
        missing = subjects_mentioned(answer, record.subjects)
        info: dict[str, Any] = {"model": self.name, "seed": item_seed(self.seed, record.id), "answer": answer}
        provenance = dict(record.provenance)
        if not answer or missing or len(answer) > self.max_chars:
            why = f"missing subjects {missing}" if missing else ("empty" if not answer else f"longer than {self.max_chars}")
            info["rejected"] = why
            provenance["rewrite"] = info
            return PromptRecord(**{**record.to_dict(), "provenance": provenance})
        provenance["rewrite"] = info
        return PromptRecord(**{**record.to_dict(), "prompt": answer, "rewritten": True, "provenance": provenance,
                               "slots": {**record.slots, "template_prompt": record.prompt}})


def tiny_instruction_model(seed: int = 0) -> tuple[Any, Any]:
    """A tiny random causal LM (a 2-layer GPT-2) and a character-level (WordPiece) tokenizer of
    lower-case letters, digits and a little punctuation, built in code.

    Its output is gibberish: it only exercises the rewriting code. Deterministic given ``seed``;
    the global RNG is untouched.

    Returns:
        ``(model, tokenizer)``.

    Examples:
        >>> model, tokenizer = tiny_instruction_model()
        >>> model.config.n_layer, tokenizer.decode(tokenizer("A dog.").input_ids, skip_special_tokens=True)
        (2, 'a dog.')
    """
    import transformers

    from .subjects import _tiny_bert_tokenizer

    tokenizer = _tiny_bert_tokenizer()
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config).eval()
    return model, tokenizer
