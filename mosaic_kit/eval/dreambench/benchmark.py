"""The DreamBench folder: subjects with their photos, prompt templates and multi-subject pairs
(`DreamBench.load`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ...data import DREAMBENCH_ENV, open_image, to_rgb

__all__ = ["DREAMBENCH_ENV", "IMAGE_SUFFIXES", "SETTINGS", "DreamBench", "DreamBenchSubject"]


SETTINGS = ("single", "multi")
"""The two DreamBench settings: single-subject and multi-subject cases."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""File suffixes read as images (photos and, in scoring-only mode, generated images)."""


@dataclass(frozen=True)
class DreamBenchSubject:
    """One DreamBench subject.

    Args:
        name: folder name, e.g. `"dog"`.
        class_name: class noun, e.g. `"dog"` or `"stuffed animal"`.
        kind: `"live"` or `"object"` (selects the prompt list).
        image_paths: its photos, sorted by file name.

    Example:
        >>> DreamBenchSubject("dog", "dog", "live", ()).class_name
        'dog'
    """

    name: str
    class_name: str
    kind: str
    image_paths: tuple[Path, ...]


@dataclass(frozen=True)
class DreamBench:
    """The DreamBench folder: subjects, prompt templates and multi-subject cases.

    Args:
        root: the folder.
        subjects: subjects by name, in `prompts.json` order.
        prompts: prompt templates per kind (`"object"`, `"live"`), with `{0}` for the identifier
            token and `{1}` for the class noun.
        pairs: multi-subject cases, each `{"subjects": [names], "prompt": "a {dog} and a {can}"}`.

    Example:
        >>> bench = DreamBench(Path("."), {}, {"object": ("a {0} {1}",), "live": ()}, ())
        >>> template = bench.prompts.get("object")[0]
        >>> " ".join(template.format("", "can").split())
        'a can'
    """

    root: Path
    subjects: dict[str, DreamBenchSubject]
    prompts: dict[str, tuple[str, ...]]
    pairs: tuple[dict, ...]

    @classmethod
    def load(cls, root: str | Path) -> DreamBench:
        """Reads `prompts.json`, `pairs_multi.json` and the subject folders of `root`.

        Args:
            root: the DreamBench folder, as `mosaic_kit.data.fetch_dreambench` writes it
                (``python recipes/fetch_dreambench.py``; `mosaic_kit.data.dreambench_root` finds it).

        Returns:
            A `DreamBench`.

        Raises:
            ValueError: if a file is missing or malformed, a subject has no photos, or a pair
                names an unknown subject or a prompt without its `{name}` placeholders.

        Example:
            >>> from mosaic_kit.data import dreambench_root
            >>> bench = DreamBench.load(dreambench_root())  # doctest: +SKIP
            >>> len(bench.subjects), len(bench.pairs)  # doctest: +SKIP
            (30, 20)
        """
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"Expected `root` to be the DreamBench folder, but {str(root)!r} is not a folder.")
        meta = _read_json(root / "prompts.json")
        if not isinstance(meta, dict) or not isinstance(meta.get("subjects"), list) or not isinstance(meta.get("prompts"), dict):
            raise ValueError(f"Expected {root / 'prompts.json'} with 'subjects' (list) and 'prompts' (dict).")
        prompts = {}
        for kind in ("object", "live"):
            templates = meta["prompts"].get(kind)
            if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
                raise ValueError(f"Expected 'prompts.{kind}' in {root / 'prompts.json'} to be a non-empty list of strings.")
            prompts[kind] = tuple(templates)
        subjects = {}
        for entry in meta["subjects"]:
            if not isinstance(entry, dict) or not {"name", "class", "kind"} <= set(entry) or entry["kind"] not in prompts:
                raise ValueError(f"Expected a subject {{'name', 'class', 'kind': 'object'|'live'}}, but got {entry!r}.")
            folder = root / entry["name"]
            paths = tuple(sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)) if folder.is_dir() else ()
            if not paths:
                raise ValueError(f"Expected photos of subject {entry['name']!r} in {folder}, but found none.")
            subjects[entry["name"]] = DreamBenchSubject(entry["name"], entry["class"], entry["kind"], paths)
        pairs = _read_json(root / "pairs_multi.json")
        if not isinstance(pairs, list):
            raise ValueError(f"Expected {root / 'pairs_multi.json'} to hold a list of cases.")
        for index, pair in enumerate(pairs):
            names = pair.get("subjects") if isinstance(pair, dict) else None
            if not isinstance(names, list) or not names or not isinstance(pair.get("prompt"), str):
                raise ValueError(f"Expected pairs_multi.json[{index}] = {{'subjects': [...], 'prompt': str}}, but got {pair!r}.")
            unknown = [name for name in names if name not in subjects]
            absent = [name for name in names if "{" + name + "}" not in pair["prompt"]]
            if unknown or absent:
                raise ValueError(
                    f"Expected pairs_multi.json[{index}] to name known subjects, each as {{name}} in its prompt, "
                    f"but got unknown {unknown} and missing placeholders {absent}."
                )
        return cls(root, subjects, prompts, tuple(pairs))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"Expected the file {path}, but it does not exist.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"Expected JSON in {path}, but got: {error}.") from None


def _open_rgb(path: Path) -> Image.Image:
    """The data package's checked opening: size limit, 16-bit grey and alpha handled, errors name the file."""
    return to_rgb(open_image(path), str(path))
