"""The XVerseBench case files, read in the benchmark's own format (`XVerseBench.load`), and the
cases of a run (`list_cases`).

The benchmark ships with XVerse's code (github.com/bytedance/XVerse): ``eval/tools/`` holds
``XVerseBench_single.json`` (90 prompts, 1 subject) and ``XVerseBench_multi.json`` (210 prompts,
2 or 3 subjects), each entry ``{"index", "prompt", "modulation": [{"src_inputs": [{"image_path",
"caption"}, ...], "use_words": [[slot, word, label], ...]}], ...}``, and the DSG questions of each
prompt in ``XVerseBench_<split>_DSG.json`` (``{"prompt", "qid2tuple", "qid2dependency",
"qid2question"}``, same order). Subject photos sit at the ``image_path`` given there, relative to
the repository root (``assets/XVerseBench/<human|object|animal>/<NN>_<label>.jpg``). Nothing of it
is bundled here: the user gives the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ...data import open_image, to_rgb

__all__ = [
    "SPLITS",
    "SUBJECT_KINDS",
    "XVerseBench",
    "XVerseCase",
    "XVerseSubject",
    "check_shard",
    "list_cases",
]

SPLITS = ("single", "multi")
"""The two case files of XVerseBench: single-subject and multi-subject (2 or 3) prompts."""

SUBJECT_KINDS = ("human", "object", "animal")
"""Subject kinds, read from the folder of each subject photo; humans are scored by ID-Sim, the
others by IP-Sim."""


@dataclass(frozen=True)
class XVerseSubject:
    """One subject of a case.

    Args:
        name: ``"<kind>_<file name>"``, e.g. ``"human_05_man.jpg"`` (XVerse's key for per-subject scores).
        kind: one of `SUBJECT_KINDS`.
        label: the grounding label (``use_words[slot][1]``, e.g. ``"vintage van"``), used by IP-Sim.
        caption: the subject's caption (``"a vintage van"``).
        image_path: the photo.

    Example:
        >>> XVerseSubject("human_05_man.jpg", "human", "man", "a man", Path("05_man.jpg")).is_human
        True
    """

    name: str
    kind: str
    label: str
    caption: str
    image_path: Path

    @property
    def is_human(self) -> bool:
        """Whether ID-Sim (faces) rather than IP-Sim (grounded subject + DINO) scores it."""
        return self.kind == "human"


@dataclass(frozen=True)
class XVerseCase:
    """One XVerseBench prompt with its subjects and DSG questions.

    Args:
        split: ``"single"`` or ``"multi"``.
        index: position in the split's file (XVerse names its images ``<index>_<prompt>.png``).
        prompt: the prompt, exactly as in the file (given to the generator as is).
        subjects: the subjects, in slot order.
        questions: DSG questions by id (``"1"``, ``"2"``, ...).
        dependencies: parent question ids by id (0 means "no parent").
        num_images: images generated / scored for the case (XVerse: 4).

    Example:
        >>> case = XVerseCase("multi", 7, "a man and a van", (), {"1": "Is there a man?"}, {"1": (0,)}, 4)
        >>> case.case_id, case.num_subjects
        ('multi/007', 0)
    """

    split: str
    index: int
    prompt: str
    subjects: tuple[XVerseSubject, ...]
    questions: dict[str, str]
    dependencies: dict[str, tuple[int, ...]]
    num_images: int = 4

    @property
    def case_id(self) -> str:
        """``<split>/<index:03d>``; also the case's folder."""
        return f"{self.split}/{self.index:03d}"

    @property
    def num_subjects(self) -> int:
        """Number of subjects (1-3 in the benchmark)."""
        return len(self.subjects)

    def image_paths(self, images_root: str | Path) -> list[Path]:
        """Where generation writes this case's images: ``<images_root>/<case_id>/<i:02d>.png``."""
        return [Path(images_root) / self.case_id / f"{i:02d}.png" for i in range(self.num_images)]


@dataclass(frozen=True)
class XVerseBench:
    """XVerseBench: the cases of each split.

    Args:
        root: the folder the subject photo paths are relative to.
        cases: cases per split, in file order.

    Example:
        >>> XVerseBench(Path("."), {"single": (), "multi": ()}).num_cases
        0
    """

    root: Path
    cases: dict[str, tuple[XVerseCase, ...]]

    @property
    def num_cases(self) -> int:
        """All cases of all splits."""
        return sum(len(cases) for cases in self.cases.values())

    @classmethod
    def load(cls, root: str | Path, *, cases_dir: str | Path | None = None, splits: tuple[str, ...] = SPLITS,
             num_images: int = 4) -> XVerseBench:
        """Reads the case and DSG files of each split and checks every subject photo exists.

        Args:
            root: XVerse's repository folder (or any folder the ``image_path`` entries are
                relative to).
            cases_dir: where ``XVerseBench_<split>.json`` and ``XVerseBench_<split>_DSG.json``
                are; defaults to ``<root>/eval/tools`` when it exists, else ``root``.
            splits: which splits to read; defaults to both.
            num_images: images per case; defaults to 4 (XVerse's protocol).

        Returns:
            An `XVerseBench`.

        Raises:
            ValueError: on a missing or malformed file, a case whose DSG prompt differs from its
                prompt, a subject photo that is missing, or an unknown subject kind.

        Example:
            >>> bench = XVerseBench.load("XVerse")  # doctest: +SKIP
            >>> len(bench.cases["single"]), len(bench.cases["multi"])  # doctest: +SKIP
            (90, 210)
        """
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"Expected `root` to be the XVerseBench folder, but {str(root)!r} is not a folder.")
        if isinstance(splits, str) or not splits or any(split not in SPLITS for split in splits):
            raise ValueError(f"Expected `splits` to be a non-empty tuple drawn from {list(SPLITS)}, but got {splits!r}.")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"Expected `num_images` to be an int >= 1, but got {num_images!r}.")
        if cases_dir is None:
            cases_dir = root / "eval" / "tools" if (root / "eval" / "tools").is_dir() else root
        cases_dir = Path(cases_dir)
        cases = {}
        for split in splits:
            entries = _read_json(cases_dir / f"XVerseBench_{split}.json")
            questions = _read_json(cases_dir / f"XVerseBench_{split}_DSG.json")
            if not isinstance(entries, list) or not isinstance(questions, list) or len(entries) != len(questions):
                raise ValueError(
                    f"Expected {cases_dir}/XVerseBench_{split}.json and its _DSG.json to hold lists of the same length, "
                    f"but got {type(entries).__name__} and {type(questions).__name__}"
                    + (f" of lengths {len(entries)} and {len(questions)}." if isinstance(entries, list) and isinstance(questions, list) else ".")
                )
            cases[split] = tuple(
                _parse_case(root, split, index, entry, dsg, num_images)
                for index, (entry, dsg) in enumerate(zip(entries, questions))
            )
        return cls(root, cases)


