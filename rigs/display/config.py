"""The display computer's configuration: one ``rig.toml``, validated on load.

Every key has a documented default; :func:`write_default_rig_config` writes a commented file
(``closedloop rig init rig.toml``) whose defaults work on any computer with a display: no event
output, no eye tracker, the refresh rate measured at start. Unknown keys, wrong types and
out-of-range values are refused with a message naming the key, the value and what is allowed
(the same strict rules as ``experiment.toml``, :mod:`closedloop.config`). Relative paths are
relative to the folder holding the file. What is shown (image size, on and off times) is not
here: it is the experiment's ``[rsvp]``, sent by the control PC at hello.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from closedloop.config import ConfigSection, read_toml_config, render_config, validate_config, write_preset_config

__all__ = ["RigConfig", "read_rig_config", "write_default_rig_config", "compute_pixels_per_degree", "RIG_CONFIG_NAME"]

RIG_CONFIG_NAME = "rig.toml"


class AgentSection(ConfigSection):
    """[agent]: the rig agent that the control PC talks to (docs/protocol.md)."""

    address: str = Field("tcp://*:5555", description="ZeroMQ endpoint to bind, tcp://HOST:PORT (HOST * = every interface).")
    security: Literal["curve", "plain"] = Field(
        "curve", description='"curve": encrypted, only control PCs whose key is in keys_dir/allowed/; '
        '"plain": unencrypted, trusted networks only.',
    )
    keys_dir: str = Field("keys", description="Folder with rig.key_secret, rig.key and allowed/ (from `closedloop keys`).")
    state_dir: str = Field("rig-state", description="Folder for the session: the bundle, session.json, stream.jsonl.")
    rig_id: str = Field("display-rig", min_length=1, max_length=64, description="Name this rig gives at hello.")
    heartbeat_s: float = Field(1.0, gt=0.0, le=60.0, description="Heartbeat interval, s.")
    timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="A control PC silent this long is dropped (RSVP goes on), s.")

    @model_validator(mode="after")
    def _heartbeat_within_timeout(self) -> AgentSection:
        if self.heartbeat_s >= self.timeout_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be shorter than timeout_s ({self.timeout_s})")
        return self


class ScreenSection(ConfigSection):
    """[screen]: the monitor the monkey sees and its geometry."""

    screen: int = Field(0, ge=0, le=16, description="Screen number of the window (0 = the first).")
    fullscreen: bool = Field(True, description="Full-screen window (false: a window of size_px, for testing).")
    size_px: tuple[int, int] = Field((1024, 768), description="Window size [width, height], pixels, when not full screen.")
    width_cm: float = Field(53.0, gt=0.0, le=1000.0, description="Visible width of the screen, cm.")
    distance_cm: float = Field(57.0, gt=0.0, le=1000.0, description="Eye-to-screen distance, cm.")
    refresh_hz: float = Field(
        0.0, ge=0.0, le=1000.0,
        description="0: measure the refresh rate at start and count frames at it; a number: count frames at this "
        "nominal rate (for a virtual display such as Xvfb, which has no vertical blank).",
    )
    measure_frames: int = Field(120, ge=10, le=10000, description="Flips timed to measure the refresh rate and jitter.")
    max_jitter_ms: float = Field(
        1.0, gt=0.0, le=100.0, description="`rig check` fails when the frame-interval standard deviation is larger, ms."
    )
    dropped_frame_factor: float = Field(
        1.5, gt=1.0, le=100.0,
        description="A flip later than this many frame periods after the previous one is a dropped frame "
        "(the presentation is invalid).",
    )
    background: float = Field(0.5, ge=0.0, le=1.0, description="Grey level of the background, 0 (black) to 1 (white).")

    @field_validator("size_px", mode="before")
    @classmethod
    def _list_as_pair(cls, size):
        return tuple(size) if isinstance(size, list) else size

    @field_validator("size_px")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 16:
            raise ValueError(f"width and height must be >= 16 pixels; got {list(size)}")
        return size


class PhotodiodeSection(ConfigSection):
    """[photodiode]: a patch in a screen corner, white on stimulus frames and black otherwise."""

    enabled: bool = Field(True, description="Draw the patch.")
    corner: Literal["top-left", "top-right", "bottom-left", "bottom-right"] = Field(
        "bottom-right", description="Corner of the patch."
    )
    size_px: int = Field(40, ge=4, le=1000, description="Side of the square patch, pixels.")


class EventsSection(ConfigSection):
    """[events]: where the 16-bit event codes go (the NSP's digital input); layout in docs/rig.md."""

    output: Literal["none", "serial", "parallel", "labjack", "nidaq"] = Field(
        "none",
        description='"none"; "serial": 2 bytes per code to serial_port; "parallel": low byte to parallel_ports[0], '
        'high byte to parallel_ports[1]; "labjack": a LabJack T4/T7/T8 (labjack-ljm) on FIO0-7 + EIO0-7; '
        '"nidaq": an NI-DAQmx digital port (nidaqmx) on nidaq_lines.',
    )
    serial_port: str = Field("/dev/ttyUSB0", description="Serial device (Windows: COM3).")
    baudrate: int = Field(115200, ge=300, le=12_000_000, description="Serial speed, bit/s.")
    byte_order: Literal["big", "little"] = Field(
        "big", description='Order of the 2 bytes of a code on the serial line: "big" = high byte first.'
    )
    parallel_ports: list[str] = Field(
        ["/dev/parport0", "/dev/parport1"],
        description="Two parallel ports (address or device): the low byte of a code, then the high byte.",
    )
    labjack_identifier: str = Field("ANY", description='LabJack to open: "ANY", a serial number or an IP address.')
    nidaq_lines: str = Field("Dev1/port0/line0:15", description="NI-DAQmx digital lines carrying the 16 bits.")

    @field_validator("parallel_ports")
    @classmethod
    def _two_ports(cls, ports: list[str]) -> list[str]:
        if len(ports) != 2:
            raise ValueError(f"need two ports (low byte, high byte), got {len(ports)}")
        return ports


class FixationSection(ConfigSection):
    """[fixation]: the eye tracker and the fixation window."""

    source: Literal["none", "iohub", "scripted"] = Field(
        "none",
        description='"none": every presentation is valid (anaesthetised or passive viewing); "iohub": an eye '
        "tracker through PsychoPy ioHub (tracker); \"scripted\": a TEST source whose gaze leaves the window during "
        "the presentation frames in scripted_away (for tests of the rig without a monkey).",
    )
    tracker: Literal["mouse", "eyelink", "tobii", "gazepoint"] = Field(
        "mouse", description='ioHub tracker: "eyelink", "tobii", "gazepoint", or "mouse" (simulated: gaze = mouse pointer).'
    )
    tracker_settings: dict = Field(
        {}, description="Extra ioHub settings for the tracker (e.g. { model_name = \"EYELINK 1000 DESKTOP\" }).",
    )
    window_deg: float = Field(2.0, gt=0.0, le=60.0, description="Radius of the fixation window around the centre, degrees.")
    grace_s: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Excursions out of the window (or lost samples) shorter than this are tolerated, s (in frames).",
    )
    spot_size_deg: float = Field(0.2, ge=0.0, le=5.0, description="Diameter of the fixation spot, degrees (0: none).")
    scripted_away: list[tuple[int, int]] = Field(
        [], description="scripted only: [[first, stop), ...] presentation frames (counted over all presentations "
        "from 0) with the gaze away.",
    )

    @field_validator("scripted_away", mode="before")
    @classmethod
    def _lists_as_pairs(cls, ranges):
        return [tuple(r) if isinstance(r, list) else r for r in ranges] if isinstance(ranges, list) else ranges

    @field_validator("scripted_away")
    @classmethod
    def _ordered_ranges(cls, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        bad = [list(r) for r in ranges if not 0 <= r[0] < r[1]]
        if bad:
            raise ValueError(f"each range needs 0 <= first < stop; got {bad}")
        return ranges


class RigConfig(ConfigSection):
    """The display computer's ``rig.toml``."""

    agent: AgentSection = AgentSection()
    screen: ScreenSection = ScreenSection()
    photodiode: PhotodiodeSection = PhotodiodeSection()
    events: EventsSection = EventsSection()
    fixation: FixationSection = FixationSection()

    def resolve(self, base: str | Path) -> RigConfig:
        """This config with ``keys_dir`` and ``state_dir`` resolved against the folder ``base``."""
        agent = self.agent.model_copy(update={
            key: str((Path(base) / Path(getattr(self.agent, key)).expanduser()).resolve())
            for key in ("keys_dir", "state_dir")
        })
        return self.model_copy(update={"agent": agent})


def compute_pixels_per_degree(width_px: int, width_cm: float, distance_cm: float) -> float:
    """Pixels per degree of visual angle at the screen centre: px/cm × the cm one degree spans at ``distance_cm``."""
    return width_px / width_cm * 2.0 * distance_cm * math.tan(math.radians(0.5))


def read_rig_config(path: str | Path) -> RigConfig:
    """Read and validate a ``rig.toml`` (or the one in a folder); paths resolved against its folder.

    Raises ``ValueError`` naming the key, the value and what is allowed; ``FileNotFoundError``
    without the file.
    """
    data, path = read_toml_config(path, RIG_CONFIG_NAME, missing="no rig config at {path}; "
                                  "write one with `closedloop rig init rig.toml`")
    if "stimulus" in data:
        raise ValueError(f"{path}: [stimulus] is not a rig.toml section any more: the image size and the RSVP on/off "
                         "times are the experiment's [rsvp], sent by the control PC at hello; delete the section")
    return validate_config(RigConfig, data, source=str(path)).resolve(path.parent)


def write_default_rig_config(path: str | Path, *, overwrite: bool = False, changes: dict | None = None) -> Path:
    """Write a commented ``rig.toml`` with every default to ``path`` (a file, or a folder to hold rig.toml).

    ``changes``: {section: {key: value}} over the defaults (validated). Refuses to replace an
    existing file unless ``overwrite``. Returns the path written.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RIG_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_preset_config(path, RigConfig, {"default": {}}, "default", overwrite=overwrite, changes=changes,
                               render=lambda config: render_config(
                                   config, title="closedloop display computer (closedloop rig serve / rig check)."))
