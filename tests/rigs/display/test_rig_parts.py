"""The display rig's parts without a display: rig.toml, event outputs (serial for real through a
pseudo-terminal), frame counts, `rig check`'s timing verdict on flip times the test sets, and the
fixation monitor."""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from closedloop.data.event_codes import OFFSET, SESSION_START, VALID
from rigs.display.config import RigConfig, compute_pixels_per_degree, read_rig_config, write_default_rig_config
from rigs.display.events import EventOutputError, encode_code, open_event_output
from rigs.display.fixation import FixationMonitor, ScriptedGaze
from rigs.display.presenter import compute_frame_counts
from rigs.display.screen import compute_timing_problems

pytestmark = pytest.mark.timeout(60)


def test_rig_init_writes_every_key_documented_and_reads_back_the_defaults(tmp_path):
    path = write_default_rig_config(tmp_path)
    text = path.read_text()
    data = tomllib.loads(text)
    for section, model in RigConfig.model_fields.items():
        assert set(data[section]) == set(model.annotation.model_fields), section
        for key, field in model.annotation.model_fields.items():
            assert field.description.split()[0] in text, f"{section}.{key} is not documented"
    config = read_rig_config(path)
    assert config.events.output == "none" and config.fixation.source == "none" and config.screen.refresh_hz == 0
    assert config.agent.state_dir == str(tmp_path / "rig-state")
    with pytest.raises(FileExistsError, match="already exists"):
        write_default_rig_config(path)


@pytest.mark.parametrize("text, message", [
    ("[screen]\nrefresh = 60\n", r"unknown key 'screen.refresh'; allowed keys here are: screen, fullscreen, size_px"),
    ("[events]\noutput = \"usb\"\n", r"'events.output' = 'usb': Input should be 'none', 'serial', 'parallel', 'labjack' or 'nidaq'"),
    ("[screen]\nrefresh_hz = \"60\"\n", r"'screen.refresh_hz' = '60': Input should be a valid number"),
    ("[fixation]\nscripted_away = [[5, 3]]\n", r"'fixation.scripted_away' = \[\[5, 3\]\]: each range needs 0 <= first < stop"),
    ("[events]\nparallel_ports = [\"/dev/parport0\"]\n", r"need two ports \(low byte, high byte\), got 1"),
    ("[agent]\nheartbeat_s = 5.0\n", r"heartbeat_s \(5.0\) must be shorter than timeout_s \(5.0\)"),
])
def test_a_bad_rig_toml_is_refused_naming_key_and_value(tmp_path, text, message):
    (tmp_path / "rig.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_rig_config(tmp_path / "rig.toml")


def test_no_rig_toml_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="closedloop rig init rig.toml"):
        read_rig_config(tmp_path)


def test_pixels_per_degree_from_the_screen_geometry():
    # 57 cm away one degree spans 57 * pi / 180 = 0.995 cm (small angle); 1920 px over 53 cm = 36.2 px/cm
    assert compute_pixels_per_degree(1920, 53.0, 57.0) == pytest.approx(1920 / 53 * 57 * math.pi / 180, rel=1e-4)


def _flips(intervals_ms: list[float]) -> dict:
    intervals = np.array(intervals_ms)
    return {"jitter_ms": float(intervals.std()), "intervals_ms": intervals_ms}


def test_rig_check_judges_flips_as_the_presenter_does_on_frame_times_it_is_given():
    steady = [1000 / 60] * 29
    assert compute_timing_problems(_flips(steady), 60.0, max_jitter_ms=1.0, dropped_frame_factor=1.5) == []
    # one flip of 2 frame periods at 60 Hz: dropped at the default factor 1.5 (25 ms), not at 3 (50 ms)
    dropped = steady[:10] + [2000 / 60] + steady[11:]
    problems = compute_timing_problems(_flips(dropped), 60.0, max_jitter_ms=10.0, dropped_frame_factor=1.5)
    assert problems == ["1 of 29 flips were dropped frames (longer than [screen] dropped_frame_factor = 1.5 frames "
                        "at 60 Hz; longest 33.3 ms)"]
    assert compute_timing_problems(_flips(dropped), 60.0, max_jitter_ms=10.0, dropped_frame_factor=3.0) == []
    # the frame period is the counting rate's: a virtual display flipping every 1 ms, counted at a nominal 60 Hz,
    # drops no frame with a 20 ms flip (under a 1.5-frame period of 25 ms)
    fast = [1.0] * 20 + [20.0] + [1.0] * 8
    assert compute_timing_problems(_flips(fast), 60.0, max_jitter_ms=100.0, dropped_frame_factor=1.5) == []
    jittery = [10.0, 23.3] * 14 + [16.7]
    (problem,) = compute_timing_problems(_flips(jittery), 60.0, max_jitter_ms=1.0, dropped_frame_factor=1.5)
    assert problem.startswith("frame-interval jitter 6.534 ms") and "over [screen] max_jitter_ms = 1 ms" in problem