def _parse_case(root: Path, split: str, index: int, entry: Any, dsg: Any, num_images: int) -> XVerseCase:
    where = f"XVerseBench_{split}.json[{index}]"
    try:
        prompt = entry["prompt"]
        modulation = entry["modulation"][0]
        inputs, words = modulation["src_inputs"], modulation["use_words"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"Expected {where} with 'prompt' and 'modulation[0]' holding 'src_inputs' and 'use_words'.") from None
    if not isinstance(prompt, str) or not isinstance(inputs, list) or not inputs or len(words) != len(inputs):
        raise ValueError(f"Expected {where} to have a string prompt and as many 'use_words' as 'src_inputs' (at least one).")
    subjects = []
    for slot, (source, word) in enumerate(zip(inputs, words)):
        relative = Path(source["image_path"])
        kind = relative.parent.name
        if kind not in SUBJECT_KINDS:
            raise ValueError(f"Expected the photo of {where} slot {slot} in a folder named one of {list(SUBJECT_KINDS)}, but got {str(relative)!r}.")
        path = root / relative
        if not path.is_file():
            raise ValueError(f"Expected the subject photo {path} of {where}, but it does not exist.")
        subjects.append(XVerseSubject(f"{kind}_{relative.name}", kind, str(word[1]), str(source.get("caption", "")), path))
    if not isinstance(dsg, dict) or dsg.get("prompt") != prompt:
        raise ValueError(f"Expected XVerseBench_{split}_DSG.json[{index}] to be the questions of the prompt {prompt!r}.")
    try:
        questions = {str(k): str(v) for k, v in dsg["qid2question"].items()}
        dependencies = {str(k): tuple(int(p) for p in v) for k, v in dsg["qid2dependency"].items()}
    except (KeyError, AttributeError, TypeError, ValueError):
        raise ValueError(f"Expected XVerseBench_{split}_DSG.json[{index}] with 'qid2question' and 'qid2dependency' dicts.") from None
    if not questions:
        raise ValueError(f"Expected XVerseBench_{split}_DSG.json[{index}] to hold at least one question.")
    return XVerseCase(split, index, prompt, tuple(subjects), questions, dependencies, num_images)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"Expected the file {path}, but it does not exist.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"Expected JSON in {path}, but got: {error}.") from None


def open_subject_photo(path: Path) -> Image.Image:
    """A subject photo as XVerse reads it: transparent pixels composited on white, RGB (through the
    data package's checked opening, `mosaic_kit.data.to_rgb`)."""
    return to_rgb(open_image(path), str(path))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """Checks a ``(i, n)`` shard: ints with ``0 <= i < n``.

    Example:
        >>> check_shard((1, 4))
        (1, 4)
    """
    if (not isinstance(shard, tuple) or len(shard) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise ValueError(f"Expected `shard` to be (i, n) with ints 0 <= i < n, but got {shard!r}.")
    return shard


def list_cases(
    bench: XVerseBench,
    *,
    splits: tuple[str, ...] | None = None,
    max_cases: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[XVerseCase]:
    """The cases of a run: the chosen splits in file order, the first `max_cases` of each split,
    then every n-th case from i for ``shard=(i, n)`` (n shards cover each case once).

    Args:
        bench: the benchmark.
        splits: which splits; defaults to every split loaded.
        max_cases: at most this many cases per split (the first ones); None for all.
        shard: ``(i, n)``: this run's share; defaults to ``(0, 1)`` (all).

    Returns:
        The cases, single first.

    Raises:
        ValueError: on an unknown or unloaded split, a bad count or shard.

    Example:
        >>> case = lambda i: XVerseCase("single", i, "a cat", (), {"1": "Is there a cat?"}, {"1": (0,)})
        >>> bench = XVerseBench(Path("."), {"single": tuple(case(i) for i in range(5))})
        >>> [c.index for c in list_cases(bench, splits=("single",), max_cases=4, shard=(1, 2))]
        [1, 3]
    """
    splits = tuple(bench.cases) if splits is None else splits
    if isinstance(splits, str) or not splits or any(split not in bench.cases for split in splits):
        raise ValueError(f"Expected `splits` to be a non-empty tuple drawn from the loaded {list(bench.cases)}, but got {splits!r}.")
    if max_cases is not None and (isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1):
        raise ValueError(f"Expected `max_cases` to be None or an int >= 1, but got {max_cases!r}.")
    index, count = check_shard(shard)
    chosen = [case for split in SPLITS if split in splits for case in bench.cases[split][:max_cases]]
    return chosen[index::count]
