"""The display computer's two programs: ``closedloop rig serve`` and ``closedloop rig check``.

:func:`run_rig_serve` opens the window on the calling (main) thread, the event output and the
gaze source, and serves a :class:`rigs.agent.RigAgent` with the
:class:`~rigs.display.presenter.PsychoPyPresenter` until stopped; the window's thread runs the
display while the agent's threads hand it work. :func:`run_rig_check` is the self-test without a
control PC: the measured refresh rate and frame-time jitter, a walking-bit test pattern of event
codes (1, 2, 4, …, 32768, one per flip), and a fixation readout; it lists what is off.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from contextlib import ExitStack

from closedloop.core.logs import logger
from rigs.agent import RigAgent
from rigs.display.config import RigConfig
from rigs.display.events import open_event_output
from rigs.display.fixation import open_gaze_source
from rigs.display.presenter import PsychoPyPresenter
from rigs.display.screen import Screen, compute_timing_problems

__all__ = ["run_rig_serve", "run_rig_check", "compute_rig_summary", "TEST_PATTERN"]

TEST_PATTERN = tuple(1 << bit for bit in range(16))


def compute_rig_summary(config: RigConfig, screen: Screen, events, gaze) -> dict:
    """What the rig is about to use: screen, refresh (measured and counted), geometry, outputs; JSON-ready."""
    return {
        "screen": config.screen.screen, "size_px": list(screen.size_px), "fullscreen": config.screen.fullscreen,
        "measured_refresh_hz": round(screen.measured["refresh_hz"], 3),
        "jitter_ms": round(screen.measured["jitter_ms"], 4),
        "max_interval_ms": round(screen.measured["max_interval_ms"], 3),
        "frames_counted_at_hz": round(screen.refresh_hz, 3),
        "refresh": "nominal (rig.toml)" if config.screen.refresh_hz else "measured",
        "pixels_per_degree": round(screen.pixels_per_degree, 3),
        "event_output": events.description, "fixation": gaze.description,
    }


def _open(config: RigConfig, stack: ExitStack) -> tuple[Screen, object, object]:
    screen = Screen(config)
    stack.callback(screen.close)
    events = open_event_output(config.events)
    stack.callback(events.close)
    gaze = open_gaze_source(config.fixation, screen.window, screen.pixels_per_degree)
    stack.callback(gaze.close)
    return screen, events, gaze


def run_rig_check(config: RigConfig) -> dict:
    """The self-test: returns the summary plus ``codes_sent``, ``fixation`` (samples, inside fraction,
    last gaze) and ``problems`` (empty when everything is in order)."""
    with ExitStack() as stack:
        screen, events, gaze = _open(config, stack)
        report = compute_rig_summary(config, screen, events, gaze)
        problems = compute_timing_problems(screen.measured, screen.refresh_hz, max_jitter_ms=config.screen.max_jitter_ms,
                                           dropped_frame_factor=config.screen.dropped_frame_factor)
        for code in TEST_PATTERN:
            screen.window.callOnFlip(events.send, code)
            screen.draw_overlay(light=True)
            screen.window.flip()
        report["codes_sent"] = list(TEST_PATTERN)
        samples = []
        for _ in range(config.screen.measure_frames):
            screen.draw_overlay(light=False)
            screen.window.flip()
            samples.append(gaze.read_gaze())
        present = [s for s in samples if s is not None]
        report["fixation"] = {
            "n_samples": len(samples), "n_missing": len(samples) - len(present),
            "inside_fraction": round(sum(math.hypot(*s) <= config.fixation.window_deg for s in present)
                                     / len(samples), 4),
            "last_gaze_deg": [round(v, 3) for v in present[-1]] if present else None,
        }
        if not present:
            problems.append(f"the fixation source ({gaze.description}) gave no gaze sample in "
                            f"{len(samples)} frames: is the tracker connected and calibrated?")
        nominal = config.screen.refresh_hz
        if nominal and abs(nominal - screen.measured["refresh_hz"]) > 0.05 * nominal:
            logger.warning("[screen] refresh_hz = %g differs from the measured %.2f Hz: frames are counted at the nominal "
                           "rate (right for a virtual display only)", config.screen.refresh_hz, screen.measured["refresh_hz"])
        report["problems"] = problems
        return report


def run_rig_serve(config: RigConfig, stop: threading.Event, *, on_ready: Callable[[dict], None] | None = None) -> None:
    """Serve the display rig until ``stop`` is set (run on the main thread: it owns the window).

    ``on_ready(summary)`` is called once the agent listens (``summary``: :func:`compute_rig_summary`
    plus ``address``, ``security``, ``state_dir``). Raises :class:`rigs.agent.RigAgentError` when a
    thread of the agent died.
    """
    with ExitStack() as stack:
        screen, events, gaze = _open(config, stack)
        summary = compute_rig_summary(config, screen, events, gaze)
        agent_config = config.agent
        agent = RigAgent(PsychoPyPresenter(config, screen, events, gaze), address=agent_config.address,
                         state_dir=agent_config.state_dir, rig_id=agent_config.rig_id, security=agent_config.security,
                         keys_dir=agent_config.keys_dir, heartbeat_s=agent_config.heartbeat_s,
                         timeout_s=agent_config.timeout_s).start()
        display_done, failure = threading.Event(), []

        def watch() -> None:  # the agent's threads need the display until they have ended
            try:
                while not stop.wait(0.1):
                    agent.check()
            except Exception as error:  # noqa: BLE001 (re-raised on the main thread below)
                failure.append(error)
            finally:
                agent.close()
                display_done.set()

        watcher = threading.Thread(target=watch, name="display-rig-watch", daemon=True)
        watcher.start()
        if on_ready:
            on_ready({**summary, "address": agent.address, "security": agent_config.security,
                      "state_dir": agent_config.state_dir})
        while not display_done.is_set():
            try:
                screen.serve(display_done)
            except KeyboardInterrupt:  # stop, but keep the display serving until the agent has closed
                stop.set()
        watcher.join(60)
        if failure:
            raise failure[0]
