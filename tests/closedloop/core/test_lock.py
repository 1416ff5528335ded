"""The lock of a day (or of an export's OUT): one holder at a time, a dead holder's lock taken over, a damaged lock file handled."""

from __future__ import annotations

import json
import os

import pytest

from closedloop.core.lock import LockedError, hold_lock


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    path = tmp_path / "day_000.lock"
    with hold_lock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockedError, match=rf"day_000 is being run by another process \(pid {os.getpid()} on "):
            with hold_lock(path):
                pass
    assert path.read_text() == ""  # released cleanly


def test_a_garbled_lock_file_left_by_a_dead_holder_is_taken_over(tmp_path, caplog):
    path = tmp_path / "day_000.lock"
    path.write_bytes(b"\x00\xffnot json")
    with hold_lock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over the lock of a process that is gone (pid ? on ?" in caplog.text


def test_a_lock_path_that_is_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "day_000.lock").mkdir()
    with pytest.raises(FileExistsError, match=r"day_000.lock' is a folder, not a lock file; remove it"):
        with hold_lock(tmp_path / "day_000.lock"):
            pass


def test_a_lock_that_removes_its_file_still_excludes_and_leaves_nothing(tmp_path):
    path = tmp_path / ".d.nwb.lock"
    with hold_lock(path, what="the export to d.nwb", remove=True):
        with pytest.raises(LockedError, match=rf"^the export to d.nwb is being run by another process \(pid {os.getpid()} on "):
            with hold_lock(path, what="the export to d.nwb", remove=True):
                pass
        assert path.exists()
    assert not path.exists()
    with hold_lock(path, remove=True):  # taken again after its release
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == []


def test_nested_holds_of_one_process_nest_and_a_plain_second_hold_is_refused(tmp_path):
    """A validation campaign holds its experiment's lock and runs its days, which take it too."""
    path = tmp_path / "exp.lock"
    with hold_lock(path, nested=True):
        with hold_lock(path, nested=True):
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert json.loads(path.read_text())["pid"] == os.getpid()  # the inner release kept the outer hold
        with pytest.raises(LockedError, match=r"exp is being run by another process"):
            with hold_lock(path):
                pass
    assert path.read_text() == ""
    with hold_lock(path):  # released: anyone may take it
        with pytest.raises(LockedError):
            with hold_lock(path, nested=True):  # not taken nested: a nested hold does not slip in
                pass
