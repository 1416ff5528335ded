"""The display rig for real under a virtual X server (Xvfb + Mesa software OpenGL).

`closedloop rig init` / `rig check` as a user runs them, and a small session streamed from the
control side's link client and RSVP queue to `closedloop rig serve` with the PsychoPy presenter:
event codes on a serial line read back through a pseudo-terminal (the test plays the NSP and
timestamps each code as it arrives), fixation from the scripted TEST gaze source with breaks at
known frames (re-queued until every stimulus has its valid repetitions), and the session's .nev
written from the read-back codes and simulated spikes, then ingested and reconciled with the log.

Xvfb has no vertical blank, so flips return as fast as the CPU draws: the rig counts frames at
a nominal 60 Hz ([screen] refresh_hz), frame counts are asserted, flip intervals only reported.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from closedloop.data.bundle import make_event_codes, write_bundle
from closedloop.data.event_codes import FIXATION_BREAK, OFFSET, SESSION_END, SESSION_START, VALID, is_stimulus_code
from closedloop.data.reconcile import write_day_counts
from closedloop.data.recording import Recording
from closedloop.data.store import create_store
from closedloop.link.client import RigClient
from closedloop.link.keys import make_keys
from closedloop.link.presentations import run_presentations
from rigs.display.config import write_default_rig_config
from rigs.nev import write_nev

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[3]
N_FRAMES = 12  # per presentation at the nominal 60 Hz: 6 on + 6 off (the 0.17 s window ends at frame 11)


@pytest.fixture(scope="module")
def display():
    """A private Xvfb display (640 x 480, 24 bit); its DISPLAY value."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (`make test` installs it: apt-get install xvfb xauth libgl1-mesa-dri libglu1-mesa)")
    for number in range(100 + os.getpid() % 300, 1000):  # the first display number nobody holds
        if not Path(f"/tmp/.X{number}-lock").exists() and not Path(f"/tmp/.X11-unix/X{number}").exists():
            break
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        assert server.poll() is None, f"Xvfb :{number} did not start: {server.stderr.read().decode()[-500:]}"
        assert time.monotonic() < deadline, f"Xvfb :{number} did not start within 30 s"
        time.sleep(0.05)
    yield f":{number}"
    server.terminate()
    server.wait(10)


def _closedloop(*args: str, display: str, **options) -> subprocess.Popen:
    env = {**os.environ, "DISPLAY": display, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", "from closedloop.cli import main; main()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **options)


def _virtual_screen(**screen) -> dict:
    """[screen] for Xvfb: nominal 60 Hz, and timing limits a display without vertical blank can meet."""
    return {"refresh_hz": 60.0, "measure_frames": 30, "max_jitter_ms": 100.0, "dropped_frame_factor": 20.0, **screen}


def test_rig_init_then_rig_check_prints_the_refresh_rate_and_fails_when_off(tmp_path, display):
    path = tmp_path / "rig.toml"
    init = _closedloop("rig", "init", str(path), display=display)
    assert init.wait(60) == 0 and path.is_file()
    text = path.read_text()
    for key, value in _virtual_screen().items():  # a virtual display cannot meet a real monitor's timing
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    path.write_text(text)
    check = _closedloop("rig", "check", "--config", str(path), display=display)
    output, _ = check.communicate(timeout=120)
    assert check.returncode == 0, output
    assert re.search(r"measured_refresh_hz: \d+\.\d+", output) and "rig check passed" in output
    assert "codes_sent: [1, 2, 4, 8" in output and "none (no event codes are sent)" in output
    path.write_text(re.sub(r"^max_jitter_ms = .*$", "max_jitter_ms = 0.000001", text, flags=re.M))
    failing = _closedloop("rig", "check", "--config", str(path), "--json", display=display)
    output, _ = failing.communicate(timeout=120)
    assert failing.returncode == 1, output
    report = json.loads(output[output.index("{"):])
    assert any("frame-interval jitter" in problem for problem in report["problems"])
    print(f"\nXvfb rig check: measured {report['measured_refresh_hz']} Hz, jitter {report['jitter_ms']} ms, "
          f"longest flip {report['max_interval_ms']} ms")


class _NSP:
    """Plays the NSP's digital input: reads 2-byte big-endian codes from the pty, stamps each on arrival."""

    def __init__(self, master: int) -> None:
        self.master, self.words, self.buffer = master, [], b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            if select.select([self.master], [], [], 0.05)[0]:
                now = time.monotonic()
                self.buffer += os.read(self.master, 4096)
                while len(self.buffer) >= 2:
                    self.words.append((now, int.from_bytes(self.buffer[:2], "big")))
                    self.buffer = self.buffer[2:]

    def close(self) -> None:
        time.sleep(0.2)
        self.stop.set()
        self.thread.join(5)


