"""Exactly-once under faults: fit-day killed (SIGKILL) at every artifact/marker boundary of every
stage, and at random times, resumes to the same day as an uninterrupted run; two fit-day
processes on one day; a finished session is never presented again.

A kill point is a file appearing, not a timer: the fit-day process runs with an audit hook
(``sys.addaudithook``) that, once a rename puts the named file in place, kills the process with
SIGKILL at its next audited operation — after the artifact exists, before anything else happens.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from closedloop.core.files import read_json
from tests.small_disk import mount_small_disk, resize_small_disk
from tests.tiny_experiment import TINY

ROOT = Path(__file__).resolve().parents[3]

# Every artifact of a day and each stage's marker, in the order a day writes them (the name the
# final rename puts in place). The present stage's artifacts are the store's presentations (appended
# with committed lengths, covered by the random kills) and the recording.
BOUNDARIES = [
    "plan.json", "stages/plan.json",
    "store.zarr", "stages/synthesize.json",
    "stimuli.h5", "stages/bundle.json",
    "recording.nev", "stages/present.json",
    "store.zarr/ingest", "stages/ingest.json",
    "sensitivity.json", "stages/estimate.json",
    "model.safetensors", "model.json", "stages/refit.json",
    "report.html", "stages/report.json",
]

_HOOK = textwrap.dedent("""
    import os, signal, sys
    target, armed, killing = os.environ["KILL_AFTER_RENAME"], [], []
    def hook(event, args):
        if armed and not killing:
            killing.append(True)  # os.kill is audited too
            os.kill(os.getpid(), signal.SIGKILL)
        if event == "os.rename" and os.fspath(args[1]).replace(os.sep, "/").endswith("day_000/" + target):
            armed.append(True)
    sys.addaudithook(hook)
    from closedloop.cli import main
    main(sys.argv[1:])
