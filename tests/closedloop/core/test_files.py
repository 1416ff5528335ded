"""Atomic writes leave nothing half-written, and what a killed writer left is found and removed."""

from __future__ import annotations

import os
import shutil

import pytest

from closedloop.core.files import atomic_path, remove_temporaries, remove_temporaries_of, write_bytes, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.json") as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "stages").mkdir()
    left = [tmp_path / ".model.safetensors.ab12cd.tmp", tmp_path / "stages" / ".plan.json.x1y2z3.tmp"]
    kept = [tmp_path / "model.safetensors", tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / "stages" / "plan.json"]
    for path in left + kept:
        path.write_text("x")
    assert sorted(remove_temporaries(tmp_path)) == sorted(left)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in left)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_written_file_gets_the_mode_the_umask_gives_unless_told(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_bytes(tmp_path / "a.bin", b"x")
        write_text(tmp_path / "secret", "x", mode=0o600)
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_temporaries_of_one_file_are_removed_and_no_other_file_s(tmp_path):
    out = tmp_path / "d.nwb"
    with atomic_path(out, suffix=".partial", extension=False) as temporary:
        assert temporary.parent == tmp_path and ".nwb" not in temporary.name and temporary.name.endswith(".partial")
        shutil.copy(temporary, tmp_path / ".d.k1ll3d00.partial")  # as a killed writer leaves it
    left = [tmp_path / ".d.k1ll3d00.partial"]
    kept = [tmp_path / ".d.x.k1ll3d00.partial", tmp_path / ".e.k1ll3d00.partial", tmp_path / "d.nwb",
            tmp_path / ".d.k1ll3d00.tmp", tmp_path / ".d.nwb.k1ll3d00.partial", tmp_path / ".d.lock"]
    for path in kept:
        if path != out:
            path.write_text("x")
    assert remove_temporaries_of(out, suffix=".partial", extension=False) == left
    assert all(path.exists() for path in kept) and not any(path.exists() for path in left)
    assert remove_temporaries_of(out, suffix=".partial") == [tmp_path / ".d.nwb.k1ll3d00.partial"]


def test_a_write_on_a_full_disk_names_the_file_not_its_temporary_and_leaves_nothing(tmp_path):
    from closedloop.core.files import DiskFullError, write_text
    from tests.small_disk import fill_disk, mount_small_disk

    with mount_small_disk(tmp_path / "disk", 64 << 10, n_files=2) as disk:  # the root and the filler
        fill_disk(disk)
        for text in ("x" * 100_000, "x"):  # no room for its bytes; no room even for its (empty) temporary
            if text == "x":
                (disk / ".filler").unlink()
                (disk / ".filler").mkdir()  # the last file slot taken, the space free
            with pytest.raises(DiskFullError) as raised:
                write_text(disk / "report.html", text)
            assert raised.value.filename == str(disk / "report.html")
            assert [path.name for path in disk.iterdir()] == [".filler"]
