"""Exactly-once under faults: fit-day killed (SIGKILL) at every artifact/marker boundary of every
stage, and at random times, resumes to the same day as an uninterrupted run; two fit-day
processes on one day; a finished session is never presented again.

A kill point is a file appearing, not a timer: the fit-day process runs with an audit hook
(``sys.addaudithook``) that, once a rename puts the named file in place, kills the process with
SIGKILL at its next audited operation — after the artifact exists, before anything else happens.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import zarr

from tests.closedloop.day.fault_runs import BOUNDARIES, check_same_day, finish, make_experiment, start_fit_day


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a fresh process per kill: minutes on 2 shared cores
def test_killed_at_every_boundary_resumes_to_the_same_day(tmp_path, reference_day):
    experiment = make_experiment(tmp_path / "killed")
    started = time.monotonic()
    for boundary in BOUNDARIES:
        process = start_fit_day(experiment, kill_after=boundary)
        assert process.wait(timeout=600) == -signal.SIGKILL, (
            f"fit-day was not killed after {boundary}: {process.stderr.read().decode()[-2000:]}"
        )
        assert (experiment / "day_000" / boundary).exists(), boundary
    finish(start_fit_day(experiment))
    check_same_day(reference_day, experiment / "day_000")
    print(f"{len(BOUNDARIES)} kills and a resume in {time.monotonic() - started:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a fresh process per kill: minutes on 2 shared cores
def test_killed_at_random_times_resumes_to_the_same_day(tmp_path, reference_day):
    experiment = make_experiment(tmp_path / "random")
    delays = np.random.default_rng(7).uniform(2.0, 25.0, size=4)
    for delay in delays:
        process = start_fit_day(experiment)
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=600)
    finish(start_fit_day(experiment))
    check_same_day(reference_day, experiment / "day_000")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a fresh process per kill: minutes on 2 shared cores
def test_a_second_process_on_the_same_day_is_refused(tmp_path):
    experiment = make_experiment(tmp_path / "two")
    first = start_fit_day(experiment)
    lock = experiment / "day_000.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()):
        assert time.monotonic() < deadline and first.poll() is None, "the first fit-day never took the lock"
        time.sleep(0.05)
    second = start_fit_day(experiment)
    assert second.wait(timeout=300) == 2
    message = second.stderr.read().decode()
    assert f"pid {first.pid}" in message and "is being run by another process" in message, message
    first.send_signal(signal.SIGKILL)  # a dead holder: the next run takes the lock over
    first.wait()
    finish(start_fit_day(experiment))
    ids = zarr.open_group(str(experiment / "day_000/store.zarr"), mode="r")["presentations/id"][:]
    assert len(np.unique(ids)) == len(ids)
