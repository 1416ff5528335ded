"""A full disk during a day: a real small file system (tmpfs) that fills up and grows."""

from __future__ import annotations

import pytest

from tests.closedloop.day.fault_runs import check_same_day, disk_bytes, make_experiment, start_fit_day
from tests.small_disk import mount_small_disk, resize_small_disk


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_full_disk_stops_the_day_in_one_line_and_it_resumes_to_the_same_day(tmp_path, reference_day):
    """The day on a real small file system (tmpfs) that fills up: every run stops at the write that no
    longer fits, with one line naming the place and exit status 1, leaves no temporary behind, and once
    the file system has grown the day finishes as the uninterrupted one did."""
    step = disk_bytes(reference_day) // 6
    disk = tmp_path / "disk"
    with mount_small_disk(disk, step):
        experiment = make_experiment(disk / "full")
        stopped_at = []
        for size in range(2 * step, 40 * step, step):
            process = start_fit_day(experiment)
            code, printed = process.wait(timeout=600), process.stderr.read().decode()
            if code == 0:
                break
            assert "Traceback" not in printed, printed[-3000:]
            last = printed.strip().splitlines()[-1]
            if "the rig refused" in last:  # the simulated rig keeps its session on this disk too (day_000/rig_sim)
                assert code == 2 and f"no space left on the rig's disk holding {disk}/full/" in last, printed[-3000:]
            else:
                assert code == 1 and last.startswith(f"error: no space left on the device holding {disk}/full/"), printed[-3000:]
                assert "MB free" in last and "run the same command again" in last
            assert not list(experiment.rglob(".*.tmp")), "a temporary was left behind"
            stopped_at.append(last.split(" holding ")[1].split(" ")[0])
            resize_small_disk(disk, size)
        assert code == 0, printed[-3000:]
        assert len(stopped_at) >= 3, stopped_at
        print(f"the day stopped {len(stopped_at)} times for want of space, at: {stopped_at}")
        check_same_day(reference_day, experiment / "day_000")
