"""Files written so that a crash never leaves a half-written file that looks finished.

Everything is written under a temporary name in the same folder and renamed into place only
once complete (a rename within one file system is atomic); on failure the temporary is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from closedloop.core.validation import check_file

__all__ = [
    "DiskFullError", "reporting_full_disk", "describe_disk_full",
    "atomic_path", "remove_temporaries", "remove_temporaries_of", "write_text", "write_bytes", "write_npz", "write_json",
    "read_json", "compute_file_digest", "compute_folder_digest",
]


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC) or quota (EDQUOT); ``filename`` is the file or folder it wrote to."""


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors and HDF5 (h5py, also as a RuntimeError when closing) report it in their messages only
    reported = isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError"
    return reported and any(text in str(error) for text in (f"os error {errno.ENOSPC})", f"errno = {errno.ENOSPC},"))


@contextmanager
def reporting_full_disk(path: str | Path, *, name_path: bool = False) -> Iterator[None]:
    """Turn a write in the block that runs out of disk space into :class:`DiskFullError` naming where.

    The name is the failing call's own file when it gives one (unless ``name_path``), else ``path``
    (the file or folder the block writes to). Every other error passes unchanged.
    """
    try:
        yield
    except Exception as error:
        if not _is_disk_full(error):
            raise
        where = (not name_path and getattr(error, "filename", None)) or str(path)
        raise DiskFullError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) from error


def describe_disk_full(error: DiskFullError) -> str:
    """One line for the user: where the disk is full, how much is free there, and what to do."""
    place = Path(error.filename or ".").expanduser().absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    usage = shutil.disk_usage(place)
    return (f"no space left on the device holding {error.filename} ({usage.free / 1e6:.1f} MB free of "
            f"{usage.total / 1e6:.0f} MB); nothing half-written was kept: free some space there and run the same "
            "command again, it goes on from what was finished")


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", extension: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    The parent folder is created if needed. The temporary, ``.<name>.<random><suffix>``, is
    created empty with the mode the umask gives (0666 & ~umask, like any file a user writes), which
    the renamed file keeps. If the block raises, the temporary is removed and ``path`` is left as
    it was; a write that runs out of disk space raises :class:`DiskFullError` naming ``path``
    (or the file the failing call named). ``suffix``: the end of the temporary's name (for writers that check the extension).
    ``extension=False``: leave ``path``'s extension out of the name (``.<stem>.<random><suffix>``),
    for files that tools find by a pattern such as ``*.nwb*``.
    """
    path = Path(path).expanduser()
    with reporting_full_disk(path, name_path=True):  # the file the user knows, not its temporary
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = _create_temporary(path, suffix, extension)
        try:
            yield temporary
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def _name_temporaries(path: Path, extension: bool) -> str:
    """What the temporaries of ``path`` are named after (after the leading dot)."""
    return path.name if extension else path.stem


def _create_temporary(path: Path, suffix: str, extension: bool) -> Path:
    while True:  # tempfile.mkstemp would make it 0600 whatever the umask
        temporary = path.with_name(f".{_name_temporaries(path, extension)}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove what :func:`atomic_path` leaves when its process is killed mid-write: files named
    ``.<name>.<random>.tmp`` anywhere under ``folder``. Only for a folder no other process is
    writing (e.g. a day folder under its lock). Returns the removed paths."""
    removed = [path for path in Path(folder).rglob(".*.tmp") if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def remove_temporaries_of(path: str | Path, *, suffix: str = ".tmp", extension: bool = True) -> list[Path]:
    """Remove what ``atomic_path(path, suffix=suffix, extension=extension)`` leaves beside ``path``
    when its process is killed, never another file's. Only while no other process writes ``path``
    (e.g. under its lock). Returns the removed paths."""
    path = Path(path).expanduser()
    pattern = re.compile(rf"\.{re.escape(_name_temporaries(path, extension))}\.[^.]+{re.escape(suffix)}")
    removed = [item for item in path.parent.glob(".*") if pattern.fullmatch(item.name) and item.is_file()]
    for item in removed:
        item.unlink(missing_ok=True)
    return removed


def write_text(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) atomically, fsync'd; ``mode`` sets the permission bits (e.g. 0o600)."""
    with atomic_path(path) as temporary:
        if mode is not None:
            os.chmod(temporary, mode)
        with temporary.open("w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` atomically (a crash leaves the old file or none, never part of the new one)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_npz(path: str | Path, *, compressed: bool = True, **arrays) -> Path:
    """Write numpy ``arrays`` (name → array) as one ``.npz`` atomically; ``compressed``: zip-deflate them."""

    with atomic_path(path) as temporary, temporary.open("wb") as stream:
        (np.savez_compressed if compressed else np.savez)(stream, **arrays)
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    """Write ``data`` as indented JSON atomically; NaN and infinity are refused (not JSON)."""
    return write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path):
    """Read a JSON file, naming the file in the error if it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); the file may be damaged") from None


def compute_file_digest(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 8 MiB blocks (any size)."""
    digest = hashlib.sha256()
    with check_file("path", path).open("rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_folder_digest(path: str | Path) -> str:
    """sha256 hex digest of a folder's files: each file's path relative to the folder and its
    bytes, in sorted path order (the same tree gives the same digest wherever it lies)."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(item for item in root.rglob("*") if item.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(compute_file_digest(file)))
    return digest.hexdigest()
