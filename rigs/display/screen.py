"""The stimulus window: a PsychoPy window, its geometry, its measured refresh, and the thread that owns it.

OpenGL belongs to the thread that made the window, so every drawing call runs there:
:meth:`Screen.call` runs a function on the window's thread (directly when already on it, else
through a queue, waiting for the result), and :meth:`Screen.serve` is that thread's loop, which
between calls keeps flipping the idle screen (grey, fixation spot, dark photodiode patch) once
per frame period so that the window stays responsive.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from rigs.display.config import RigConfig, compute_pixels_per_degree

__all__ = ["Screen", "measure_refresh", "compute_timing_problems"]


def measure_refresh(window, n_frames: int) -> dict:
    """Time ``n_frames`` flips of ``window``: ``refresh_hz`` (1 / median interval), ``jitter_ms``
    (standard deviation of the intervals), ``max_interval_ms``, ``intervals_ms`` (n_frames - 1,)."""
    times = np.empty(n_frames)
    for frame in range(n_frames):
        window.flip()
        times[frame] = time.perf_counter()
    intervals = np.diff(times)
    return {"refresh_hz": float(1.0 / np.median(intervals)), "jitter_ms": float(np.std(intervals) * 1e3),
            "max_interval_ms": float(intervals.max() * 1e3), "intervals_ms": (intervals * 1e3).round(3).tolist()}


def compute_timing_problems(measured: dict, refresh_hz: float, *, max_jitter_ms: float,
                            dropped_frame_factor: float) -> list[str]:
    """What ``rig check`` finds off in timed flips (``measured``: see :func:`measure_refresh`).

    The jitter (ms) over ``max_jitter_ms``, and flips later than ``dropped_frame_factor`` frame periods
    at ``refresh_hz`` (Hz, the rate frames are counted at) after the one before: dropped frames, judged
    as the presenter judges them during a session. Returns one message per problem (empty: none).
    """
    problems = []
    if measured["jitter_ms"] > max_jitter_ms:
        problems.append(f"frame-interval jitter {measured['jitter_ms']:.3f} ms is over [screen] max_jitter_ms "
                        f"= {max_jitter_ms:g} ms: close other programs, check that the display syncs "
                        "to the vertical blank")
    late = [i for i in measured["intervals_ms"] if i > dropped_frame_factor * 1e3 / refresh_hz]
    if late:
        problems.append(f"{len(late)} of {len(measured['intervals_ms'])} flips were dropped frames "
                        f"(longer than [screen] dropped_frame_factor = {dropped_frame_factor:g} frames at "
                        f"{refresh_hz:g} Hz; longest {max(late):.1f} ms)")
    return problems


class Screen:
    """The rig's window from rig.toml (``config``): opened on the calling thread, grey, measured.

    Attributes: ``window`` (psychopy.visual.Window, units pixels), ``size_px`` (width, height),
    ``pixels_per_degree``, ``measured`` (see :func:`measure_refresh`), ``refresh_hz`` (the
    nominal ``[screen] refresh_hz`` when set, else the measured rate: frames are counted at it),
    ``photodiode`` and ``spot`` (the patch and the fixation spot, or None).
    """

    def __init__(self, config: RigConfig) -> None:
        from psychopy import visual

        screen = config.screen
        grey = 2.0 * screen.background - 1.0
        self.window = visual.Window(
            size=list(screen.size_px), fullscr=screen.fullscreen, screen=screen.screen, units="pix",
            color=(grey, grey, grey), colorSpace="rgb", waitBlanking=True, allowGUI=not screen.fullscreen,
            checkTiming=False,
        )
        self.window.mouseVisible = False
        self.size_px = tuple(int(v) for v in self.window.size)
        self.pixels_per_degree = compute_pixels_per_degree(self.size_px[0], screen.width_cm, screen.distance_cm)
        self.measured = measure_refresh(self.window, screen.measure_frames)
        self.refresh_hz = screen.refresh_hz or self.measured["refresh_hz"]
        self.photodiode = self._make_photodiode(config) if config.photodiode.enabled else None
        spot_px = config.fixation.spot_size_deg * self.pixels_per_degree
        self.spot = visual.Circle(self.window, radius=spot_px / 2, edges=32, fillColor="red", lineColor=None,
                                  units="pix") if spot_px > 0 else None
        self._owner = threading.get_ident()
        self._jobs: queue.Queue = queue.Queue()

    def _make_photodiode(self, config: RigConfig):
        from psychopy import visual

        side = config.photodiode.size_px
        vertical, horizontal = config.photodiode.corner.split("-")
        x = (self.size_px[0] - side) / 2 * (1 if horizontal == "right" else -1)
        y = (self.size_px[1] - side) / 2 * (1 if vertical == "top" else -1)
        return visual.Rect(self.window, width=side, height=side, pos=(x, y), fillColor="black", lineColor=None,
                           units="pix")

    def draw_overlay(self, light: bool) -> None:
        """Draw the photodiode patch (white when ``light``) and the fixation spot over the frame."""
        if self.photodiode is not None:
            self.photodiode.fillColor = "white" if light else "black"
            self.photodiode.draw()
        if self.spot is not None:
            self.spot.draw()

    def call(self, function, *args):
        """Run ``function(*args)`` on the window's thread and return its result (or raise its error)."""
        if threading.get_ident() == self._owner:
            return function(*args)
        done: Future = Future()
        self._jobs.put((function, args, done))
        return done.result()

    def serve(self, stop: threading.Event) -> None:
        """The window thread's loop until ``stop`` is set: run calls, else flip the idle screen each frame period."""
        period = 1.0 / self.refresh_hz
        while not stop.is_set():
            try:
                function, args, done = self._jobs.get(timeout=period)
            except queue.Empty:
                self.draw_overlay(light=False)
                self.window.flip()
                continue
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(function(*args))
                except BaseException as error:  # noqa: B036 (handed to the waiting thread, which raises it)
                    done.set_exception(error)
        while not self._jobs.empty():  # nobody will run them: let the waiting threads go
            _, _, done = self._jobs.get_nowait()
            done.set_exception(RuntimeError("the display stopped"))

    def close(self) -> None:
        """Close the window."""
        self.window.close()
