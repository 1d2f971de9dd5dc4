"""The cases of a run: one prompt with its subjects and a number of images (`list_cases`), and
where their generated images live (`find_case_images`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


from .benchmark import IMAGE_SUFFIXES, SETTINGS, DreamBench

__all__ = ["EvalCase", "find_case_images", "list_cases"]


@dataclass(frozen=True)
class EvalCase:
    """One benchmark case: a prompt, its subjects and how many images to score.

    Args:
        setting: `"single"` or `"multi"`.
        case_id: `single/<subject>/<index:02d>` or `multi/<index:02d>`; also its folder.
        subjects: subject names, in the prompt's order.
        prompt: the text given to the generator and to CLIP-T.
        index: prompt index in the kind's list (single) or index in `pairs_multi.json` (multi).
        num_images: images generated / scored for the case.

    Example:
        >>> case = EvalCase("single", "single/dog/03", ("dog",), "a dog on the beach", 3, 2)
        >>> list(map(Path.as_posix, case.image_paths("out/images")))
        ['out/images/single/dog/03/00.png', 'out/images/single/dog/03/01.png']
    """

    setting: str
    case_id: str
    subjects: tuple[str, ...]
    prompt: str
    index: int
    num_images: int

    def image_paths(self, images_root: str | Path) -> list[Path]:
        """Where generation writes this case's images: `<images_root>/<case_id>/<i:02d>.png`."""
        return [Path(images_root) / self.case_id / f"{i:02d}.png" for i in range(self.num_images)]


def _check_optional_count(name: str, value: object, available: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= available:
        raise ValueError(f"Expected `{name}` to be None or an int in [1, {available}], but got {value!r}.")
    return value


def _subset(items: Sequence, count: int | None, rng: random.Random) -> list:
    """`count` items drawn without replacement, kept in their original order (all when None)."""
    if count is None:
        return list(items)
    chosen = set(rng.sample(range(len(items)), count))
    return [item for i, item in enumerate(items) if i in chosen]


def _clean(text: str) -> str:
    return " ".join(text.split())


def list_cases(
    bench: DreamBench,
    *,
    settings: Sequence[str] = SETTINGS,
    max_subjects: int | None = None,
    max_prompts: int | None = None,
    max_multi: int | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    identifier: str = "",
) -> list[EvalCase]:

    """The benchmark's cases, optionally subsampled (deterministically from `seed`).

    Single-subject prompts are the templates of the subject's kind with `{0}` = `identifier`
    and `{1}` = class noun ("a dog in the jungle" with the default empty identifier, "a sks dog
    in the jungle" with `"sks"`). Multi-subject prompts get each `{name}` replaced by
    `identifier` + class noun. Subsamples keep the benchmark's order; `max_subjects` and
    `max_prompts` apply to single-subject cases (the same prompt indices for every subject of a
    kind), `max_multi` to multi-subject cases.

    Args:
        bench: the benchmark.
        settings: which of `"single"`, `"multi"` to list; defaults to both.
        max_subjects: number of subjects drawn for single-subject cases; None for all 30.
        max_prompts: number of prompts drawn per kind; None for all 25.
        max_multi: number of multi-subject cases drawn; None for all.
        images_per_prompt: images per case (DreamBench: 4); defaults to 4.
        seed: seed of the draws; defaults to 0.
        identifier: the `{0}` token (e.g. `"sks"` for DreamBooth-style models); defaults to "".

    Returns:
        The cases, single-subject first (by subject, then prompt), then multi-subject.

    Raises:
        ValueError: on an unknown setting, or a count outside [1, available].

    Example:
        >>> from mosaic_kit.eval.dreambench import DreamBenchSubject
        >>> bench = DreamBench(Path("."), {"dog": DreamBenchSubject("dog", "dog", "live", ())},
        ...                    {"object": ("a {0} {1}",), "live": ("a {0} {1} swimming",)},
        ...                    ({"subjects": ["dog"], "prompt": "a {dog} in a box"},))
        >>> for case in list_cases(bench, images_per_prompt=1):
        ...     print(case.case_id, "|", case.prompt)
        single/dog/00 | a dog swimming
        multi/00 | a dog in a box
    """
    if isinstance(settings, str) or not isinstance(settings, Sequence) or not settings or any(s not in SETTINGS for s in settings):
        raise ValueError(f"Expected `settings` to be a non-empty list drawn from {list(SETTINGS)}, but got {settings!r}.")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"Expected `images_per_prompt` to be an int >= 1, but got {images_per_prompt!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Expected `seed` to be an int, but got {seed!r}.")
    if not isinstance(identifier, str):
        raise ValueError(f"Expected `identifier` to be a string, but got {identifier!r}.")
    max_subjects = _check_optional_count("max_subjects", max_subjects, len(bench.subjects))
    max_prompts = _check_optional_count("max_prompts", max_prompts, min(len(t) for t in bench.prompts.values()))
    max_multi = _check_optional_count("max_multi", max_multi, max(1, len(bench.pairs)))
    cases = []
    if "single" in settings:
        names = _subset(list(bench.subjects), max_subjects, random.Random(f"{seed}:subjects"))
        chosen = {
            kind: _subset(range(len(templates)), max_prompts, random.Random(f"{seed}:prompts:{kind}"))
            for kind, templates in bench.prompts.items()
        }
        for name in names:
            subject = bench.subjects[name]
            for index in chosen[subject.kind]:
                prompt = _clean(bench.prompts[subject.kind][index].format(identifier, subject.class_name))
                cases.append(EvalCase("single", f"single/{name}/{index:02d}", (name,), prompt, index, images_per_prompt))
    if "multi" in settings:
        for index in _subset(range(len(bench.pairs)), max_multi, random.Random(f"{seed}:multi")):
            pair = bench.pairs[index]
            nouns = {name: _clean(f"{identifier} {bench.subjects[name].class_name}") for name in pair["subjects"]}
            prompt = _clean(pair["prompt"].format_map(nouns))
            cases.append(EvalCase("multi", f"multi/{index:02d}", tuple(pair["subjects"]), prompt, index, images_per_prompt))
    return cases


def find_case_images(images_root: str | Path, case: EvalCase) -> list[Path]:
    """A case's images in a folder laid out by case: `<images_root>/<case_id>/*`, files with a
    suffix in `IMAGE_SUFFIXES`, sorted by name, at most `case.num_images` of them.

    Args:
        images_root: the folder holding `single/...` and `multi/...`.
        case: the case.

    Returns:
        The paths (empty when the case folder is missing or holds no image).

    Example:
        >>> case = EvalCase("multi", "multi/00", ("dog", "can"), "a dog and a can", 0, 4)
        >>> find_case_images("/nonexistent", case)
        []
    """
    folder = Path(images_root) / case.case_id
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files[: case.num_images]
