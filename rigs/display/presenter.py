"""The PsychoPy presenter: frame-locked RSVP with event codes, a photodiode patch and fixation control.

Plugs into :class:`rigs.agent.RigAgent` (see its docstring for the presenter interface).
What is shown is the experiment's: ``set_rsvp`` takes the ``[rsvp]`` on/off times and image size
that the control PC sends at hello, and refuses (the hello is answered with the reason) times that
are not a whole number of frames at the rate frames are counted at (within
:data:`FRAME_TOLERANCE` of a frame), or a hello without them.
``load_bundle`` makes a texture of every image before the session starts (no loading during
RSVP). ``present`` shows one stimulus for ``n_on = round(on_s × refresh)`` frames and grey for
``n_off = round(off_s × refresh)`` frames, counting flips, never sleeping; if the response window
(``n_window = ceil(window stop × refresh)`` frames from onset) outlasts on + off, grey frames
continue until it ends. Per presentation:

- the stimulus's event code goes out via ``win.callOnFlip`` on the onset flip, ``OFFSET`` on the
  flip that removes it (:mod:`closedloop.data.event_codes`), and one outcome code when the
  outcome is known: ``FIXATION_BREAK`` or ``DROPPED_FRAME`` at once, ``VALID`` right after the
  flip that ends the response window;
- the photodiode patch is white on the stimulus frames;
- a flip later than ``dropped_frame_factor`` frame periods after the one before is a dropped
  frame: the presentation is invalid;
- fixation must be held (:class:`~rigs.display.fixation.FixationMonitor`) from onset to the end
  of the response window.

Times are ``time.monotonic()`` seconds (the system-wide monotonic clock) taken as soon as the
code has been written, right after the flip: ``onset_s`` of the outcome is the onset flip, as the
NSP stamps its code (taken after the write, so that a thread switch between stamp and write on a
busy computer cannot set the two apart). A display rig does not
know spike counts: it has no sites and its outcomes carry no counts (the NSP's ``.nev`` has them).
``SESSION_START`` is sent when a new session's bundle is loaded and ``SESSION_END`` at ``finish``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from closedloop.core.logs import logger
from closedloop.data.bundle import read_bundle
from closedloop.data.event_codes import DROPPED_FRAME, FIXATION_BREAK, OFFSET, SESSION_END, SESSION_START, VALID
from rigs.agent import Outcome
from rigs.display.config import RigConfig
from rigs.display.events import EventOutput
from rigs.display.fixation import FixationMonitor, GazeSource
from rigs.display.screen import Screen

__all__ = ["PsychoPyPresenter", "compute_frame_counts", "FRAME_TOLERANCE"]

#: How far from a whole number of frames an on or off time may be, in frames (0.1 frame = 1.7 ms at 60 Hz):
#: 0.1 s at 59.94 Hz (5.994 frames) is shown as 6 frames, 0.1 s at 144 Hz (14.4 frames) is refused.
FRAME_TOLERANCE = 0.1


def _whole_frames(name: str, seconds: float, refresh_hz: float) -> int:
    frames = seconds * refresh_hz
    if abs(frames - round(frames)) > FRAME_TOLERANCE:
        low, high = math.floor(frames), math.ceil(frames)
        raise ValueError(
            f"[rsvp] {name} = {seconds:g} s is {frames:.2f} frames at the rig's {refresh_hz:.2f} Hz, not whole: set "
            f"{name} = {low / refresh_hz:.4f} ({low} frames) or {high / refresh_hz:.4f} s ({high}) in experiment.toml, "
            "or change the display's refresh rate"
        )
    return round(frames)


def compute_frame_counts(on_s: float, off_s: float, window_stop_s: float, refresh_hz: float) -> tuple[int, int, int]:
    """Frames at ``refresh_hz`` (Hz): on (>= 1), off, and from onset to the end of the response window.

    ``on_s``, ``off_s``, ``window_stop_s`` in s. Raises ``ValueError`` (naming the key, its frames and
    the nearest whole-frame times) when ``on_s`` or ``off_s`` is not a whole number of frames.
    """
    n_on, n_off = _whole_frames("on_s", on_s, refresh_hz), _whole_frames("off_s", off_s, refresh_hz)
    if n_on < 1:
        raise ValueError(f"[rsvp] on_s = {on_s:g} s is shorter than one frame at the rig's {refresh_hz:.2f} Hz "
                         f"({1 / refresh_hz:.4f} s): set on_s to at least one frame in experiment.toml")
    return n_on, n_off, max(1, math.ceil(window_stop_s * refresh_hz - 1e-9))


class PsychoPyPresenter:
    """The display rig's presenter on ``screen`` (a :class:`~rigs.display.screen.Screen`).

    ``config``: rig.toml; ``events``: where codes go; ``gaze``: the fixation source.
    """

    sites: tuple[str, ...] = ()

    def __init__(self, config: RigConfig, screen: Screen, events: EventOutput, gaze: GazeSource) -> None:
        self.config, self.screen, self.events, self.gaze = config, screen, events, gaze
        self.rsvp: dict | None = None  # the experiment's timing and size, from hello (set_rsvp)
        self.size_px = 224.0  # until set_rsvp: textures made before a hello are resized then
        self._frames = (0, 0)
        self._images: dict = {}
        self._codes: dict[int, int] = {}

    # ----- the agent's presenter interface (called from the agent's threads) -------------------

    def set_rsvp(self, rsvp: dict | None) -> None:
        """Show the experiment's ``rsvp`` (``on_s``, ``off_s`` s, ``image_size_deg``) from now on.

        Raises ``ValueError`` (the hello is refused with it) when it is None (a control PC that does
        not send it) or its times are not whole frames at :attr:`Screen.refresh_hz`.
        """
        if rsvp is None:
            raise ValueError("the control PC sent no RSVP timing at hello (an older closedloop): update closedloop on "
                             "the control PC; a display rig shows the experiment's [rsvp] on_s, off_s, image_size_deg")
        frames = compute_frame_counts(rsvp["on_s"], rsvp["off_s"], 0.0, self.screen.refresh_hz)[:2]
        if rsvp != self.rsvp:
            logger.info("display rig: the experiment's RSVP: %g s on (%d frames), %g s off (%d frames) at %.2f Hz, "
                        "%g deg images", rsvp["on_s"], frames[0], rsvp["off_s"], frames[1], self.screen.refresh_hz,
                        rsvp["image_size_deg"])
        self.screen.call(self._use_rsvp, dict(rsvp), frames)

    def load_bundle(self, path, outcomes: list[dict]) -> list[int]:
        """Make a texture of every image in the bundle (on the window's thread); a new session sends SESSION_START."""
        bundle = read_bundle(path)
        images = self.screen.call(self._make_textures, bundle.pixels)
        ids = bundle.stimulus_ids.tolist()
        self._images, self._codes = dict(zip(ids, images)), dict(zip(ids, bundle.codes.tolist()))
        if not outcomes:
            self.screen.call(self.events.send, SESSION_START)
        logger.info("display rig: %d textures of %.0f px ready", len(ids), self.size_px)
        return ids

    def present(self, presentation_id: int, stimulus_id: int, window_s) -> Outcome:
        """Show ``stimulus_id`` (blocks for its frames); valid when fixation held and no frame dropped."""
        return self.screen.call(self._present, presentation_id, stimulus_id, tuple(window_s))

    def finish(self, outcomes: list[dict]) -> str:
        """The session ended: send SESSION_END; the recording is the NSP's, so no path."""
        self.screen.call(self.events.send, SESSION_END)
        return ""

    # ----- on the window's thread ----------------------------------------------------------------

    def _use_rsvp(self, rsvp: dict, frames: tuple[int, int]) -> None:
        self.rsvp, self._frames = rsvp, frames
        size_px = rsvp["image_size_deg"] * self.screen.pixels_per_degree
        if size_px != self.size_px:
            self.size_px = size_px
            for image in self._images.values():
                image.size = (size_px, size_px)

    def _make_textures(self, pixels: np.ndarray) -> list:
        from psychopy import visual

        return [visual.ImageStim(self.screen.window, image=np.flipud(frame.astype(np.float32) / 127.5 - 1.0),
                                 size=(self.size_px, self.size_px), units="pix", interpolate=True)
                for frame in pixels]

    def _present(self, presentation_id: int, stimulus_id: int, window_s: tuple[float, float]) -> Outcome:
        window, screen = self.screen.window, self.screen
        assert self.rsvp is not None, "the agent queues presentations only after a hello (set_rsvp)"
        (n_on, n_off), n_window = self._frames, compute_frame_counts(self.rsvp["on_s"], self.rsvp["off_s"],
                                                                     window_s[1], screen.refresh_hz)[2]
        n_frames = max(n_on + n_off, n_window)
        late_s = self.config.screen.dropped_frame_factor / screen.refresh_hz
        fixation = FixationMonitor(self.config.fixation.window_deg,
                                   round(self.config.fixation.grace_s * screen.refresh_hz))
        stamps: dict[str, float] = {}
        sent: list[int] = []

        def send(code: int, name: str | None = None) -> None:
            self.events.send(code)
            if name:  # stamped once the code is out: a thread switch between the two would make them disagree
                stamps[name] = time.monotonic()
            sent.append(code)

        image = self._images[stimulus_id]
        reason, dropped_frame, intervals, previous = "valid", None, [], None
        for frame in range(n_frames):
            if frame == 0:
                window.callOnFlip(send, self._codes[stimulus_id], "onset_s")
            elif frame == n_on:
                window.callOnFlip(send, OFFSET, "offset_s")
            if frame < n_on:
                image.draw()
            screen.draw_overlay(light=frame < n_on)
            window.flip()
            now = time.perf_counter()
            if previous is not None:
                intervals.append(now - previous)
                if intervals[-1] > late_s and reason == "valid":
                    reason, dropped_frame = "dropped_frame", frame
                    send(DROPPED_FRAME)
            previous = now
            gaze = self.gaze.read_gaze()  # every frame, so a source sees one read per presentation frame
            if frame < n_window and fixation.update(frame, gaze) and reason == "valid":
                reason = "fixation_break"
                stamps["break_s"] = time.monotonic()
                send(FIXATION_BREAK)
            if frame == n_window - 1:
                stamps["window_end_s"] = time.monotonic()
                if reason == "valid":
                    send(VALID)
        record = {
            "reason": reason, "code": self._codes[stimulus_id], "codes_sent": sent, "refresh_hz": screen.refresh_hz,
            "n_on_frames": n_on, "n_off_frames": n_off, "n_window_frames": n_window,
            "n_frames": n_frames, "break_frame": fixation.break_frame,
            "dropped_frame": dropped_frame, "frame_intervals_ms": [round(i * 1e3, 3) for i in intervals], **stamps,
        }
        return Outcome(reason == "valid", stamps["onset_s"], None, record)
