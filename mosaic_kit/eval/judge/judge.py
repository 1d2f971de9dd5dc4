"""An OmniContext-style MLLM judge: prompt following (PF) and subject consistency (SC) on 0-10,
overall √(PF·SC), averaged per task type and then across task types.

OmniContext (OmniGen2's benchmark, ``omnicontext/`` in VectorSpaceLab/OmniGen2) asks GPT-4.1 two
questions per generated image, each shown the input images followed by the output image, and
parses a JSON ``{"score", "reasoning"}``; a case's overall score is √(PF·SC); the benchmark score
is the mean over task types of each type's mean. Differences here:

- the judge is any local model with ``generate(images, text) -> str``, by default a transformers
  vision-language model from a folder or hub id (`mosaic_kit.eval.VisionLanguageModel`); an API
  judge is any object with that method;
- the prompts are ours (files in ``mosaic_kit/eval/judge/prompts/``, placeholders
  ``{instruction}`` and ``{num_references}``), not OmniContext's wording;
- an answer that cannot be parsed into an integer 0-10 is recorded as a failure and left out of
  the means (OmniContext substitutes a random score); failures are counted in the summary.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

__all__ = [
    "JUDGE_ASPECTS",
    "PROMPTS_DIR",
    "JudgeBackend",
    "JudgeScore",
    "MLLMJudge",
    "judge_summary",
    "load_judge_prompt",
    "parse_judge_score",
]

PROMPTS_DIR = Path(__file__).with_name("prompts")
"""The folder of the default judge prompts (``prompt_following.txt``, ``subject_consistency.txt``)."""

JUDGE_ASPECTS = ("prompt_following", "subject_consistency")
"""The two questions asked per image."""


class JudgeBackend(Protocol):
    """What the judge needs of a model: one answer to images + text."""

    def generate(self, images: Sequence[Image.Image], text: str) -> str:
        """The model's answer."""


def load_judge_prompt(path: str | Path) -> str:
    """A judge prompt template from a file; it must hold ``{instruction}`` (and may hold
    ``{num_references}``; literal braces doubled, as in `str.format`).

    Raises:
        ValueError: if the file is missing or lacks ``{instruction}``.

    Example:
        >>> "{instruction}" in load_judge_prompt(PROMPTS_DIR / "prompt_following.txt")
        True
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Expected a judge prompt file at {path}, but it does not exist.")
    text = path.read_text(encoding="utf-8")
    if "{instruction}" not in text:
        raise ValueError(f"Expected the judge prompt {path} to hold '{{instruction}}', but it does not.")
    return text


_SCORE = re.compile(r'"score"\s*:\s*"?(-?\d+(?:\.\d+)?)"?')


def parse_judge_score(answer: str) -> int | None:
    """The 0-10 integer score in a judge's answer, or None when there is none.

    Reads the first ``{...}`` JSON object's ``score``; if the object is not valid JSON, a
    ``"score": N`` pair; a bare integer answer also counts. Non-integers and values outside 0-10
    are refused (None), never rounded or clipped.

    Example:
        >>> parse_judge_score('Sure. {"score": 7, "reasoning": "ok"}'), parse_judge_score("8")
        (7, 8)
        >>> parse_judge_score('{"score": 11}'), parse_judge_score('{"score": 6.5}'), parse_judge_score("no idea")
        (None, None, None)
    """
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    value: Any = None
    if re.fullmatch(r"\d+", text):
        value = int(text)
    else:
        start, end = text.find("{"), text.rfind("}")
        if start != -1 and end > start:
            try:
                value = json.loads(text[start:end + 1]).get("score")
            except (json.JSONDecodeError, AttributeError):
                match = _SCORE.search(text[start:end + 1])
                value = match.group(1) if match else None
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
        return None
    return value


@dataclass(frozen=True)
class JudgeScore:
    """The judge's verdict on one image.

    Attributes:
        prompt_following: PF, 0-10, or None when the answer could not be parsed.
        subject_consistency: SC, 0-10, or None.
        answers: the raw answers, by aspect.
    """

    prompt_following: int | None
    subject_consistency: int | None
    answers: dict[str, str]

    @property
    def overall(self) -> float | None:
        """√(PF·SC), None when either is missing.

        Example:
            >>> JudgeScore(4, 9, {}).overall
            6.0
        """
        if self.prompt_following is None or self.subject_consistency is None:
            return None
        return math.sqrt(self.prompt_following * self.subject_consistency)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with `overall`."""
        return {**asdict(self), "overall": self.overall}


