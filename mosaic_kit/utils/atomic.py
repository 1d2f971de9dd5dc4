"""Atomic file writes with one guarantee, used by every writer of the project.

`atomic_write` writes a temporary file in the destination's folder (named
``.tmp-<name>.<random>.tmp``, so a clean-up can find the leftovers of a killed write), flushes
and fsyncs it, gives it the usual permissions (``0o666`` minus the umask), renames it over the
destination and fsyncs the folder. A reader sees the old file or the new one, never a part, and
after the call returns the new file survives a power cut. On an error the temporary file is
removed and the destination is untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "TEMPORARY_PREFIX",
    "atomic_write",
    "fsync_dir",
    "save_image_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]

TEMPORARY_PREFIX = ".tmp-"
"""Prefix of the temporary files of `atomic_write` (a killed write leaves ``.tmp-<name>.*.tmp``)."""


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes the entries of ``folder`` (a rename, a new file) durable.

    Example:
        >>> import tempfile
        >>> fsync_dir(tempfile.mkdtemp())
    """
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder; its renames are durable
        return
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Writes ``path`` atomically and durably: ``write(stream)`` fills a temporary file in the same
    folder, which is fsynced, renamed over ``path``, and the folder fsynced. Creates the folder.

    Args:
        path: destination file.
        write: called once with the temporary file opened for binary writing.

    Returns:
        ``path`` as a `Path`.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "sub" / "a.bin"
        >>> atomic_write(path, lambda stream: stream.write(b"abc")).read_bytes()
        b'abc'
        >>> atomic_write(path, lambda stream: 1 / 0)
        Traceback (most recent call last):
        ...
        ZeroDivisionError: division by zero
        >>> path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
        (b'abc', ['a.bin'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, _file_mode())  # mkstemp makes 0600 files; use the usual mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` with `atomic_write`.

    Example:
        >>> import tempfile
        >>> write_bytes_atomic(Path(tempfile.mkdtemp()) / "a.bin", b"xy").read_bytes()
        b'xy'
    """
    return atomic_write(path, lambda stream: stream.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` with `atomic_write`.

    Example:
        >>> import tempfile
        >>> write_text_atomic(Path(tempfile.mkdtemp()) / "a" / "b.json", "{}").read_text()
        '{}'
    """
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_image_atomic(image: Image.Image, path: str | os.PathLike, format: str | None = None) -> Path:
    """Saves a PIL image to ``path`` with `atomic_write`, in ``format`` (default: from the suffix).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = save_image_atomic(Image.new("RGB", (4, 2)), Path(tempfile.mkdtemp()) / "a.png")
        >>> Image.open(path).size
        (4, 2)
    """
    from PIL import Image

    path = Path(path)
    if format is None:
        format = Image.registered_extensions().get(path.suffix.lower())
        if format is None:
            raise ValueError(f"Expected `path` with an image suffix (.png, .jpg, ...) or a `format`, but got {str(path)!r}.")
    return atomic_write(path, lambda stream: image.save(stream, format=format))