def _serve(config: Path, display: str) -> tuple[subprocess.Popen, str, list[str]]:
    rig = _closedloop("rig", "serve", "--config", str(config), display=display)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(rig.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any(line.strip() == "serving" for line in lines):
        assert rig.poll() is None and time.monotonic() < deadline, "rig serve did not start:\n" + "".join(lines)
        time.sleep(0.1)
    address = next(line.split(": ", 1)[1].strip() for line in lines if line.strip().startswith("address:"))
    return rig, address, lines


def _simulated_recording(words, t0: float, rng) -> tuple[Recording, dict]:
    """The NSP's recording: the read-back codes at their arrival times (clock zero at ``t0``) and Poisson
    spikes on electrodes 1 and 2: 10 Hz baseline, 50 + 20 x code Hz from 70 to 170 ms after each onset."""
    times = np.array([t - t0 for t, _ in words])
    codes = np.array([c for _, c in words], dtype=np.uint16)
    onsets = np.flatnonzero(is_stimulus_code(codes))
    end = times[-1] + 1.0
    spikes, electrodes = [rng.uniform(0, end, rng.poisson(10 * end * 2))], []
    electrodes.append(rng.integers(1, 3, len(spikes[0])))
    for index in onsets:
        for electrode in (1, 2):
            n = rng.poisson((50 + 20 * int(codes[index]) * electrode) * 0.1)
            spikes.append(times[index] + rng.uniform(0.07, 0.17, n))
            electrodes.append(np.full(n, electrode))
    spike_times, spike_electrodes = np.concatenate(spikes), np.concatenate(electrodes)
    recording = Recording(spike_times, spike_electrodes, np.ones(len(spike_times), dtype=np.int64), times, codes, (1, 2))
    return recording, {"spike_times": spike_times, "spike_electrodes": spike_electrodes}


def test_a_session_streamed_to_rig_serve_with_the_psychopy_presenter(tmp_path, display):
    keys = tmp_path / "keys"
    make_keys(keys)
    master, slave = os.openpty()
    away = [(2 * N_FRAMES + 3, 2 * N_FRAMES + 5),   # presentation 2: gaze away in frames 3-4 -> fixation break
            (5 * N_FRAMES + 9, 5 * N_FRAMES + 10),  # presentation 5: frame 9 is inside the window -> break
            (7 * N_FRAMES + 11, 7 * N_FRAMES + 12)]  # presentation 7: frame 11 is after the window -> still valid
    config = write_default_rig_config(tmp_path / "rig.toml", changes={
        "agent": {"address": "tcp://127.0.0.1:*", "keys_dir": str(keys), "heartbeat_s": 0.2},
        "screen": _virtual_screen(),
        "events": {"output": "serial", "serial_port": os.ttyname(slave)},
        "fixation": {"source": "scripted", "scripted_away": away},
    })
    nsp = _NSP(master)
    rig, address, lines = _serve(config, display)
    stimulus_ids, repetitions = [10, 11, 12, 13], 2
    pixels = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    codes = make_event_codes(4)
    write_bundle(tmp_path / "stimuli.h5", pixels, stimulus_ids, codes)
    outcomes = []
    try:
        client = RigClient(address, keys_dir=keys, heartbeat_s=0.2, timeout_s=10.0, reconnect_s=30.0)
        assert client.connect()["sites"] == [], "a display rig knows no spike counts"
        client.load_bundle(tmp_path / "stimuli.h5")
        summary = run_presentations(client, stimulus_ids, repetitions=repetitions, seed=0, on_result=outcomes.append,
                                    n_ahead=4)
        client.stop()
        client.close()
    finally:
        rig.terminate()
        rig_output = rig.communicate(timeout=60)[0] if rig.poll() is None else ""
        nsp.close()
        os.close(master)
        os.close(slave)
    assert rig.returncode == 0, "".join(lines) + rig_output
    assert any("fixation: scripted TEST source" in line for line in lines)

    journal = [json.loads(line) for line in (tmp_path / "rig-state" / "stream.jsonl").open()]
    assert [o["presentation_id"] for o in outcomes] == [o["presentation_id"] for o in journal]
    reasons = [o["record"]["reason"] for o in journal]
    # frame counts are exact; a flip that took longer than 20 nominal frames (333 ms) would be a dropped frame
    assert all((o["record"]["n_on_frames"], o["record"]["n_off_frames"], o["record"]["n_frames"]) == (6, 6, N_FRAMES)
               for o in journal)
    assert [o["record"]["break_frame"] for o in journal[:8]] == [None, None, 3, None, None, 9, None, None]
    assert reasons[2] in ("fixation_break", "dropped_frame") and reasons[5] in ("fixation_break", "dropped_frame")
    assert all(reason in ("valid", "dropped_frame") for i, reason in enumerate(reasons) if i not in (2, 5))
    valid = {sid: sum(o["valid"] and o["stimulus_id"] == sid for o in outcomes) for sid in stimulus_ids}
    assert all(n >= repetitions for n in valid.values()), valid
    assert summary["n_fixation_breaks"] == sum(not o["valid"] for o in outcomes) >= 2
    assert [o["valid"] for o in outcomes] == [r == "valid" for r in reasons]

    # every code read back, in order: session start, then per presentation its code, outcome and offset
    received = [code for _, code in nsp.words]
    code_of = dict(zip(stimulus_ids, codes.tolist()))
    expected = [SESSION_START]
    for entry in journal:
        outcome = {"valid": VALID, "fixation_break": FIXATION_BREAK}.get(entry["record"]["reason"], 0xFF03)
        assert entry["record"]["codes_sent"][0] == code_of[entry["stimulus_id"]]
        assert set(entry["record"]["codes_sent"]) == {code_of[entry["stimulus_id"]], OFFSET, outcome}
        expected += entry["record"]["codes_sent"]
    assert received == [*expected, SESSION_END]
    intervals = np.concatenate([o["record"]["frame_intervals_ms"] for o in journal])
    onset_to_offset = [o["record"]["offset_s"] - o["record"]["onset_s"] for o in journal]
    latency = [t - o["onset_s"] for o, (t, c) in zip(journal, (w for w in nsp.words if is_stimulus_code(w[1])))]
    print(f"\n{len(journal)} presentations, {sum(reasons[i] == 'valid' for i in range(len(reasons)))} valid; Xvfb flip "
          f"intervals median {np.median(intervals):.2f} ms (p95 {np.percentile(intervals, 95):.2f}, max "
          f"{intervals.max():.2f}); onset-to-offset median {1e3 * np.median(onset_to_offset):.1f} ms for 6 frames; "
          f"code arrival after the onset flip median {1e3 * np.median(latency):.2f} ms, max {1e3 * max(latency):.2f} ms")

    # the day's .nev from the read-back codes + simulated spikes, ingested and reconciled with the log
    t0 = nsp.words[0][0] - 1.0  # the NSP clock started 1 s before the session (same machine: same monotonic clock)
    recording, spikes = _simulated_recording(nsp.words, t0, np.random.default_rng(1))
    write_nev(tmp_path / "recording.nev", recording)
    store = create_store(tmp_path / "store.zarr", sites=2)
    store.append_stimuli(pixels, parent=[-1] * 4, site=[-1] * 4, eps=[0.0] * 4, direction=[0] * 4, kind=["clean"] * 4,
                         predicted=np.zeros((4, 2)), code=codes)
    index = {sid: i for i, sid in enumerate(stimulus_ids)}
    store.append_presentations([o["presentation_id"] for o in outcomes], [index[o["stimulus_id"]] for o in outcomes],
                               [o["onset_s"] - t0 for o in outcomes], [o["valid"] for o in outcomes],
                               np.zeros((len(outcomes), 2), dtype=np.uint16))
    report = write_day_counts(tmp_path / "recording.nev", tmp_path / "store.zarr", tolerance_s=0.05)
    assert report["written"] and report["n_mismatches"] == 0, report["mismatches"][:3]
    assert report["n_onsets"] == report["n_matched"] == len(outcomes)
    counts, matched = store.read_counts()
    counts = counts.astype(np.int64)
    onsets = np.array([t - t0 for t, c in nsp.words if is_stimulus_code(c)])
    for row, onset in enumerate(onsets):  # recount independently from the simulated spikes
        inside = (spikes["spike_times"] >= onset + 0.07) & (spikes["spike_times"] < onset + 0.17)
        expected_counts = np.bincount(spikes["spike_electrodes"][inside] - 1, minlength=2)
        assert abs(counts[row] - expected_counts).max() <= 1, (row, counts[row], expected_counts)  # tick rounding at edges
    assert matched.all()