def test_frame_counts():
    assert compute_frame_counts(0.1, 0.1, 0.17, 60.0) == (6, 6, 11)
    assert compute_frame_counts(0.1, 0.1, 0.17, 120.0) == (12, 12, 21)
    assert compute_frame_counts(0.1, 0.1, 0.17, 59.94) == (6, 6, 11)  # 5.994 frames: within a tenth of a frame
    assert compute_frame_counts(1 / 60, 0.0, 0.5, 60.0) == (1, 0, 30)
    with pytest.raises(ValueError, match=r"\[rsvp\] on_s = 0\.1 s is 14\.40 frames at the rig's 144\.00 Hz, not whole: "
                       r"set on_s = 0\.0972 \(14 frames\) or 0\.1042 s \(15\) in experiment\.toml"):
        compute_frame_counts(0.1, 0.1, 0.17, 144.0)
    with pytest.raises(ValueError, match=r"\[rsvp\] off_s = 0\.05 s is 3\.75 frames at the rig's 75\.00 Hz"):
        compute_frame_counts(0.04, 0.05, 0.17, 75.0)
    with pytest.raises(ValueError, match=r"on_s = 0\.001 s is shorter than one frame at the rig's 60\.00 Hz"):
        compute_frame_counts(0.001, 0.0, 0.5, 60.0)


def test_every_rig_toml_key_is_in_rig_init_and_in_docs_rig_md(tmp_path):
    text = write_default_rig_config(tmp_path).read_text()
    docs = (Path(__file__).resolve().parents[3] / "docs" / "rig.md").read_text()
    table = docs[docs.index("## rig.toml"):docs.index("## Event codes")]
    for section, model in RigConfig.model_fields.items():
        assert f"[{section}]" in text and f"`[{section}]" in table, section
        for key in model.annotation.model_fields:
            assert re.search(rf"^{key} = ", text, flags=re.M), f"rig init does not write {section}.{key}"
            assert re.search(rf"`\[{section}\] [^|]*\b{key}\b", table), f"docs/rig.md does not document {section}.{key}"


def test_a_rig_toml_with_the_old_stimulus_section_is_refused(tmp_path):
    (tmp_path / "rig.toml").write_text("[stimulus]\non_s = 0.1\n")
    with pytest.raises(ValueError, match=r"\[stimulus\] is not a rig.toml section any more: the image size and the RSVP "
                       r"on/off times are the experiment's \[rsvp\]"):
        read_rig_config(tmp_path / "rig.toml")


def test_encode_code_byte_order():
    assert encode_code(0x1234) == b"\x12\x34" and encode_code(0x1234, "little") == b"\x34\x12"
    with pytest.raises(ValueError, match=r"'code' must lie in \[0, 65535\], but got 65536"):
        encode_code(65536)


def test_serial_codes_arrive_byte_for_byte_through_a_pseudo_terminal(tmp_path):
    master, slave = os.openpty()
    try:
        config = RigConfig.model_validate({"events": {"output": "serial", "serial_port": os.ttyname(slave)}})
        output = open_event_output(config.events)
        assert "serial" in output.description and "big-endian" in output.description
        codes = [SESSION_START, 1, 0x0A0D, OFFSET, VALID, 65279, 0]  # includes newline/return bytes: raw mode
        for code in codes:
            output.send(code)
        with pytest.raises(ValueError, match=r"'code' must lie in \[0, 65535\], but got 70000"):
            output.send(70000)
        output.close()
        received = b""
        while len(received) < 2 * len(codes):
            received += os.read(master, 64)
        assert received == b"".join(code.to_bytes(2, "big") for code in codes)
        assert output.n_sent == len(codes)
    finally:
        os.close(master)
        os.close(slave)


def test_a_missing_serial_port_is_a_clear_error(tmp_path):
    config = RigConfig.model_validate({"events": {"output": "serial", "serial_port": str(tmp_path / "ttyNONE")}})
    with pytest.raises(EventOutputError, match=r"\[events\] serial_port = '.*ttyNONE': cannot open it"):
        open_event_output(config.events)


@pytest.mark.parametrize("output, message", [
    ("parallel", r"\[events\] parallel_ports = \['/tmp/.*/none0', '/tmp/.*/none1'\]: cannot open them"),
    ("labjack", r"labjack-ljm|LJM library"),
    ("nidaq", r"nidaq|NI-DAQmx"),
])
def test_hardware_outputs_without_their_hardware_say_what_is_missing(tmp_path, output, message):
    config = RigConfig.model_validate({"events": {"output": output, "parallel_ports": [str(tmp_path / "none0"),
                                                                                        str(tmp_path / "none1")]}})
    with pytest.raises(EventOutputError, match=message):
        open_event_output(config.events)


def test_fixation_monitor_breaks_after_the_grace_frames_at_the_first_frame_away():
    centre, away = (0.0, 0.0), (3.0, 0.0)
    strict = FixationMonitor(window_deg=2.0, grace_frames=0)
    assert not strict.update(0, centre) and strict.update(1, away) and strict.break_frame == 1
    assert not strict.update(2, away), "a break is reported once"
    lenient = FixationMonitor(window_deg=2.0, grace_frames=2)
    samples = [centre, away, None, centre, away, away, away, centre]  # a 2-frame blink is tolerated, 3 frames are not
    breaks = [lenient.update(frame, gaze) for frame, gaze in enumerate(samples)]
    assert breaks == [False, False, False, False, False, False, True, False] and lenient.break_frame == 4


def test_scripted_gaze_is_away_during_its_frames():
    gaze = ScriptedGaze([(2, 4)])
    assert [gaze.read_gaze() for _ in range(5)] == [(0.0, 0.0), (0.0, 0.0), (10.0, 0.0), (10.0, 0.0), (0.0, 0.0)]
    assert "TEST" in gaze.description
