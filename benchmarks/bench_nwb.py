"""Benchmark (not a test): size and time of `closedloop export-nwb` on a paper-size day.

Builds, in a temporary folder that is deleted afterwards, a finished synthetic day the size of
the published run (Guo et al.): 21 sites, 42 clean images, 42 × 21 sites × 4 budgets attacks
and 42 × 5 budgets × 2 baselines (3990 stimuli, each shown twice: 7980 presentations, 0.2 s
apart), written with ``analysis.synthetic.write_synthetic_day`` (the real store writer); the
perturbed frames are the parent plus seeded pixel noise (incompressible, like real
perturbations). It adds a Blackrock ``recording.nev`` (the 21 electrodes at ~50 Hz Poisson over
the session, an onset word per presentation), ``provenance.json``, a 1 MB stand-in for
``model.safetensors`` and every stage marker. Then it times the export in a fresh process and
prints one JSON line (seconds, peak memory, sizes), and with ``--inspect`` the NWB Inspector's
time and messages.

    PYTHONPATH=. python benchmarks/bench_nwb.py --inspect
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_SITES, N_CLEAN, BUDGETS, ATTACK_BUDGETS = 21, 42, (1.0, 2.0, 4.0, 6.0, 10.0), (1.0, 2.0, 4.0, 10.0)
SOA_S, RATE_HZ, REPETITIONS = 0.2, 50.0, 2
NWB = {'subject_id = ""': 'subject_id = "monkeyB"', 'sex = ""': 'sex = "M"', 'age = ""': 'age = "P7Y"',
       "experimenter = []": 'experimenter = ["Doe, Jane"]', 'institution = ""': 'institution = "Example University"',
       'lab = ""': 'lab = "Example Lab"'}  # filled into the [nwb] section of experiment.toml

_EXPORT = """
import json, sys, time
started = time.perf_counter()
from closedloop.data.nwb import write_day_nwb
summary = write_day_nwb(sys.argv[1], 0, sys.argv[2])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
print(json.dumps(summary | {"process_seconds": round(time.perf_counter() - started, 1), "peak_mb": round(peak)}))
"""


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _write_day(experiment: Path, seed: int = 0) -> dict:
    from analysis.synthetic import make_synthetic_images, write_synthetic_day
    from closedloop.core.files import write_json
    from closedloop.core.provenance import compute_provenance
    from closedloop.data import layout
    from closedloop.data.recording import Recording
    from rigs.nev import write_nev

    rng = np.random.default_rng(seed)
    parent, site, eps, direction, kind = [], [], [], [], []
    for image in range(N_CLEAN):
        for target in range(N_SITES):
            for budget in ATTACK_BUDGETS:
                parent.append(image), site.append(target), eps.append(budget), direction.append(rng.choice([-1, 1]))
                kind.append("attack")
        for budget in BUDGETS:
            for baseline in ("gaussian", "interpolation"):
                parent.append(image), site.append(-1), eps.append(budget), direction.append(0), kind.append(baseline)
    parent = np.array(parent)
    clean_pixels = make_synthetic_images(N_CLEAN, seed=seed)
    noise = [np.clip(clean_pixels[parent[i: i + 256]].astype(np.int16)
                     + rng.integers(-3, 4, size=(len(parent[i: i + 256]), 224, 224, 3)), 0, 255).astype(np.uint8)
             for i in range(0, len(parent), 256)]
    pixels = np.concatenate([clean_pixels, *noise])
    clean = rng.uniform(2, 20, (N_CLEAN, N_SITES))
    folder = write_synthetic_day(
        experiment, 0, clean=clean, category=np.array([f"c{i % 9}" for i in range(N_CLEAN)]), parent=parent,
        site=np.array(site), eps=np.array(eps), direction=np.array(direction), kind=np.array(kind),
        perturbed=clean[parent] * rng.uniform(0.7, 1.3, (len(parent), N_SITES)), pixels=pixels,
        repetitions=REPETITIONS, seed=seed,
    )
    text = (experiment / "experiment.toml").read_text()
    for empty, value in NWB.items():
        text = text.replace(empty, value)
    (experiment / "experiment.toml").write_text(text)
    n_stimuli = len(pixels)
    n_presentations = n_stimuli * REPETITIONS
    # the recording: onsets at the store's presentation times, Poisson spikes on electrodes 1..21
    from closedloop.data.store import open_store

    log = open_store(folder / layout.STORE).read_presentations()
    onset_ticks = np.rint(log["onset"] * 30000).astype(np.int64)
    duration = int(onset_ticks[-1]) + 30000
    n_spikes = rng.poisson(RATE_HZ * duration / 30000, N_SITES)
    spike_ticks = np.concatenate([rng.integers(0, duration, n) for n in n_spikes])
    electrodes = np.repeat(np.arange(1, N_SITES + 1), n_spikes)
    order = np.argsort(spike_ticks, kind="stable")
    events = np.stack([onset_ticks, onset_ticks + 300], axis=1).ravel()
    words = np.stack([log["stimulus"] + 1, np.zeros_like(onset_ticks)], axis=1).ravel()
    recording = Recording.from_ticks(spike_ticks[order], electrodes[order], np.zeros(len(order), np.int64), events,
                                     words, tuple(range(1, N_SITES + 1)))
    write_nev(folder / layout.RECORDING, recording)
    write_json(folder / layout.PROVENANCE, compute_provenance(seeds={"experiment": seed}))
    (folder / layout.MODEL).write_bytes(rng.bytes(1 << 20))
    for stage in layout.STAGES:
        if not layout.marker_path(folder, stage).exists():
            write_json(layout.marker_path(folder, stage), {"stage": stage, "seconds": 0.0, "summary": {}})
    return {"n_sites": N_SITES, "n_stimuli": n_stimuli, "n_presentations": n_presentations,
            "n_spikes": int(n_spikes.sum()), "store_mb": round(_folder_mb(folder / layout.STORE), 1),
            "nev_mb": round((folder / layout.RECORDING).stat().st_size / 1e6, 1),
            "raw_pixels_mb": round(pixels.nbytes / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inspect", action="store_true", help="Also run the NWB Inspector on the file.")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_nwb_") as temporary:
        experiment = Path(temporary) / "paper"
        started = time.perf_counter()
        day = _write_day(experiment)
        print(json.dumps({"built_day": day, "seconds": round(time.perf_counter() - started, 1)}), flush=True)
        out = Path(temporary) / "paper_day_000.nwb"
        result = subprocess.run([sys.executable, "-c", _EXPORT, str(experiment), str(out)], stdout=subprocess.PIPE, text=True,
                                check=True)
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        summary["nwb_mb"] = round(summary["bytes"] / 1e6, 1)
        print(json.dumps(summary), flush=True)
        if arguments.inspect:
            from nwbinspector import inspect_nwbfile

            started = time.perf_counter()
            messages = [(m.importance.name, m.check_function_name, m.object_name) for m in inspect_nwbfile(nwbfile_path=out)]
            print(json.dumps({"inspector_seconds": round(time.perf_counter() - started, 1), "messages": messages}))


if __name__ == "__main__":
    main()
