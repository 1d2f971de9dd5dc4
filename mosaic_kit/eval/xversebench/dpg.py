"""DPG: dependency-aware DSG questions answered by a VQA model (`dsg_score`, `VQAModel`).

XVerse's protocol (``eval/tools/dpg_score.py``): every DSG question of the prompt is asked about
each generated image; a question scores 1 when the answer is "yes"; a question any of whose
parents (ids in ``qid2dependency``, 0 meaning none) was answered "no" scores 0 whatever its own
answer; the image's score is the mean over questions ×100, and DPG is the mean over all images.
The rule looks at the parents' own answers (not their filtered scores), so it is not transitive:
a grandparent's "no" does not reach a grandchild whose parent was answered "yes".

The published VQA model is mPLUG (``xingjianleng/mplug_visual-question-answering_coco_large_en``),
which runs through modelscope, not transformers: `ModelScopeVQA` wraps it where modelscope is
installed; `VLMQuestionAnswerer` asks any transformers vision-language model instead.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..vlm import VisionLanguageModel

__all__ = [
    "DEFAULT_VQA_MODEL",
    "DSGScore",
    "ModelScopeVQA",
    "VLMQuestionAnswerer",
    "VQAModel",
    "dsg_score",
    "is_yes",
]

DEFAULT_VQA_MODEL = "xingjianleng/mplug_visual-question-answering_coco_large_en"
"""The VQA model of XVerse's DPG score (a modelscope mPLUG checkpoint)."""


def is_yes(answer: str) -> bool:
    """Whether a VQA answer counts as "yes": lower-cased, surrounding spaces and final ``.``/``!``
    removed, it equals ``"yes"`` (XVerse compares mPLUG's answer to ``"yes"`` exactly; mPLUG
    answers in lower-case words, so both agree on it; chat models often write ``"Yes."``).

    Example:
        >>> is_yes("Yes."), is_yes(" yes "), is_yes("yes, a dog"), is_yes("no")
        (True, True, False, False)
    """
    if not isinstance(answer, str):
        raise ValueError(f"Expected `answer` to be a string, but got {type(answer).__name__}.")
    return answer.strip().lower().rstrip(".!").strip() == "yes"


@dataclass(frozen=True)
class DSGScore:
    """The DSG score of one image.

    Attributes:
        with_dependency: mean over questions ×100 after the dependency rule (the DPG score).
        without_dependency: the same without the rule.
        scores: per question id, 1.0 or 0.0 after the rule.
    """

    with_dependency: float
    without_dependency: float
    scores: dict[str, float]


def dsg_score(answers: Mapping[str, str], dependencies: Mapping[str, Sequence[int]]) -> DSGScore:
    """Scores one image's answers to its DSG questions with XVerse's dependency rule.

    Args:
        answers: the VQA answer per question id (every question of the prompt).
        dependencies: parent ids per question id (0: no parent); ids missing here have no parent.

    Returns:
        A `DSGScore`.

    Raises:
        ValueError: if `answers` is empty or a dependency names a question without an answer.

    Example:
        >>> answers = {"1": "yes", "2": "no", "3": "yes", "4": "yes"}
        >>> deps = {"1": [0], "2": [0], "3": [1], "4": [1, 2]}   # 4 depends on 2, answered no
        >>> score = dsg_score(answers, deps)
        >>> score.without_dependency, score.with_dependency, score.scores["4"]
        (75.0, 50.0, 0.0)
    """
    if not answers:
        raise ValueError("Expected `answers` to hold at least one question's answer, but got none.")
    raw = {str(qid): float(is_yes(answer)) for qid, answer in answers.items()}
    filtered = dict(raw)
    for qid, parents in dependencies.items():
        qid = str(qid)
        for parent in parents:
            parent = str(int(parent))
            if parent == "0":
                continue
            if parent not in raw:
                raise ValueError(f"Expected an answer to question {parent} (a parent of question {qid}), but got none.")
            if raw[parent] == 0.0 and qid in filtered:
                filtered[qid] = 0.0
                break
    count = len(raw)
    return DSGScore(100.0 * sum(filtered.values()) / count, 100.0 * sum(raw.values()) / count, filtered)


class VQAModel(abc.ABC):
    """The DPG scorer's interface: answers to questions about one image."""

    @abc.abstractmethod
    def answer(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """One free-text answer per question, in order."""


class VLMQuestionAnswerer(VQAModel):
    """Yes/no questions asked to a transformers vision-language model, one question per call.

    Args:
        vlm: the model (`mosaic_kit.eval.VisionLanguageModel`).
        template: the text sent, with ``{question}``; defaults to asking for a one-word yes/no answer.
        max_new_tokens: answer length; defaults to 4.

    Example:
        >>> from mosaic_kit.eval.vlm import tiny_vision_language_model
        >>> vqa = VLMQuestionAnswerer(tiny_vision_language_model())
        >>> len(vqa.answer(Image.new("RGB", (16, 16)), ["Is there a dog?", "Is the dog red?"]))
        2
    """

    def __init__(self, vlm: VisionLanguageModel, *, template: str = "{question} Answer with one word: yes or no.",
                 max_new_tokens: int = 4) -> None:
        if not isinstance(vlm, VisionLanguageModel):
            raise ValueError(f"Expected `vlm` to be a VisionLanguageModel, but got {type(vlm).__name__}.")
        if not isinstance(template, str) or "{question}" not in template:
            raise ValueError(f"Expected `template` to be a string holding '{{question}}', but got {template!r}.")
        self.vlm = vlm
        self.template = template
        self.max_new_tokens = max_new_tokens

    def answer(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """Asks each question about `image`; returns the answers in order."""
        return [self.vlm.generate([image], self.template.format(question=q), max_new_tokens=self.max_new_tokens)
                for q in questions]


class ModelScopeVQA(VQAModel):
    """XVerse's VQA model, mPLUG, through modelscope's visual-question-answering pipeline.

    Not tested here (modelscope is not a dependency of mosaic_kit).

    Args:
        name_or_path: the modelscope model; defaults to `DEFAULT_VQA_MODEL`.
        device: e.g. ``"gpu"`` or ``"cpu"`` (modelscope's names); defaults to ``"gpu"``.

    Raises:
        ImportError: naming the package to install, when modelscope is missing.

    Example:
        >>> vqa = ModelScopeVQA()  # doctest: +SKIP
    """

    def __init__(self, name_or_path: str = DEFAULT_VQA_MODEL, *, device: str = "gpu") -> None:
        try:
            from modelscope.pipelines import pipeline
            from modelscope.utils.constant import Tasks
        except ImportError as error:
            raise ImportError(
                f"The published DPG VQA model ({name_or_path}, mPLUG) runs through modelscope, which is not installed: "
                "`pip install modelscope` (and its multi-modal extras), or score DPG with a transformers vision-language "
                "model (`--vqa PATH`)."
            ) from error
        self._pipeline: Any = pipeline(Tasks.visual_question_answering, model=name_or_path, device=device)

    def answer(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """mPLUG's answer to each question."""
        return [str(self._pipeline({"image": image, "question": q})["text"]) for q in questions]
