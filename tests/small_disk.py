"""A real small file system for the full-disk tests: a size-limited tmpfs mounted on a test's folder.

Mounting needs root (CI and the development machines run as root); elsewhere the test is skipped,
saying why.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mount_small_disk(folder: Path, size_bytes: int, *, n_files: int | None = None) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` (whole 4 kB pages; ``n_files``: at most so many files and folders)
    on ``folder`` (made if missing) for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (f",nr_inodes={n_files}" if n_files else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def resize_small_disk(folder: Path, size_bytes: int) -> None:
    """Grow (or shrink) the tmpfs on ``folder`` to ``size_bytes``, its files kept."""
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(folder)], check=True)


def fill_disk(folder: Path, *, leave_bytes: int = 0) -> Path:
    """Fill the file system of ``folder`` with one file, ``folder/.filler``, but ``leave_bytes``; its path."""
    filler = folder / ".filler"
    with filler.open("wb", buffering=0) as stream, pytest.raises(OSError, match="No space left"):
        while True:
            stream.write(b"x" * 4096)
    if leave_bytes:
        with filler.open("r+b") as stream:
            stream.truncate(max(0, filler.stat().st_size - leave_bytes))
    return filler
