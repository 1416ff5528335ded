"""One process at a time on a day, a campaign, a site selection or an export: an exclusive lock
file, released when its holder dies.

A lock file (``day_NNN.lock`` beside ``day_NNN/``, so ``--force`` can set the folder aside while
holding it; ``OUT.lock`` beside a validation campaign's folder; ``site_selection.lock`` beside
``experiment.toml``; ``.<OUT>.lock`` beside an NWB export's OUT) is locked with ``flock``: the
kernel releases the lock when the holding process exits or is killed, so a lock left by a dead
process is taken over without any guessing about pids. The file names its holder (pid, host, start
time, command), which the refusal quotes; a lock file whose holder died is reported in the log
when it is taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from closedloop.core.logs import logger

__all__ = ["LockedError", "hold_lock", "read_lock_holder"]


_HELD: dict[str, int] = {}  # the lock files this process holds with nested=True (real paths), and how many holds


class LockedError(RuntimeError):
    """Another live process holds the lock (of a day, a campaign, an export)."""


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started_utc', '?')}"
            f" ({holder.get('command', '?')})")


@contextmanager
def hold_lock(path: str | Path, *, what: str | None = None, remove: bool = False,
              nested: bool = False) -> Iterator[None]:
    """Hold the lock file ``path`` for the duration; ``LockedError`` naming the holder (pid, host,
    start time, command) if a live process holds it.

    ``what``: what the lock guards, as the refusal names it ("day_000", "the export to
    nwb/day_003.nwb"; default: the lock file's name without its suffix). ``remove``: delete the
    lock file on release (for a lock beside a user's files) rather than leave it empty; a process
    that locked the file just before it was deleted notices and locks the new one. ``nested``: a
    process that holds ``path`` already (taken with ``nested`` too) takes it again at once, e.g. a
    validation campaign that holds its experiment's lock runs its days, which take it too; the
    hold belongs to the process, not to a thread. Without ``nested`` a second hold in the same
    process is refused like another process's.
    """
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{str(path)!r} is a folder, not a lock file; remove it and run the command again")
    key = os.path.realpath(path)
    if nested and _HELD.get(key):  # this process holds it already: nothing more to take
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    descriptor = _acquire(path, what)
    if nested:
        _HELD[key] = 1
    try:
        earlier = _read_holder(descriptor)
        if earlier:
            logger.warning("%s: taking over the lock of a process that is gone (%s)", path.name, _describe(earlier))
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)[:200]}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            if remove:
                path.unlink(missing_ok=True)  # while still locked: see _acquire
            os.ftruncate(descriptor, 0)  # an empty file: released cleanly (a killed holder leaves its name)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        if nested:
            del _HELD[key]
        os.close(descriptor)


def _acquire(path: Path, what: str | None) -> int:
    """An open descriptor of ``path``, flock'ed; retried when the locked file was deleted meanwhile
    (by a holder releasing with ``remove``), so that two processes never hold two files."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise LockedError(
                f"{what or path.stem} is being run by another process ({_describe(holder)}); wait for it to finish, "
                f"or stop that process first (a killed process releases {path.name} by itself)"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def read_lock_holder(path: str | Path) -> dict | None:
    """Who holds the lock file ``path``, read without taking it (for a read-only view such as
    ``closedloop dashboard``): None when no process holds it (no file, an empty file, or a holder
    on this host that is gone), else the holder (pid, host, started_utc, command), with ``alive``
    True for a live process on this host and None for a process on another host (not checkable).
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        holder = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None
    if not isinstance(holder, dict):
        return None
    if holder.get("host") != socket.gethostname():
        return {**holder, "alive": None}
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: is it there? (nothing is sent)
    except (ProcessLookupError, OverflowError):
        return None
    except PermissionError:
        pass  # another user's live process
    return {**holder, "alive": True}


def _read_holder(descriptor: int) -> dict:
    text = os.pread(descriptor, 4096, 0).decode(errors="replace")
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"command": "unreadable lock file"}
    return holder if isinstance(holder, dict) else {}
