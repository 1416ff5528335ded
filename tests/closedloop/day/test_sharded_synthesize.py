"""The synthesize stage shared out over torchrun ranks (gloo, 2 CPU processes): the same stimuli as
one process, bit for bit; a rank that fails, or a day another process holds, stops every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from closedloop.core.distributed import ProcessGroup, join_process_group
from closedloop.core.files import write_npz
from closedloop.core.lock import hold_lock
from closedloop.data import layout
from closedloop.day.runner import run_day
from closedloop.day.status import read_status
from tests.tiny_experiment import TINY

ROOT = Path(__file__).resolve().parents[3]
# 2 attacked images × 2 sites × 2 budgets = 8 attack jobs in parts of 3: parts 0 and 2 on rank 0, part 1 on rank 1.
SHARDED = TINY.format(time_scale=0.0).replace("part_size = 2", "part_size = 3")
STIMULI = ("pixels", "predicted", "parent", "site", "eps", "direction", "kind", "code", "image_id", "category")


def _experiment(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "experiment.toml").write_text(SHARDED)
    return folder


@contextmanager
def _one_thread():
    """torch on one thread, as each torchrun rank runs (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _torchrun(experiment: Path, *options: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m closedloop fit-day 0 --until synthesize`` (a free port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "closedloop", "-q", "fit-day", "0", "--experiment", str(experiment), "--until", "synthesize", *options]
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300)


def test_two_ranks_make_the_same_stimuli_as_one_process(tmp_path):
    alone, sharded = _experiment(tmp_path / "alone"), _experiment(tmp_path / "sharded")
    with _one_thread():
        run_day(alone, 0, until="synthesize")
    done = _torchrun(sharded, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout[done.stdout.index("{"):])  # rank 0 alone reports
    assert list(printed) == ["plan", "synthesize"] and not printed["synthesize"]["skipped"]
    assert done.stdout.count('"synthesize"') == 1

    stores = [zarr.open_group(str(layout.day_folder(e, 0) / layout.STORE), mode="r") for e in (alone, sharded)]
    assert stores[0]["stimuli/pixels"].shape[0] == 6 + 8 + 8  # clean, attacks, gaussian and interpolation baselines
    for name in STIMULI:
        assert np.array_equal(stores[0][f"stimuli/{name}"][:], stores[1][f"stimuli/{name}"][:]), name
    folder = layout.day_folder(sharded, 0)
    assert not (folder / layout.SYNTHESIS_PARTS).exists() and not list(folder.rglob(".*.tmp"))
    assert layout.day_lock_path(sharded, 0).read_text() == ""  # released
    assert read_status(sharded)[0]["next_stage"] == "bundle"
    events = [json.loads(line) for line in (folder / layout.LOG).read_text().splitlines()]
    assert [(e["stage"], e["event"]) for e in events] == [("plan", "start"), ("plan", "done"),
                                                          ("synthesize", "start"), ("synthesize", "done")]


@pytest.mark.slow
def test_a_failing_rank_or_a_held_day_stops_every_rank(tmp_path):
    experiment = _experiment(tmp_path / "exp")
    with hold_lock(layout.day_lock_path(experiment, 0)):
        held = _torchrun(experiment)
    assert held.returncode != 0
    assert "error: day_000 is being run by another process" in held.stderr  # rank 0
    assert "error: rank 0 of 2 on" in held.stderr and "failed at 'start': LockedError" in held.stderr  # rank 1

    run_day(experiment, 0, until="plan")
    parts = layout.day_folder(experiment, 0) / layout.SYNTHESIS_PARTS
    pixels = np.zeros((1, 224, 224, 3), np.uint8)
    write_npz(parts / "part_00001.npz", compressed=False, pixels=pixels, direction=np.ones(1, np.int8),
              predicted=np.zeros((1, 2), np.float32))  # left by another plan: rank 1 stops at it
    failed = _torchrun(experiment)
    assert failed.returncode != 0
    assert "part_00001.npz holds 1 attacks, expected 3" in failed.stderr
    assert "error: rank 1 of 2 on" in failed.stderr and "failed at 'attack round 0': ValueError" in failed.stderr
    assert (parts / "part_00000.npz").exists()  # rank 0's part of that round is kept for the rerun
    assert not (layout.day_folder(experiment, 0) / layout.STORE).exists()
    assert read_status(experiment)[0]["next_stage"] == "synthesize"


def test_under_torchrun_a_day_runs_up_to_synthesize_only(tmp_path):
    experiment = _experiment(tmp_path / "exp")
    with pytest.raises(ValueError, match=r"under torchrun \(2 ranks\) a day runs up to synthesize only, but 'until' = None: "
                                         r"pass --until synthesize"):
        run_day(experiment, 0, group=ProcessGroup(rank=0, world_size=2))
    assert not layout.day_folder(experiment, 0).exists() and not layout.day_lock_path(experiment, 0).exists()


def test_one_process_is_a_group_of_one():
    with join_process_group() as group:
        assert (group.rank, group.world_size) == (0, 1)
        assert group.exchange("start", {"plan": "abc"}) == [{"plan": "abc"}]
        with pytest.raises(KeyError, match="lost"), group.step("round 0"):
            raise KeyError("lost")
        assert group.steps == ["start", "round 0"] and group.failed
    with pytest.raises(ValueError, match=r"'timeout_s' must lie in \(0, inf\), but got 0"), join_process_group(0):
        pass


def test_make_day_stimuli_runs_on_rank_0_only(tmp_path):
    from closedloop.day.synthesize import make_day_stimuli

    with pytest.raises(ValueError, match="make_day_stimuli runs on rank 0 only, but this process is rank 1; "
                                         "the other ranks run run_shard"):
        make_day_stimuli(None, None, None, None, None, seed=0, parts_dir=tmp_path, group=ProcessGroup(rank=1, world_size=2))


def test_the_attack_step_rule_reaches_the_days_attacks(tmp_path):
    """[attack] step_rule is frozen with the day and changes its attacks, not its clean images or baselines."""
    made = {}
    for rule in ("pgd", "apgd"):
        experiment = tmp_path / rule
        experiment.mkdir()
        (experiment / "experiment.toml").write_text(SHARDED.replace("steps = 3", f"steps = 3\nstep_rule = \"{rule}\""))
        with _one_thread():
            run_day(experiment, 0, until="synthesize")
        folder = layout.day_folder(experiment, 0)
        assert f'step_rule = "{rule}"' in (folder / layout.CONFIG).read_text()
        store = zarr.open_group(str(folder / layout.STORE), mode="r")
        made[rule] = {name: store[f"stimuli/{name}"][:] for name in ("pixels", "kind")}
    kind = made["pgd"]["kind"]
    assert np.array_equal(kind, made["apgd"]["kind"])
    attack = kind == "attack"
    assert not np.array_equal(made["pgd"]["pixels"][attack], made["apgd"]["pixels"][attack])
    assert np.array_equal(made["pgd"]["pixels"][~attack], made["apgd"]["pixels"][~attack])
