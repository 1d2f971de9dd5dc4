"""Checkpoint folders that cannot lie: a digest of every file, written last, verified on resume
(the folders' integrity; what a trainer checkpoint holds is `mosaic_kit.training.checkpointing`).

A checkpoint is a folder ``checkpoints/step-NNNNNNN``. The trainer writes it under a temporary
name (``.tmp-step-NNNNNNN``), writes `DIGEST_FILE` last (the SHA-256 and size of every other file
in the folder), makes everything durable and only then renames the folder into place. So:

- a folder named ``step-*`` *with* a digest file is *complete* (`list_checkpoints` lists these);
- it is *intact* if every file the digest names is present with the recorded size and hash
  (`verify_checkpoint`);
- old checkpoints are removed by renaming them to ``.trash-step-*`` first (atomic), then deleting,
  so a kill while deleting never leaves a half-deleted folder that looks complete;
- ``.tmp-*`` and ``.trash-*`` folders left by a killed run are removed by `clean_stale_checkpoints`
  when the next run starts.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "step-0000002"
    >>> folder.mkdir()
    >>> _ = (folder / "state.json").write_text("{}")
    >>> _ = write_checkpoint_digest(folder)
    >>> sorted(verify_checkpoint(folder))
    ['state.json']
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

from ..utils.atomic import TEMPORARY_PREFIX, fsync_dir, write_text_atomic

__all__ = [
    "CHECKPOINT_PREFIX",
    "DIGEST_FILE",
    "CheckpointError",
    "clean_stale_checkpoints",
    "latest_intact_checkpoint",
    "list_checkpoints",
    "publish_checkpoint",
    "remove_checkpoint",
    "verify_checkpoint",
    "write_checkpoint_digest",
]

log = logging.getLogger("mosaic_kit.training")

CHECKPOINT_PREFIX = "step-"
"""Name prefix of checkpoint folders (``step-`` + the step, 7 digits)."""

DIGEST_FILE = "checkpoint_digest.json"
"""The file written last into every checkpoint: ``{"format": 1, "files": {name: {"sha256", "bytes"}}}``."""

_TMP_PREFIX = TEMPORARY_PREFIX
_TRASH_PREFIX = ".trash-"
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: names the folder and the file.

    Args:
        folder: the checkpoint folder.
        file: the file inside it that is missing or damaged (None: the folder itself).
        reason: what is wrong.

    Example:
        >>> error = CheckpointError("run/checkpoints/step-0000004", "optimizer.bin", "SHA-256 differs from the digest")
        >>> error.file, str(error)
        ('optimizer.bin', "checkpoint run/checkpoints/step-0000004, file 'optimizer.bin': SHA-256 differs from the digest")
    """

    def __init__(self, folder: str | os.PathLike, file: str | None, reason: str) -> None:
        self.folder = Path(folder)
        self.file = file
        self.reason = reason
        where = f"checkpoint {self.folder}" + (f", file {file!r}" if file is not None else "")
        super().__init__(f"{where}: {reason}")


def _step_of(path: Path) -> int | None:
    digits = path.name[len(CHECKPOINT_PREFIX):]
    return int(digits) if path.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != DIGEST_FILE
                  and not p.name.startswith(_TMP_PREFIX))


def write_checkpoint_digest(folder: str | os.PathLike) -> dict:
    """Makes every file in ``folder`` durable, then writes `DIGEST_FILE` (atomically, last).

    Args:
        folder: a checkpoint folder whose other files are all written.

    Returns:
        The digest: ``{"format": 1, "files": {relative_name: {"sha256": hex, "bytes": int}}}``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.bin").write_bytes(b"abc")
        >>> write_checkpoint_digest(folder)["files"]["a.bin"]["bytes"]
        3
    """
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(folder).as_posix()] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    digest = {"format": 1, "files": files}
    write_text_atomic(folder / DIGEST_FILE, json.dumps(digest, indent=1, sort_keys=True))  # fsyncs the folder too
    return digest


