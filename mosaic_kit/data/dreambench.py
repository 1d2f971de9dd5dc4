"""The DreamBench photos on this machine: where every default looks for them (`dreambench_root`)
and the command that puts them there (`fetch_dreambench`, ``python recipes/fetch_dreambench.py``).

DreamBench is the evaluation set of DreamBooth (Ruiz et al., CVPR 2023): 30 subjects, 158 photos,
with class nouns and 25 prompt templates per kind, published in the public repository
``google/dreambooth`` under CC BY 4.0 (the Unsplash photos under the Unsplash licence). The
toolkit's copy of it is laid out as `mosaic_kit.eval.DreamBench.load` reads it:

- ``<subject>/NN.jpg``: the photos, the longer side downscaled to 512 px (Lanczos) and saved as
  JPEG quality 90, after the EXIF orientation; the primary image of multi-picture files; no EXIF;
- ``prompts.json``: the subjects (folder, class noun, kind ``live`` for cats and dogs, else
  ``object``) and the prompt templates of the source's ``prompts_and_classes.txt``;
- ``pairs_multi.json``: the toolkit's 20 multi-subject cases (`DREAMBENCH_MULTI_CASES`; not
  part of DreamBench), those whose subjects are all in the copy;
- ``LICENSE.md``, ``references_and_licenses.txt`` (attribution of every photo) and
  ``prompts_and_classes.original.txt``: the source's files, unchanged; ``README.md`` and
  ``provenance.json``: where the copy came from and what was changed.

Where: ``$MOSAIC_DREAMBENCH`` when set, else `default_dreambench_dir`
(``$XDG_CACHE_HOME/mosaic_kit/dreambench``, by default ``~/.cache/mosaic_kit/dreambench``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from PIL import Image, ImageOps

from ..utils.checks import check_int
from ._images import check_pixels, to_rgb

__all__ = [
    "DREAMBENCH_ENV",
    "DREAMBENCH_FETCH_COMMAND",
    "DREAMBENCH_MULTI_CASES",
    "DREAMBOOTH_ARCHIVE_URL",
    "DREAMBOOTH_COMMIT",
    "DreamBenchNotFoundError",
    "LIVE_CLASSES",
    "default_dreambench_dir",
    "downscale_photo",
    "dreambench_root",
    "fetch_dreambench",
    "find_dreambench",
    "is_dreambench_copy",
    "parse_prompts_and_classes",
]

DREAMBENCH_ENV = "MOSAIC_DREAMBENCH"
"""The environment variable naming the DreamBench folder; when set, it overrides the default place."""

DREAMBOOTH_COMMIT = "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0"
"""The pinned commit of ``google/dreambooth`` ("Update README.md", 2023-03-06) the photos come from."""

DREAMBOOTH_ARCHIVE_URL = f"https://github.com/google/dreambooth/archive/{DREAMBOOTH_COMMIT}.tar.gz"
"""The archive of that commit that `fetch_dreambench` downloads (about 112 MB)."""

DREAMBENCH_FETCH_COMMAND = "python recipes/fetch_dreambench.py"
"""The command that fetches the photos into the default place (named in every "not found" error)."""

LIVE_CLASSES = ("cat", "dog")
"""Classes whose subjects take the live-subject prompts (the DreamBooth paper's live subjects)."""

log = logging.getLogger(__name__)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_PROMPT_FILES = ("prompts_and_classes.txt", "prompts_and_classes.original.txt")
_LICENSE_FILES = ("LICENSE.md", "LICENSE")
_REFERENCES_FILE = "references_and_licenses.txt"


def _case(prompt: str) -> dict:
    return {"subjects": re.findall(r"\{(\w+)\}", prompt), "prompt": prompt}


DREAMBENCH_MULTI_CASES: tuple[dict, ...] = tuple(_case(prompt) for prompt in (
    "a {dog} and a {backpack} on a beach",
    "a {cat} sitting next to a {clock} on top of a wooden floor",
    "a {teapot} and a {berry_bowl} on top of a white rug",
    "a {dog2} and a {dog6} playing together in the snow",
    "a {colorful_sneaker} and a {fancy_boot} on a cobblestone street",
    "a {cat2} wearing {pink_sunglasses} with a city in the background",
    "a {robot_toy} riding on a {rc_car} on top of a dirt road",
    "a {dog3} and a {cat} sitting beside a {vase} with a blue house in the background",
    "a {bear_plushie}, a {wolf_plushie} and a {grey_sloth_plushie} on top of pink fabric",
    "a {dog5} next to a {backpack_dog} and a {can} on top of green grass with sunflowers around it",
    "a {duck_toy}, a {monster_toy} and a {poop_emoji} floating on top of water",
    "a {candle}, a {teapot} and a {clock} on a wooden table with a mountain in the background",
    "a {dog7} sniffing a {shiny_sneaker} while a {red_cartoon} watches, in the jungle",
    "a {dog} and a {cat2} next to a {backpack} and {pink_sunglasses} on the beach",
    "a {dog8} and a {dog2} playing with a {bear_plushie} beside a {fancy_boot} on top of a wooden floor",
    "a {teapot}, a {vase}, a {candle} and a {berry_bowl} on a table with the Eiffel Tower in the background",
    "a {robot_toy}, a {duck_toy}, a {monster_toy} and a {rc_car} on top of a purple rug in a forest",
    "a {cat} and a {dog6} sitting beside a {clock} and a {can} with a wheat field in the background",
    "a {red_cartoon} and a {wolf_plushie} next to a {colorful_sneaker} and a {backpack_dog} on a cobblestone street",
    "a {dog7}, a {cat}, a {grey_sloth_plushie} and a {poop_emoji} with a tree and autumn leaves in the background",
))
"""The toolkit's 20 multi-subject cases (``pairs_multi.json``; not part of DreamBench): 7 with two
subjects, 6 with three, 7 with four, every one of the 30 subjects at least once; each
``{"subjects": [folder names], "prompt": "a {dog} and a {backpack} on a beach"}``, every subject
named as ``{folder}`` in the prompt, in order. Several put two subjects of one class together
(``dog2`` + ``dog6``, three plushies, four toys) to test identity leakage."""


class DreamBenchNotFoundError(ValueError):
    """No DreamBench copy where the defaults look; the message names the places and the command
    that fetches it."""


def default_dreambench_dir() -> Path:
    """The DreamBench folder when ``$MOSAIC_DREAMBENCH`` is not set:
    ``$XDG_CACHE_HOME/mosaic_kit/dreambench``, by default ``~/.cache/mosaic_kit/dreambench``.

    Returns:
        The folder (it may not exist yet).

    Example:
        >>> default_dreambench_dir().parts[-2:]
        ('mosaic_kit', 'dreambench')
    """
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mosaic_kit" / "dreambench"


def is_dreambench_copy(folder: str | Path) -> bool:
    """Whether ``folder`` holds a DreamBench copy (its ``prompts.json`` and ``pairs_multi.json``).

    Example:
        >>> is_dreambench_copy("no/such/folder")
        False
    """
    folder = Path(folder)
    return (folder / "prompts.json").is_file() and (folder / "pairs_multi.json").is_file()


def find_dreambench() -> Path | None:
    """The DreamBench folder every default uses, or None when there is none: ``$MOSAIC_DREAMBENCH``
    when set, else `default_dreambench_dir`.

    Returns:
        The folder when it holds a copy (`is_dreambench_copy`), else None.

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"MOSAIC_DREAMBENCH": "no/such/folder"}):
        ...     find_dreambench() is None
        True
    """
    folder = Path(os.environ[DREAMBENCH_ENV]) if os.environ.get(DREAMBENCH_ENV) else default_dreambench_dir()
    return folder if is_dreambench_copy(folder) else None


def dreambench_root() -> Path:
    """The DreamBench folder every default uses (`find_dreambench`), or an error that says how to
    get it.

    Returns:
        The folder.

    Raises:
        DreamBenchNotFoundError: a `ValueError` naming the folder looked at and the fetch command.

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"MOSAIC_DREAMBENCH": "no/such/folder"}):
        ...     dreambench_root()
        Traceback (most recent call last):
        ...
        mosaic_kit.data.dreambench.DreamBenchNotFoundError: Expected the DreamBench photos (prompts.json, pairs_multi.json) in no/such/folder ($MOSAIC_DREAMBENCH), but found none; `python recipes/fetch_dreambench.py` fetches them there ...
    """
    found = find_dreambench()
    if found is not None:
        return found
    if os.environ.get(DREAMBENCH_ENV):
        where = f"{os.environ[DREAMBENCH_ENV]} (${DREAMBENCH_ENV})"
    else:
        where = f"{default_dreambench_dir()} (the default; ${DREAMBENCH_ENV} overrides it)"
    raise DreamBenchNotFoundError(
        f"Expected the DreamBench photos (prompts.json, pairs_multi.json) in {where}, but found none; "
        f"`{DREAMBENCH_FETCH_COMMAND}` fetches them there "
        f"(google/dreambooth at {DREAMBOOTH_COMMIT[:7]}, about 112 MB; `--source DIR_OR_ARCHIVE` for a copy you "
        "already have)."
    )


def parse_prompts_and_classes(text: str, where: str = "prompts_and_classes.txt") -> dict:
    """The content of ``prompts.json`` from the source's ``prompts_and_classes.txt``.

    Args:
        text: the file's text: a ``Classes`` section of ``subject_name,class`` lines, then the
            ``Object Prompts`` and ``Live Subject Prompts`` lists of
            ``'a {0} {1} ...'.format(unique_token, class_token)`` lines.
        where: the file named in errors.

    Returns:
        ``{"source", "placeholders", "subjects": [{"name", "class", "kind"}], "prompts":
        {"object": [...], "live": [...]}}``; ``kind`` is ``live`` for `LIVE_CLASSES`.

    Raises:
        ValueError: naming ``where`` when a section is missing or empty.

    Example:
        >>> text = '''Classes
        ... subject_name,class
        ... dog,dog
        ... can,can
        ... Object Prompts
        ... 'a {0} {1} in the snow'.format(unique_token, class_token),
        ... Live Subject Prompts
        ... 'a {0} {1} wearing a hat'.format(unique_token, class_token)'''
        >>> meta = parse_prompts_and_classes(text)
        >>> [(s["name"], s["kind"]) for s in meta["subjects"]], meta["prompts"]["live"]
        ([('dog', 'live'), ('can', 'object')], ['a {0} {1} wearing a hat'])
    """
    subjects: list[dict] = []
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in (raw.strip() for raw in text.splitlines()):
        if line == "subject_name,class":
            section = "classes"
        elif line == "Object Prompts":
            section = "object"
        elif line == "Live Subject Prompts":
            section = "live"
        elif section == "classes" and re.fullmatch(r"\w+,[\w ]+", line):
            name, class_name = line.split(",")
            subjects.append({"name": name, "class": class_name, "kind": "live" if class_name in LIVE_CLASSES else "object"})
        elif section in prompts:
            match = re.fullmatch(r"'(.+)'\.format\(unique_token, class_token\),?", line)
            if match:
                prompts[section].append(match.group(1))
    empty = [name for name, found in (("classes", subjects), *prompts.items()) if not found]
    if empty:
        raise ValueError(f"{where}: expected the sections Classes, Object Prompts and Live Subject Prompts of "
                         f"google/dreambooth's dataset/prompts_and_classes.txt, but found nothing for {empty}.")
    return {
        "source": "google/dreambooth: dataset/prompts_and_classes.txt",
        "placeholders": {
            "{0}": "unique identifier token of the subject ('[V]' in the paper; often 'sks' in public DreamBooth "
                   "implementations)",
            "{1}": "class noun of the subject (the 'class' field)",
        },
        "subjects": subjects,
        "prompts": prompts,
    }


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        check_pixels(image, where)
        image.load()  # a multi-picture (MPO) file: its first, primary image
        return image
    except Image.DecompressionBombError as error:
        raise ValueError(f"{where}: expected a photo of a sensible size, but {error}") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{where}: expected a readable image file, but {type(error).__name__}: {error}") from None


def downscale_photo(data: bytes, max_side: int = 512, quality: int = 90, where: str = "photo") -> bytes:
    """One photo as the toolkit's copy stores it: upright (EXIF orientation applied), RGB, the
    longer side at most ``max_side`` (Lanczos), JPEG at ``quality`` without EXIF. A JPEG that
    already fits, with no EXIF, is kept byte for byte (so a copy fetched from a copy is the same).

    Args:
        data: the file's bytes.
        max_side: the longest side in pixels.
        quality: JPEG quality.
        where: the file named in errors.

    Returns:
        The JPEG bytes.

    Raises:
        ValueError: naming ``where`` when the file is not a readable image.

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (1024, 768), "red").save(buffer, "PNG")
        >>> Image.open(io.BytesIO(downscale_photo(buffer.getvalue()))).size
        (512, 384)
    """
    image = _decode(data, where)
    if image.format == "JPEG" and max(image.size) <= max_side and not image.getexif() and image.mode == "RGB":
        return data
    image = to_rgb(ImageOps.exif_transpose(image), where)
    width, height = image.size
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@contextlib.contextmanager
def _source_files(source: Path) -> Iterator[dict[str, Callable[[], bytes]]]:
    """The files of a folder, a tar archive or a zip archive: relative POSIX path → reader. Archive
    members are read in memory, never extracted, so no member path can land outside the output."""
    if source.is_dir():
        yield {p.relative_to(source).as_posix(): p.read_bytes for p in sorted(source.rglob("*")) if p.is_file()}
    elif source.is_file() and tarfile.is_tarfile(source):
        with tarfile.open(source) as archive:
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
            yield {name: (lambda m=member: archive.extractfile(m).read()) for name, member in members.items()}
    elif source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            yield {name: (lambda n=name: archive.read(n)) for name in archive.namelist() if not name.endswith("/")}
    else:
        raise ValueError(f"Expected `source` to be a folder, a .tar(.gz) or a .zip archive of google/dreambooth (or "
                         f"of a DreamBench copy), but {str(source)!r} is none of these.")


def _find_dataset(files: dict[str, Callable[[], bytes]], source: str) -> tuple[str, str, str, str]:
    """(dataset prefix, prompts file, licence file, references file) inside the source's files."""
    candidates = sorted((name for name in files if name.rsplit("/", 1)[-1] in _PROMPT_FILES), key=lambda n: n.count("/"))
    if not candidates:
        raise ValueError(f"Expected google/dreambooth's dataset/prompts_and_classes.txt (or a DreamBench copy's "
                         f"prompts_and_classes.original.txt) in {source}, but found neither.")
    prompts = candidates[0]
    prefix = prompts.rsplit("/", 1)[0] + "/" if "/" in prompts else ""
    parent = prefix.rstrip("/").rsplit("/", 1)[0] + "/" if prefix.count("/") > 1 else ""
    licence = next((folder + name for folder in (prefix, parent) for name in _LICENSE_FILES if folder + name in files), None)
    references = prefix + _REFERENCES_FILE
    missing = [name for name, found in (("LICENSE.md", licence), (_REFERENCES_FILE, references in files)) if not found]
    if missing:
        raise ValueError(f"Expected the licence and attribution files {missing} beside the photos in {source} "
                         "(they go with every copy), but they are missing.")
    return prefix, prompts, licence, references


def _readme(provenance: dict, meta: dict, counts: dict[str, int]) -> str:
    rows = "\n".join(f"| `{s['name']}` | {s['class']} | {s['kind']} | {counts[s['name']]} |" for s in meta["subjects"])
    cases = provenance["multi_subject_cases"]
    return f"""# DreamBench (DreamBooth dataset), downscaled copy

Written by `mosaic_kit.data.fetch_dreambench` ({DREAMBENCH_FETCH_COMMAND}). The evaluation set of
DreamBooth (Ruiz et al., CVPR 2023, arXiv:2208.12242), "DreamBench".

## Source

- {provenance["source"]}
- Repository: GitHub `google/dreambooth` (the download is pinned at commit
  `{DREAMBOOTH_COMMIT}`): photos `dataset/<subject>/NN.jpg`, classes and prompts
  `dataset/prompts_and_classes.txt`, attribution `dataset/references_and_licenses.txt`, licence
  `LICENSE.md`.

## Licence and attribution

The repository is under the **Creative Commons Attribution 4.0 International** licence
(`LICENSE.md`, unchanged); the Unsplash photos are under the Unsplash licence; the photographer
of every photo and the licences are in `references_and_licenses.txt` (unchanged). Keep both files
next to the photos when you pass them on; CC BY 4.0 asks for attribution and a note of changes
(below).

## What was changed

- The longer side of every photo is at most {provenance["max_side"]} px (Lanczos; smaller ones are
  not enlarged), saved as JPEG quality {provenance["quality"]}, after the EXIF orientation; EXIF is
  not kept; of a multi-picture (MPO) file only the primary image is kept. File names are kept
  (a PNG or WebP photo would become `.jpg`).{" At most " + str(provenance["photos_per_subject"]) +
  " photos per subject (the first in file-name order)." if provenance["photos_per_subject"] else ""}
- `prompts_and_classes.txt` is kept unchanged as `prompts_and_classes.original.txt`.
- New for this toolkit: `prompts.json` (the subjects with class noun and kind, `live` for cats
  and dogs, and the prompt templates; `{{0}}` is the identifier token, `{{1}}` the class noun) and
  `pairs_multi.json` ({cases} multi-subject cases composed for this toolkit, not part of DreamBench;
  each `{{name}}` in a prompt is a subject folder), `provenance.json` and this file.

## Contents

{len(meta["subjects"])} subjects, {sum(counts.values())} photos.

| subject | class | kind | photos |
| --- | --- | --- | --- |
{rows}
"""


def fetch_dreambench(
    source: str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    subjects: Sequence[str] | None = None,
    max_side: int = 512,
    quality: int = 90,
    photos_per_subject: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    url: str = DREAMBOOTH_ARCHIVE_URL,
) -> Path:
    """Writes a DreamBench copy (see the module docstring for its layout) where the defaults look.

    Args:
        source: a folder or a ``.tar(.gz)``/``.zip`` archive holding google/dreambooth (its
            ``dataset/`` folder, at any depth, as in GitHub's archive) or a DreamBench copy; None
            downloads `DREAMBOOTH_ARCHIVE_URL` (the pinned commit, about 112 MB).
        output_dir: where to write; None: ``$MOSAIC_DREAMBENCH`` when set, else
            `default_dreambench_dir`.
        subjects: subject folders to keep (None: every subject of the source's class list, or of
            its ``prompts.json`` when the source is a DreamBench copy).
        max_side: the longer side of the stored photos, in pixels.
        quality: their JPEG quality.
        photos_per_subject: keep at most this many photos of each subject (None: all).
        overwrite: replace an existing copy at ``output_dir``.
        progress: a progress bar over the photos (and the download).
        url: the archive downloaded when ``source`` is None.

    Returns:
        ``output_dir``. A complete copy already there is kept as it is unless ``overwrite``.

    Raises:
        ValueError: naming the argument when the source lacks the photos, the class list, the
            licence or the attribution, when a subject is unknown or has no photos, or when
            ``output_dir`` is a non-empty folder that is not a DreamBench copy.

    Example:
        >>> fetch_dreambench(source="no/such/folder", output_dir="unused")
        Traceback (most recent call last):
        ...
        ValueError: Expected `source` to be a folder, a .tar(.gz) or a .zip archive of google/dreambooth ...
    """
    max_side = check_int("max_side", max_side, minimum=16)
    quality = check_int("quality", quality, minimum=1, maximum=100)
    if photos_per_subject is not None:
        photos_per_subject = check_int("photos_per_subject", photos_per_subject, minimum=1)
    if output_dir is None:
        output_dir = os.environ.get(DREAMBENCH_ENV) or default_dreambench_dir()
    output_dir = Path(output_dir)
    if not overwrite and is_dreambench_copy(output_dir):
        log.info("a DreamBench copy is already at %s: kept (overwrite replaces it)", output_dir)
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()) and not is_dreambench_copy(output_dir):
        raise ValueError(f"Expected `output_dir` to be a DreamBench copy, an empty folder or a new one, but "
                         f"{output_dir} holds other files; it is left as it is.")
    with contextlib.ExitStack() as stack:
        if source is None:
            archive = stack.enter_context(tempfile.TemporaryDirectory(prefix="dreambooth-")) + "/dreambooth.tar.gz"
            _download(url, Path(archive), progress)
            source_path, described = Path(archive), f"Downloaded from {url}."
        else:
            source_path = Path(source)
            described = f"Prepared from a local {'folder' if source_path.is_dir() else 'archive'} ({source_path.name})."
        files = stack.enter_context(_source_files(source_path))
        prefix, prompts_file, licence, references = _find_dataset(files, str(source_path))
        meta = parse_prompts_and_classes(files[prompts_file]().decode("utf-8"), prompts_file)
        known = [s["name"] for s in meta["subjects"]]
        if subjects is None and f"{prefix}prompts.json" in files:  # a DreamBench copy: the subjects it holds
            subjects = [s["name"] for s in json.loads(files[f"{prefix}prompts.json"]())["subjects"]]
        wanted = list(known if subjects is None else subjects)
        unknown = [name for name in wanted if name not in known]
        if unknown or not wanted:
            raise ValueError(f"Expected `subjects` among {known}, but got {unknown or wanted}.")
        photos = {name: sorted(f for f in files if f.startswith(f"{prefix}{name}/") and f.count("/") == prefix.count("/") + 1
                               and Path(f).suffix.lower() in _IMAGE_SUFFIXES and not Path(f).name.startswith("."))
                  for name in wanted}
        absent = [name for name, found in photos.items() if not found]
        if absent:
            raise ValueError(f"Expected photos of every subject in `source` ({source_path}), but found none for {absent}.")
        if photos_per_subject is not None:
            photos = {name: found[:photos_per_subject] for name, found in photos.items()}
        meta["subjects"] = [s for s in meta["subjects"] if s["name"] in wanted]
        cases = [case for case in DREAMBENCH_MULTI_CASES if set(case["subjects"]) <= set(wanted)]
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = output_dir.with_name(f".{output_dir.name}-partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run of a process with this id
        partial.mkdir()
        try:
            _write_copy(partial, files, photos, meta, cases, licence, references, prompts_file, described,
                        DREAMBOOTH_COMMIT if source is None else None, max_side, quality, photos_per_subject, progress)
            _replace(partial, output_dir)
            log.info("wrote %d photos of %d subjects and %d multi-subject cases to %s",
                     sum(map(len, photos.values())), len(photos), len(cases), output_dir)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return output_dir


def _write_copy(folder: Path, files: dict, photos: dict, meta: dict, cases: list, licence: str, references: str,
                prompts_file: str, described: str, commit: str | None, max_side: int, quality: int,
                photos_per_subject: int | None, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(len(found) for found in photos.values())
    with tqdm(total=total, desc="DreamBench photos", unit="photo", disable=not progress) as bar:
        for name, found in photos.items():
            (folder / name).mkdir()
            for path in found:
                data = downscale_photo(files[path](), max_side, quality, where=path)
                (folder / name / (Path(path).stem + ".jpg")).write_bytes(data)
                bar.update(1)
    (folder / "LICENSE.md").write_bytes(files[licence]())
    (folder / _REFERENCES_FILE).write_bytes(files[references]())
    (folder / "prompts_and_classes.original.txt").write_bytes(files[prompts_file]())
    (folder / "prompts.json").write_text(json.dumps(meta, indent=2))
    (folder / "pairs_multi.json").write_text(json.dumps(cases, indent=2))
    counts = {name: len(found) for name, found in photos.items()}
    provenance = {"source": described, "commit": commit, "max_side": max_side, "quality": quality,
                  "photos_per_subject": photos_per_subject, "subjects": len(counts), "photos": total,
                  "multi_subject_cases": len(cases)}
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=2))
    (folder / "README.md").write_text(_readme(provenance, meta, counts))


def _replace(partial: Path, output_dir: Path) -> None:
    """Moves the finished copy into place; an old copy is moved aside first and removed after."""
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}-old-{os.getpid()}")
        output_dir.rename(old)
    partial.rename(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _download(url: str, path: Path, progress: bool) -> None:
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as response, path.open("wb") as file:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, desc="download", unit="B", unit_scale=True, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        raise ValueError(f"Expected to download {url}, but {type(error).__name__}: {error}; without network, pass "
                         "`--source` (a folder or archive of google/dreambooth you already have).") from None
