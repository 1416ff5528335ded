"""Running `closedloop fit-day` (and other commands) as real processes for the fault tests: a day
killed at a file boundary, two processes at once, a full disk. ``check_same_day`` compares a
resumed day with an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import zarr

from closedloop.core.files import read_json
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


def make_experiment(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "experiment.toml").write_text(TINY.format(time_scale=0.02))
    return folder


def start_fit_day(experiment: Path, kill_after: str | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    arguments = ["-q", "fit-day", "0", "--experiment", str(experiment)]
    if kill_after is None:
        command = [sys.executable, "-m", "closedloop", *arguments]
    else:
        command = [sys.executable, "-c", _HOOK, *arguments]
        environment["KILL_AFTER_RENAME"] = kill_after
    return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)


def finish(process: subprocess.Popen) -> None:
    code = process.wait(timeout=600)
    assert code == 0, process.stderr.read().decode()[-3000:]


def list_day_files(folder: Path) -> set[str]:
    """Every file of a day folder (the run's own log and lock aside)."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} - {"log.jsonl"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_same_day(reference: Path, resumed: Path) -> None:
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
    assert digest(reference / "model.safetensors") == digest(resumed / "model.safetensors")
    assert digest(reference / "stimuli.h5") == digest(resumed / "stimuli.h5")
    leftovers = list_day_files(resumed) - list_day_files(reference)
    assert not leftovers, f"files an uninterrupted day does not leave: {sorted(leftovers)[:10]}"


def start_closedloop(*arguments: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "closedloop", *arguments], env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)


def wait_for_holder(lock: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()):
        assert time.monotonic() < deadline and process.poll() is None, "the first process never took the lock"
        time.sleep(0.05)


def disk_bytes(folder: Path) -> int:
    """What a folder's files take on a disk: whole blocks, as a file system counts them."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())
