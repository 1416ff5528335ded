"""Fixation: gaze sources behind one interface, and the per-presentation fixation monitor.

A gaze source (``[fixation] source`` in rig.toml) has ``read_gaze() -> (x_deg, y_deg) | None``
(degrees from the screen centre, x right, y up; None = no sample: blink, track lost),
``close()`` and ``description``. Sources:

- ``none``: always at the centre, so every presentation is valid (anaesthetised or passive
  viewing);
- ``iohub``: PsychoPy ioHub's common eye-tracker interface (``eyelink``, ``tobii``,
  ``gazepoint``, or ``mouse``: ioHub's simulated tracker whose gaze is the mouse pointer); ioHub
  runs its own server process and reports gaze in pixels from the centre of the screen
  (so use a full-screen window);
- ``scripted``: a TEST source, not an eye tracker: gaze at the centre except during listed
  presentation frames (read once per presentation frame, counted from 0), so a test can place
  fixation breaks exactly.

:class:`FixationMonitor` turns one presentation's per-frame samples into held or broken: out of
the window (or no sample) for longer than the grace period breaks fixation, recorded at the
frame where the excursion began.
"""

from __future__ import annotations

import math

__all__ = ["GazeSource", "ScriptedGaze", "IoHubGaze", "FixationMonitor", "open_gaze_source"]

_IOHUB_TRACKERS = {
    "mouse": "eyetracker.hw.mouse.EyeTracker",
    "eyelink": "eyetracker.hw.sr_research.eyelink.EyeTracker",
    "tobii": "eyetracker.hw.tobii.EyeTracker",
    "gazepoint": "eyetracker.hw.gazepoint.gp3.EyeTracker",
}


class GazeSource:
    """The ``none`` source and the base of every other: gaze always at the centre."""

    description = "none (every presentation valid)"

    def read_gaze(self) -> tuple[float, float] | None:
        """The latest gaze position, degrees from the screen centre (x right, y up); None without a sample."""
        return (0.0, 0.0)

    def close(self) -> None:
        """Stop the source."""


class ScriptedGaze(GazeSource):
    """A TEST gaze source: away (10° right) during the ``away`` frame ranges [first, stop), else at the centre.

    Frames are the calls of :meth:`read_gaze`, one per presentation frame, counted from 0.
    """

    def __init__(self, away: list[tuple[int, int]]) -> None:
        self.away = [tuple(r) for r in away]
        self.n_read = 0
        self.description = f"scripted TEST source (gaze away during frames {self.away})"

    def read_gaze(self) -> tuple[float, float] | None:
        frame, self.n_read = self.n_read, self.n_read + 1
        return (10.0, 0.0) if any(first <= frame < stop for first, stop in self.away) else (0.0, 0.0)


class IoHubGaze(GazeSource):
    """Gaze from an eye tracker through PsychoPy ioHub (``tracker``: mouse, eyelink, tobii, gazepoint).

    ``window``: the PsychoPy window (ioHub takes the display geometry from it); ``pixels_per_degree``
    converts ioHub's pixel gaze to degrees; ``settings``: extra ioHub settings for the tracker.
    Starts ioHub's server process and the tracker's recording.
    """

    def __init__(self, window, tracker: str, pixels_per_degree: float, settings: dict | None = None) -> None:
        from psychopy.iohub import launchHubServer

        if tracker not in _IOHUB_TRACKERS:
            raise ValueError(f"'tracker' must be one of {', '.join(_IOHUB_TRACKERS)}, but got {tracker!r}")
        options = {"name": "tracker", **(settings or {})}
        if tracker == "mouse":  # gaze follows the pointer continuously; a held button is a blink
            options.setdefault("controls", {"move": [], "blink": ["LEFT_BUTTON", "RIGHT_BUTTON"],
                                            "saccade_threshold": 0.5})
        try:
            self._io = launchHubServer(window=window, **{_IOHUB_TRACKERS[tracker]: options})
        except Exception as error:
            raise RuntimeError(f"[fixation] tracker = {tracker!r}: ioHub could not start it: "
                               f"{type(error).__name__}: {error}") from error
        self._tracker = self._io.getDevice("tracker")
        if self._tracker is None:
            self._io.quit()
            raise RuntimeError(f"[fixation] tracker = {tracker!r}: ioHub started without the tracker; "
                               "is its plugin installed (e.g. psychopy-eyetracker-sr-research)?")
        self._tracker.setRecordingState(True)
        self._pixels_per_degree = pixels_per_degree
        self.description = f"ioHub {tracker} tracker ({_IOHUB_TRACKERS[tracker]})"

    def read_gaze(self) -> tuple[float, float] | None:
        position = self._tracker.getLastGazePosition()
        if not isinstance(position, (list, tuple)) or len(position) < 2 or position[0] is None:
            return None
        return (position[0] / self._pixels_per_degree, position[1] / self._pixels_per_degree)

    def close(self) -> None:
        self._tracker.setRecordingState(False)
        self._io.quit()


class FixationMonitor:
    """Fixation over one presentation, one sample per frame.

    ``window_deg``: radius of the fixation window, degrees; ``grace_frames``: frames out of the
    window (or without a sample) tolerated in a row. :meth:`update` takes the frame index (from
    onset) and the gaze sample; ``break_frame`` is the first frame of the excursion that broke
    fixation (None while held).
    """

    def __init__(self, window_deg: float, grace_frames: int) -> None:
        self.window_deg, self.grace_frames = window_deg, grace_frames
        self.break_frame: int | None = None
        self._away_since: int | None = None

    def update(self, frame: int, gaze: tuple[float, float] | None) -> bool:
        """Add the sample of ``frame``; True when this sample breaks fixation (once per presentation)."""
        inside = gaze is not None and math.hypot(gaze[0], gaze[1]) <= self.window_deg
        if inside:
            self._away_since = None
            return False
        if self._away_since is None:
            self._away_since = frame
        if self.break_frame is None and frame - self._away_since + 1 > self.grace_frames:
            self.break_frame = self._away_since
            return True
        return False


def open_gaze_source(fixation, window, pixels_per_degree: float) -> GazeSource:
    """The gaze source that rig.toml's ``[fixation]`` section (``fixation``) asks for, started."""
    if fixation.source == "iohub":
        return IoHubGaze(window, fixation.tracker, pixels_per_degree, fixation.tracker_settings)
    if fixation.source == "scripted":
        return ScriptedGaze(fixation.scripted_away)
    return GazeSource()