class MLLMJudge:
    """Rates generated images for prompt following and subject consistency (0-10 each).

    Args:
        backend: the model (`mosaic_kit.eval.VisionLanguageModel` or any `JudgeBackend`).
        prompt_following: PF prompt template (text); defaults to the packaged file.
        subject_consistency: SC prompt template; defaults to the packaged file.
        retries: extra attempts when an answer cannot be parsed (useful only with a sampling
            backend; a greedy local model answers the same again); defaults to 0.

    Example:
        >>> from mosaic_kit.eval.vlm import tiny_vision_language_model
        >>> judge = MLLMJudge(tiny_vision_language_model())
        >>> verdict = judge.judge("a red cat", [Image.new("RGB", (16, 16), "red")], Image.new("RGB", (16, 16)))
        >>> sorted(verdict.answers)
        ['prompt_following', 'subject_consistency']
    """

    def __init__(self, backend: JudgeBackend, *, prompt_following: str | None = None,
                 subject_consistency: str | None = None, retries: int = 0) -> None:
        if not callable(getattr(backend, "generate", None)):
            raise ValueError(f"Expected `backend` to have a generate(images, text) method, but got {type(backend).__name__}.")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"Expected `retries` to be an int >= 0, but got {retries!r}.")
        self.backend = backend
        self.templates = {
            "prompt_following": prompt_following or load_judge_prompt(PROMPTS_DIR / "prompt_following.txt"),
            "subject_consistency": subject_consistency or load_judge_prompt(PROMPTS_DIR / "subject_consistency.txt"),
        }
        for aspect, template in self.templates.items():
            if "{instruction}" not in template:
                raise ValueError(f"Expected the {aspect} prompt to hold '{{instruction}}', but it does not.")
        self.retries = retries

    def judge(self, instruction: str, references: Sequence[Image.Image], image: Image.Image) -> JudgeScore:
        """Asks both questions about `image`, shown after the `references`.

        Args:
            instruction: the prompt the image was generated from.
            references: the subject photos, in order.
            image: the generated image.

        Returns:
            A `JudgeScore` (None for an aspect whose answers could not be parsed).
        """
        images = [*references, image]
        scores, answers = {}, {}
        for aspect in JUDGE_ASPECTS:
            text = self.templates[aspect].format(instruction=instruction, num_references=len(references))
            for _ in range(self.retries + 1):
                answers[aspect] = self.backend.generate(images, text)
                scores[aspect] = parse_judge_score(answers[aspect])
                if scores[aspect] is not None:
                    break
        return JudgeScore(scores["prompt_following"], scores["subject_consistency"], answers)


def judge_summary(records: Sequence[dict]) -> dict[str, Any]:
    """OmniContext's aggregation: per task type, the means of PF, SC and overall over its
    judged images; then the mean of each over task types. Images with an unparsed aspect are
    left out of every mean and counted as `failed`.

    Args:
        records: one dict per judged image: ``{"task_type", "prompt_following",
            "subject_consistency"}`` (0-10 or None).

    Returns:
        ``{"task_types": {type: {"images", "failed", "prompt_following", "subject_consistency",
        "overall"}}, "prompt_following", "subject_consistency", "overall", "failed"}`` (means
        None where nothing was judged).

    Example:
        >>> rows = [{"task_type": "single_object", "prompt_following": 4, "subject_consistency": 9},
        ...         {"task_type": "single_object", "prompt_following": 8, "subject_consistency": 8},
        ...         {"task_type": "multiple_character", "prompt_following": 10, "subject_consistency": 10},
        ...         {"task_type": "multiple_character", "prompt_following": None, "subject_consistency": 3}]
        >>> summary = judge_summary(rows)
        >>> summary["task_types"]["single_object"]["overall"], summary["overall"], summary["failed"]
        (7.0, 8.5, 1)
    """
    types: dict[str, list[dict]] = {}
    for record in records:
        types.setdefault(str(record["task_type"]), []).append(record)
    out: dict[str, Any] = {"task_types": {}}
    for task_type in sorted(types):
        rows = types[task_type]
        valid = [r for r in rows if r["prompt_following"] is not None and r["subject_consistency"] is not None]
        entry: dict[str, Any] = {"images": len(rows), "failed": len(rows) - len(valid)}
        for key, values in (
            ("prompt_following", [r["prompt_following"] for r in valid]),
            ("subject_consistency", [r["subject_consistency"] for r in valid]),
            ("overall", [math.sqrt(r["prompt_following"] * r["subject_consistency"]) for r in valid]),
        ):
            entry[key] = round(sum(values) / len(values), 4) if values else None
        out["task_types"][task_type] = entry
    for key in ("prompt_following", "subject_consistency", "overall"):
        values = [e[key] for e in out["task_types"].values() if e[key] is not None]
        out[key] = round(sum(values) / len(values), 4) if values else None
    out["failed"] = sum(e["failed"] for e in out["task_types"].values())
    return out
