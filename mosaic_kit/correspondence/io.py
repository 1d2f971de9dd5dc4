"""Reading and writing correspondences: the project's format and the released dict format.

- The project's format is one file per batch written with `torch.save`: the tensors of a
  `Correspondences` plus its token layout. It is read back with ``weights_only=True``.
- The released format is JSON: per sample, a list over references of
  ``{ref_token: tgt_token}`` dicts (keys become strings in JSON; `Correspondences.from_dicts`
  accepts them).

Both writers are atomic (`mosaic_kit.utils.atomic_write`): a temporary file beside the destination,
fsynced, then renamed over it.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from ..utils.atomic import atomic_write
from .batch import Correspondences, check_correspondences

__all__ = ["FORMAT_VERSION", "load_correspondences", "load_released_dicts", "save_correspondences", "save_released_dicts"]

FORMAT_VERSION = 1
"""Version of the project's correspondence file format."""

_TENSORS = ("ref_index", "tgt_index", "point_mask", "ref_present")


def save_correspondences(corr: Correspondences, path: str | os.PathLike) -> None:
    """Writes ``corr`` in the project's format (atomically).

    Example:
        >>> import tempfile, pathlib
        >>> corr = Correspondences.from_dicts([[{0: 1}, {2: 3}]], ref_tokens=[4, 4], tgt_tokens=8)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "sample.pt"
        >>> save_correspondences(corr, path)
        >>> load_correspondences(path).to_dicts()
        [[{0: 1}, {2: 3}]]
    """
    if not isinstance(corr, Correspondences):
        raise ValueError(f"Expected `corr` to be a Correspondences, but got {type(corr).__name__}.")
    corr = corr.to("cpu")
    payload = {name: getattr(corr, name) for name in _TENSORS}
    if corr.confidence is not None:
        payload["confidence"] = corr.confidence
    payload["ref_tokens"] = torch.tensor(corr.ref_tokens, dtype=torch.long)
    payload["tgt_tokens"] = torch.tensor(corr.tgt_tokens, dtype=torch.long)
    payload["format_version"] = torch.tensor(FORMAT_VERSION)
    atomic_write(path, lambda stream: torch.save(payload, stream))


def load_correspondences(path: str | os.PathLike) -> Correspondences:
    """Reads a file written by `save_correspondences` (``weights_only=True``).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file, if it cannot be read (truncated, not a torch file), is not in
            the project's format, has another version or holds malformed tensors.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "sample.pt"
        >>> save_correspondences(Correspondences.from_dicts([[{1: 2}]], ref_tokens=[4], tgt_tokens=8), path)
        >>> corr = load_correspondences(path)
        >>> corr.ref_tokens, corr.tgt_tokens, corr.to_dicts()
        ((4,), 8, [[{1: 2}]])
    """
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:  # truncated, not torch
        raise ValueError(f"Expected `path` to hold mosaic_kit correspondences, but {path} cannot be read: {error}") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise ValueError(f"Expected `path` to hold mosaic_kit correspondences, but {path} does not.")
    version = int(payload["format_version"])
    if version != FORMAT_VERSION:
        raise ValueError(f"Expected correspondence format version {FORMAT_VERSION}, but {path} has {version}.")
    missing = [name for name in (*_TENSORS, "ref_tokens", "tgt_tokens") if name not in payload]
    if missing:
        raise ValueError(f"Expected `path` to hold mosaic_kit correspondences, but {path} lacks {missing}.")
    try:
        return Correspondences(
            **{name: payload[name] for name in _TENSORS},
            ref_tokens=tuple(payload["ref_tokens"].tolist()),
            tgt_tokens=int(payload["tgt_tokens"]),
            confidence=payload.get("confidence"),
        )
    except (ValueError, AttributeError, TypeError) as error:
        raise ValueError(f"{path}: malformed correspondences: {error}") from None


def save_released_dicts(corr: Correspondences, path: str | os.PathLike) -> None:
    """Writes ``corr.to_dicts()`` as JSON (atomically): a list over samples of lists over
    references of ``{ref_token: tgt_token}``. For one sample, index ``[0]`` of the loaded list is
    the released per-sample format.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "sample.json"
        >>> save_released_dicts(Correspondences.from_dicts([[{0: 3}, {}]], ref_tokens=[2, 2], tgt_tokens=4), path)
        >>> path.read_text()  # JSON keys are strings
        '[[{"0": 3}, {}]]'
    """
    check_correspondences("corr", corr)
    text = json.dumps(corr.to_dicts())
    atomic_write(path, lambda stream: stream.write(text.encode()))


def load_released_dicts(path: str | os.PathLike) -> list[list[dict[int, int]]]:
    """Reads a JSON file of released-format dicts, with integer keys.

    Example:
        >>> import tempfile, pathlib
        >>> corr = Correspondences.from_dicts([[{0: 1, 3: 2}]], ref_tokens=[4], tgt_tokens=8)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "sample.json"
        >>> save_released_dicts(corr, path)
        >>> load_released_dicts(path)
        [[{0: 1, 3: 2}]]
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Expected `path` to hold UTF-8 JSON, but {path} does not: {error}") from None
    if not isinstance(data, list) or not all(isinstance(s, list) for s in data):
        raise ValueError(f"Expected `path` to hold a list over samples of lists over references, but {path} does not.")
    out = []
    for b, sample in enumerate(data):
        refs_out = []
        for k, refs in enumerate(sample):
            if not isinstance(refs, dict):
                raise ValueError(f"{path}: expected sample {b}, reference {k} to be a dict {{ref_token: tgt_token}}, but got {refs!r}.")
            try:
                refs_out.append({int(u): int(v) for u, v in refs.items()})
            except (TypeError, ValueError):
                raise ValueError(f"{path}: expected integer tokens in sample {b}, reference {k}, but got {refs!r}.") from None
        out.append(refs_out)
    return out