def verify_checkpoint(folder: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """Checks every file of a checkpoint against its digest.

    Args:
        folder: the checkpoint folder.
        required: file names that must be among those the digest lists (e.g. the trainer state).

    Returns:
        The digest's ``files`` mapping (relative name → ``{"sha256", "bytes"}``).

    Raises:
        CheckpointError: naming the folder and the first file that is missing, has another size
            or another SHA-256 than recorded, or the digest file itself when it is missing or
            unreadable.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.bin").write_bytes(b"abc")
        >>> _ = write_checkpoint_digest(folder)
        >>> _ = (folder / "a.bin").write_bytes(b"abd")
        >>> verify_checkpoint(folder)
        Traceback (most recent call last):
        ...
        mosaic_kit.training.checkpoint_folders.CheckpointError: checkpoint ..., file 'a.bin': SHA-256 differs from the digest (damaged bytes)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, None, "no such folder")
    digest_path = folder / DIGEST_FILE
    if not digest_path.is_file():
        raise CheckpointError(folder, DIGEST_FILE, "missing: the checkpoint is incomplete (its write was interrupted) "
                              "or was not written by this version of mosaic_kit")
    try:
        digest = json.loads(digest_path.read_text())
        files = digest["files"]
        if digest.get("format") != 1 or not isinstance(files, dict):
            raise ValueError(f"format {digest.get('format')!r}")
        entries = {str(name): (str(entry["sha256"]), int(entry["bytes"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise CheckpointError(folder, DIGEST_FILE, f"unreadable digest ({type(error).__name__}: {error})") from error
    for name in required:
        if name not in entries:
            raise CheckpointError(folder, name, f"not listed in {DIGEST_FILE}")
    for name, (sha256, size) in sorted(entries.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(folder, name, "missing (listed in the digest)")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(folder, name, f"{actual} bytes, but the digest records {size} (truncated or rewritten)")
        if _sha256(path) != sha256:
            raise CheckpointError(folder, name, "SHA-256 differs from the digest (damaged bytes)")
    return files


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (``step-*`` folders with a digest file), oldest first.

    Complete is not intact: `verify_checkpoint` checks the bytes.

    Args:
        root: the ``checkpoints`` folder of a run.

    Returns:
        The folders, sorted by step.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for step in (10, 2):
        ...     (root / f"step-{step:07d}").mkdir()
        ...     _ = write_checkpoint_digest(root / f"step-{step:07d}")
        >>> (root / "step-0000011").mkdir()  # no digest: incomplete
        >>> [p.name for p in list_checkpoints(root)]
        ['step-0000002', 'step-0000010']
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and (p / DIGEST_FILE).is_file()]
    return sorted(found, key=_step_of)


def latest_intact_checkpoint(root: str | os.PathLike, required: tuple[str, ...] = ()) -> Path:
    """The newest checkpoint under ``root`` that passes `verify_checkpoint`.

    Every newer ``step-*`` folder that fails (damaged bytes, a truncated or missing file, no
    digest) is reported with a `UserWarning` (and on the ``mosaic_kit.training`` logger) naming
    the folder and the file, and skipped.

    Args:
        root: the ``checkpoints`` folder of a run.
        required: file names every checkpoint must list (passed to `verify_checkpoint`).

    Returns:
        The folder to resume from.

    Raises:
        CheckpointError: when there is no checkpoint, or none is intact (listing each one's fault).

    Example:
        >>> import tempfile, warnings
        >>> root = Path(tempfile.mkdtemp())
        >>> for step in (2, 4):
        ...     (root / f"step-{step:07d}").mkdir()
        ...     _ = (root / f"step-{step:07d}" / "state.json").write_text(str(step))
        ...     _ = write_checkpoint_digest(root / f"step-{step:07d}")
        >>> _ = (root / "step-0000004" / "state.json").write_text("x")  # damaged
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     latest_intact_checkpoint(root).name
        'step-0000002'
        >>> "step-0000004, file 'state.json'" in str(caught[0].message)
        True
    """
    root = Path(root)
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of,
                        reverse=True) if root.is_dir() else []
    if not candidates:
        raise CheckpointError(root, None, "expected step-* folders to resume from, but found none")
    faults = []
    for folder in candidates:
        try:
            verify_checkpoint(folder, required)
        except CheckpointError as error:
            faults.append(str(error))
            message = f"Skipping damaged or incomplete {error}; falling back to an older checkpoint."
            log.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)
            continue
        return folder
    raise CheckpointError(root, None, "no intact checkpoint to resume from:\n  " + "\n  ".join(faults))


def remove_checkpoint(folder: str | os.PathLike) -> None:
    """Deletes a checkpoint without ever leaving a half-deleted ``step-*`` folder: renames it to
    ``.trash-<name>`` (atomic), then deletes that.

    Args:
        folder: the checkpoint folder.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp()) / "step-0000001"
        >>> folder.mkdir()
        >>> remove_checkpoint(folder)
        >>> sorted(p.name for p in folder.parent.iterdir())
        []
    """
    folder = Path(folder)
    trash = folder.with_name(f"{_TRASH_PREFIX}{folder.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash)


def publish_checkpoint(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Renames a fully written (digested) temporary folder to its checkpoint name.

    An existing folder of that name (e.g. a damaged checkpoint a resumed run is now rewriting)
    is removed with `remove_checkpoint` first.

    Args:
        tmp: the written folder (with its digest).
        final: the checkpoint name, ``<root>/step-NNNNNNN``.

    Returns:
        ``final``.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".tmp-step-0000003").mkdir()
        >>> publish_checkpoint(root / ".tmp-step-0000003", root / "step-0000003").name
        'step-0000003'
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def clean_stale_checkpoints(root: str | os.PathLike) -> list[str]:
    """Removes ``.tmp-*`` and ``.trash-*`` folders a killed run left under ``root``.

    Call it only while no other process writes checkpoints into ``root``.

    Args:
        root: the ``checkpoints`` folder of a run.

    Returns:
        The names removed.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".tmp-step-0000004").mkdir()
        >>> clean_stale_checkpoints(root)
        ['.tmp-step-0000004']
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    if removed:
        log.info("removed what a killed run left in %s: %s", root, ", ".join(removed))
    return removed