""")


def _experiment(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "experiment.toml").write_text(TINY.format(time_scale=0.02))
    return folder


def _fit_day(experiment: Path, kill_after: str | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    arguments = ["-q", "fit-day", "0", "--experiment", str(experiment)]
    if kill_after is None:
        command = [sys.executable, "-m", "closedloop", *arguments]
    else:
        command = [sys.executable, "-c", _HOOK, *arguments]
        environment["KILL_AFTER_RENAME"] = kill_after
    return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)


def _finish(process: subprocess.Popen) -> None:
    code = process.wait(timeout=600)
    assert code == 0, process.stderr.read().decode()[-3000:]


def _files(folder: Path) -> set[str]:
    """Every file of a day folder (the run's own log and lock aside)."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} - {"log.jsonl"}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_same_day(reference: Path, resumed: Path) -> None:
    a = zarr.open_group(str(reference / "store.zarr"), mode="r")
    b = zarr.open_group(str(resumed / "store.zarr"), mode="r")
    for name in ("pixels", "parent", "site", "eps", "direction", "kind", "predicted", "code"):
        np.testing.assert_array_equal(a[f"stimuli/{name}"][:], b[f"stimuli/{name}"][:], err_msg=name)

    def presentations(root):
        ids = root["presentations/id"][:]
        assert len(np.unique(ids)) == len(ids), "a presentation was stored twice"
        rows = zip(ids, root["presentations/stimulus"][:], root["presentations/valid"][:], map(tuple, root["counts"][:]),
                   map(tuple, root["ingest/counts"][:]))
        return sorted((int(i), int(s), bool(v), c, n) for i, s, v, c, n in rows)

    assert presentations(a) == presentations(b)
    assert read_json(reference / "sensitivity.json") == read_json(resumed / "sensitivity.json")
    assert _digest(reference / "model.safetensors") == _digest(resumed / "model.safetensors")
    assert _digest(reference / "stimuli.h5") == _digest(resumed / "stimuli.h5")
    leftovers = _files(resumed) - _files(reference)
    assert not leftovers, f"files an uninterrupted day does not leave: {sorted(leftovers)[:10]}"


@pytest.fixture(scope="module")
def reference_day(tmp_path_factory) -> Path:
    experiment = _experiment(tmp_path_factory.mktemp("faults") / "reference")
    _finish(_fit_day(experiment))
    return experiment / "day_000"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a fresh process per kill: minutes on 2 shared cores
def test_killed_at_every_boundary_resumes_to_the_same_day(tmp_path, reference_day):
    experiment = _experiment(tmp_path / "killed")
    started = time.monotonic()
    for boundary in BOUNDARIES:
        process = _fit_day(experiment, kill_after=boundary)
        assert process.wait(timeout=600) == -signal.SIGKILL, (
            f"fit-day was not killed after {boundary}: {process.stderr.read().decode()[-2000:]}"
        )
        assert (experiment / "day_000" / boundary).exists(), boundary
    _finish(_fit_day(experiment))
    _check_same_day(reference_day, experiment / "day_000")
    print(f"{len(BOUNDARIES)} kills and a resume in {time.monotonic() - started:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a fresh process per kill: minutes on 2 shared cores
def test_killed_at_random_times_resumes_to_the_same_day(tmp_path, reference_day):
    experiment = _experiment(tmp_path / "random")
    delays = np.random.default_rng(7).uniform(2.0, 25.0, size=4)
    for delay in delays:
        process = _fit_day(experiment)
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=600)
    _finish(_fit_day(experiment))
    _check_same_day(reference_day, experiment / "day_000")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a fresh process per kill: minutes on 2 shared cores
def test_a_second_process_on_the_same_day_is_refused(tmp_path):
    experiment = _experiment(tmp_path / "two")
    first = _fit_day(experiment)
    lock = experiment / "day_000.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()):
        assert time.monotonic() < deadline and first.poll() is None, "the first fit-day never took the lock"
        time.sleep(0.05)
    second = _fit_day(experiment)
    assert second.wait(timeout=300) == 2
    message = second.stderr.read().decode()
    assert f"pid {first.pid}" in message and "is being run by another process" in message, message
    first.send_signal(signal.SIGKILL)  # a dead holder: the next run takes the lock over
    first.wait()
    _finish(_fit_day(experiment))
    ids = zarr.open_group(str(experiment / "day_000/store.zarr"), mode="r")["presentations/id"][:]
    assert len(np.unique(ids)) == len(ids)


def _disk_bytes(folder: Path) -> int:
    """What a folder's files take on a disk: whole blocks, as a file system counts them."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_full_disk_stops_the_day_in_one_line_and_it_resumes_to_the_same_day(tmp_path, reference_day):
    """The day on a real small file system (tmpfs) that fills up: every run stops at the write that no
    longer fits, with one line naming the place and exit status 1, leaves no temporary behind, and once
    the file system has grown the day finishes as the uninterrupted one did."""
    step = _disk_bytes(reference_day) // 6
    disk = tmp_path / "disk"
    with mount_small_disk(disk, step):
        experiment = _experiment(disk / "full")
        stopped_at = []
        for size in range(2 * step, 40 * step, step):
            process = _fit_day(experiment)
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
        _check_same_day(reference_day, experiment / "day_000")


def _closedloop(*arguments: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "closedloop", *arguments], env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)


def _wait_for_holder(lock: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()):
        assert time.monotonic() < deadline and process.poll() is None, "the first process never took the lock"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_validate_and_fit_day_on_one_experiment_refuse_each_other_and_lose_nothing(tmp_path):
    """`closedloop validate --out X` (which starts X afresh without --resume) and `fit-day` in X share
    one lock, X.lock beside the folder: whichever comes second stops at once naming the first."""
    from closedloop.data.layout import experiment_lock_path

    experiment = tmp_path / "days"
    experiment.mkdir()
    (experiment / "experiment.toml").write_text(TINY.format(time_scale=1.0))  # a day of about a minute
    day = _fit_day(experiment)
    _wait_for_holder(experiment_lock_path(experiment), day)
    campaigns = [_closedloop("validate", "--out", str(experiment), "--days", "2", "--sites", "2", *resume)
                 for resume in ((), ("--resume",))]
    for campaign in campaigns:
        assert campaign.wait(timeout=300) == 2
        message = campaign.stderr.read().decode()
        assert f"pid {day.pid}" in message and "is being run by another process" in message, message
    assert day.poll() is None, "the day ended before both campaigns were refused: make it longer"
    _finish(day)
    assert (experiment / "day_000" / "stages" / "report.json").exists()  # the day went on, untouched

    out = tmp_path / "campaign"  # validate makes it, once it has trained its networks: a fit-day before is refused too
    campaign = _closedloop("validate", "--out", str(out), "--days", "2", "--sites", "2")
    try:
        _wait_for_holder(experiment_lock_path(out), campaign)
        second = _fit_day(out)
        assert second.wait(timeout=300) == 2
        message = second.stderr.read().decode()
        assert f"pid {campaign.pid}" in message and "is being run by another process" in message, message
    finally:
        campaign.kill()
        campaign.wait()
