"""The daily loop end to end against the simulated rig: artifacts, the estimator, crash-resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from closedloop.core.files import read_json
from closedloop.data.layout import STAGES
from closedloop.day.runner import run_day
from closedloop.day.status import read_status
from closedloop.demos.loop import compute_ceiling_summary, format_ceiling
from rigs.launch import RigLauncher


def _independent_estimate(store_path: Path) -> dict:
    """The lower bound recomputed from the raw zarr arrays, with loops (no closedloop code)."""
    root = zarr.open_group(str(store_path), mode="r")
    parent, site, eps = root["stimuli/parent"][:], root["stimuli/site"][:], root["stimuli/eps"][:]
    kind = [str(k) for k in root["stimuli/kind"][:]]
    predicted = root["stimuli/predicted"][:]
    stimulus, valid = root["presentations/stimulus"][:], root["presentations/valid"][:]
    counts = root["ingest/counts"][:].astype(float)  # the .nev was ingested and every presentation matched
    assert root["ingest/matched"][:].all()
    n_sites = counts.shape[1]
    means = np.array([counts[(stimulus == s) & valid].mean(axis=0) for s in range(len(parent))])
    out = {}
    for k in range(len(parent)):
        if parent[k] < 0:
            continue
        for i in ([site[k]] if kind[k] == "attack" else range(n_sites)):
            j = parent[k]
            value = np.sign(predicted[j, i] - predicted[k, i]) * (means[j, i] - means[k, i])
            out.setdefault((int(i), float(eps[k]), kind[k]), []).append(value)
    return {key: float(np.mean(values)) for key, values in out.items()}


@pytest.mark.slow
def test_two_days_against_the_simulated_rig(tmp_path, tiny_sim_experiment):
    experiment = tiny_sim_experiment(tmp_path / "exp")
    for day in (0, 1):
        results = run_day(experiment, day, rig=RigLauncher())
        assert list(results) == list(STAGES) and not any(r["skipped"] for r in results.values())
        folder = experiment / f"day_{day:03d}"
        for name in ("config.toml", "provenance.json", "plan.json", "store.zarr", "stimuli.h5", "recording.nev",
                     "sensitivity.json", "model.safetensors", "model.json", "report.html", "log.jsonl"):
            assert (folder / name).exists(), name
        records = read_json(folder / "sensitivity.json")
        expected = _independent_estimate(folder / "store.zarr")
        assert {(r["site"], r["eps"], r["kind"]) for r in records} == set(expected)
        for record in records:
            assert record["estimate"] == pytest.approx(expected[(record["site"], record["eps"], record["kind"])])
            assert record["truth"] is not None and record["truth"] >= 0
            # the lower bound: at or below the truth, within sampling error
            if record["kind"] == "attack":
                assert record["estimate"] <= record["truth"] + 3 * (record["sem"] or 0.0)
        plan = read_json(folder / "plan.json")
        assert len(plan["clean"]) == (6 if day == 0 else 2)
    assert not set(read_json(experiment / "day_000/plan.json")["clean_ids"]) & set(read_json(experiment / "day_001/plan.json")["clean_ids"])
    assert read_json(experiment / "day_001/provenance.json")["inputs"]["previous_model"]
    status = read_status(experiment)
    assert [s["next_stage"] for s in status] == [None, None] and all(s["model_fitted"] for s in status)
    # finished stages are not redone
    assert all(r["skipped"] for r in run_day(experiment, 1, rig=RigLauncher()).values())
    # validation: the model class's ceiling on the day's own attack jobs, beside its bound and truth
    ceiling = compute_ceiling_summary(experiment, 1)
    attacks = [r for r in read_json(experiment / "day_001/sensitivity.json") if r["kind"] == "attack"]
    assert list(ceiling) == ["2.0", "6.0"]
    for eps, cell in ceiling.items():
        chosen = [r for r in attacks if r["eps"] == float(eps)]
        assert cell["noise_free"] == pytest.approx(np.mean([r["expected"] for r in chosen]))
        assert cell["truth"] == pytest.approx(np.mean([r["truth"] for r in chosen]))
        assert np.isfinite(cell["ceiling"]) and cell["ceiling"] <= 1.5 * cell["truth"] + 0.1, cell
    assert format_ceiling(ceiling, 1).count("\n  eps=") == 2


def test_day_needs_the_previous_model_and_a_stable_config(tmp_path, tiny_sim_experiment):
    experiment = tiny_sim_experiment(tmp_path / "exp")
    with pytest.raises(FileNotFoundError, match=r"day 1 needs day 0's fitted model .*closedloop fit-day 0"):
        run_day(experiment, 1, until="plan", rig=RigLauncher())
    assert not (experiment / "day_001").exists()  # nothing written for a day that cannot start
    run_day(experiment, 0, until="plan", rig=RigLauncher())
    config = experiment / "experiment.toml"
    config.write_text(config.read_text().replace("steps = 3", "steps = 4"))
    with pytest.raises(ValueError, match=r"day 0 .* was started with a different configuration \(changed: attack.steps 3 -> 4\)"):
        run_day(experiment, 0, rig=RigLauncher())
    run_day(experiment, 0, until="plan", force=True, rig=RigLauncher())
    assert len(list(experiment.glob("day_000.replaced-*"))) == 1
    with pytest.raises(ValueError, match="Invalid value for 'until'"):
        run_day(experiment, 0, until="everything", rig=RigLauncher())


def _fit_day(experiment: Path) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    return subprocess.Popen([sys.executable, "-m", "closedloop", "-q", "fit-day", "0", "--experiment", str(experiment)],
                            env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen, condition, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"fit-day ended before the kill point: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _n_presentations(folder: Path) -> int:
    try:
        return zarr.open_group(str(folder / "store.zarr"), mode="r")["presentations"].attrs.get("n_committed", 0)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
        return 0


@pytest.mark.slow
def test_killed_day_resumes_to_the_same_result(tmp_path, tiny_sim_experiment):
    reference = tiny_sim_experiment(tmp_path / "reference", time_scale=0.05)
    uninterrupted = _fit_day(reference)
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read().decode()[-2000:]
    resumed = tiny_sim_experiment(tmp_path / "resumed", time_scale=0.05)
    folder = resumed / "day_000"
    kill_points = [
        lambda: (folder / "synthesis_parts" / "part_00000.npz").exists(),
        lambda: _n_presentations(folder) >= 6,
        lambda: (folder / "stages" / "estimate.json").exists(),
    ]
    for condition in kill_points:
        _kill_when(_fit_day(resumed), condition)
    finish = _fit_day(resumed)
    assert finish.wait() == 0, finish.stderr.read().decode()[-2000:]

    a = zarr.open_group(str(reference / "day_000/store.zarr"), mode="r")
    b = zarr.open_group(str(folder / "store.zarr"), mode="r")
    for name in ("pixels", "parent", "site", "eps", "direction", "predicted", "code"):
        np.testing.assert_array_equal(a[f"stimuli/{name}"][:], b[f"stimuli/{name}"][:], err_msg=name)

    def presentations(root):
        ids = root["presentations/id"][:]
        assert len(np.unique(ids)) == len(ids), "a presentation was stored twice"
        rows = zip(ids, root["presentations/stimulus"][:], root["presentations/valid"][:], map(tuple, root["counts"][:]))
        return sorted((int(i), int(s), bool(v), c) for i, s, v, c in rows)

    assert presentations(a) == presentations(b)
    assert read_json(reference / "day_000/sensitivity.json") == read_json(folder / "sensitivity.json")
