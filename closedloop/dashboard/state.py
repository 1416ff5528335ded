"""What the dashboard shows, read from what the days write: :class:`ExperimentView`.

Nothing here writes, locks or waits: the view reads the stage markers, the day's ``log.jsonl``
(only the lines added since the last read), ``live.json`` (when it changed), the day store's
presentations (only the rows committed since the last read) and each finished day's
``sensitivity.json`` (once). A file that is missing, half-written or being replaced gives a state
on the page ("waiting", "stale", a note among the warnings), never an error: the next snapshot
reads it again.
"""

from __future__ import annotations

import calendar
import json
import time
from collections import deque
from pathlib import Path

import numpy as np

from analysis.sensitivity_curves import KINDS, compute_sensitivity_curves
from closedloop.config import read_config
from closedloop.core.files import read_json
from closedloop.core.lock import read_lock_holder
from closedloop.data import layout
from closedloop.data.layout import STAGES
from closedloop.data.store import open_store
from closedloop.day.waiting import compute_waiting

__all__ = ["STATE_FORMAT", "ExperimentView"]

STATE_FORMAT = "closedloop.dashboard_state"
_STALE_S = 5.0  # live.json is rewritten every second: older than this, its writer has stopped
_N_WARNINGS = 30
_N_LACKING_SHOWN = 60


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _parse_utc(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def _number(value, digits: int = 3):
    """A JSON-ready number: None for anything else than a finite number (None, NaN, text, a list)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return round(value, digits) if np.isfinite(value) else None


def _clean(value):
    """``value`` as strict JSON takes it: non-finite floats (a file may hold NaN) become None."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


class _DayLog:
    """A day's ``log.jsonl``, read as it grows: stage starts and ends, warnings, alarms."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""
        self.started: dict[str, float] = {}  # stage -> start time (unix s) of its last start
        self.warnings: deque[dict] = deque(maxlen=_N_WARNINGS)
        self.alarms: dict[tuple, dict] = {}

    def read(self) -> None:
        try:
            with self.path.open("rb") as stream:
                stream.seek(self.offset)
                data = stream.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a crash, NUL bytes left by a power cut, not UTF-8, absurdly nested
            if isinstance(event, dict):
                self._take(event)

    @property
    def shrank(self) -> bool:
        """The file is shorter than what was read: it is another file now (a day started over)."""
        try:
            return self.path.stat().st_size < self.offset
        except OSError:
            return self.offset > 0

    def _take(self, event: dict) -> None:
        kind, stage = event.get("event"), event.get("stage")
        if kind == "start" and stage in STAGES:
            self.started[stage] = _parse_utc(event.get("time_utc")) or time.time()
            if stage == "present":
                self.alarms.clear()  # a new session raises its own
        elif kind == "done" and stage == "present":
            self.alarms.clear()
        elif kind == "warning":
            self.warnings.append({"time_utc": event.get("time_utc"), "day": event.get("day"),
                                  "message": str(event.get("message", ""))})
        elif kind == "alarm":
            key = (event.get("kind"), event.get("site"))
            if event.get("state") == "raised":
                self.alarms[key] = {"kind": event.get("kind"), "site": event.get("site"), "day": event.get("day"),
                                    "since_utc": event.get("time_utc"), "message": str(event.get("message", ""))}
                self.warnings.append({"time_utc": event.get("time_utc"), "day": event.get("day"),
                                      "message": "ALARM " + str(event.get("message", ""))})
            else:
                self.alarms.pop(key, None)


class _StoreTail:
    """The day store's presentations, read as they are committed: per-site rates and the stimuli
    still lacking their valid repetitions."""

    def __init__(self, path: Path, *, n_recent: int, n_strip: int) -> None:
        self.path, self.n_recent, self.n_strip = path, n_recent, n_strip
        self.n_read = 0
        self.labels: list[str] | None = None
        self.live_counts = True
        self.valid_per_stimulus = np.zeros(0, dtype=np.int64)
        self.recent: deque[np.ndarray] = deque(maxlen=max(n_recent, n_strip))
        self.first: list[np.ndarray] = []

    def read(self) -> None:
        store = open_store(self.path)
        if self.labels is None:
            self.labels = list(store.sites.label)
        self.live_counts = store.has_live_counts
        if len(self.valid_per_stimulus) < store.n_stimuli:
            self.valid_per_stimulus = np.pad(self.valid_per_stimulus, (0, store.n_stimuli - len(self.valid_per_stimulus)))
        new = store.read_presentations(start=self.n_read)
        self.n_read += len(new["id"])
        valid = new["valid"].astype(bool)
        np.add.at(self.valid_per_stimulus, new["stimulus"][valid], 1)
        if self.live_counts:
            rows = new["counts"][valid].astype(np.float64)
            self.first.extend(rows[:self.n_recent - len(self.first)])
            self.recent.extend(rows[-self.recent.maxlen:])

    def sites(self, window_s: float, reliability) -> dict | None:
        if not self.live_counts or self.labels is None:
            return None
        recent = list(self.recent)[-self.n_recent:]
        strip = np.array(list(self.recent)[-self.n_strip:]).reshape(-1, len(self.labels)).T / window_s
        return {
            "labels": self.labels,
            "recent_rate_hz": [_number(v, 1) for v in np.mean(recent, axis=0) / window_s] if recent else None,
            "reference_rate_hz": [_number(v, 1) for v in np.mean(self.first, axis=0) / window_s] if self.first else None,
            "n_recent": len(recent),
            "day0_reliability": reliability,
            "strip": {"rates_hz": np.round(strip, 1).tolist(), "max_hz": _number(strip.max() if strip.size else 0.0, 1)},
        }

    def lacking(self, repetitions: int) -> dict:
        ids = np.flatnonzero(self.valid_per_stimulus < repetitions)
        return {"n": int(ids.size), "repetitions": int(repetitions),
                "stimuli": [{"stimulus_id": int(i), "n_valid": int(self.valid_per_stimulus[i])} for i in ids[:_N_LACKING_SHOWN]]}


class _Day:
    """What the view keeps of one day between snapshots."""

    def __init__(self, folder: Path, *, n_recent: int, n_strip: int) -> None:
        self.folder = folder
        self.inode = _inode(folder)  # a day started over (--force) is a new folder under the same name
        self.log = _DayLog(folder / layout.LOG)
        self.store = _StoreTail(folder / layout.STORE, n_recent=n_recent, n_strip=n_strip)
        self.config = None
        self.live: dict | None = None
        self.live_mtime = None
        self.markers: dict[str, dict] = {}

    @property
    def replaced(self) -> bool:
        """The folder is no longer the one read (a day started over; the same inode may come back)."""
        return (self.inode != _inode(self.folder) or self.log.shrank
                or any(not layout.marker_path(self.folder, stage).exists() for stage in self.markers))

    def read_markers(self) -> None:
        for stage in STAGES:
            if stage in self.markers:
                continue
            path = layout.marker_path(self.folder, stage)
            if path.exists():
                marker = read_json(path)
                if not isinstance(marker, dict):
                    raise ValueError(f"{path} is not a stage marker (a JSON object)")
                self.markers[stage] = marker

    def read_live(self) -> None:
        path = self.folder / layout.LIVE
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            self.live = None
            return
        if mtime != self.live_mtime:
            live = read_json(path)
            if not isinstance(live, dict) or live.get("format") != layout.LIVE_FORMAT:
                raise ValueError(f"{path} is not the present stage's live view")
            self.live, self.live_mtime = live, mtime

    def read_config(self):
        """The day's frozen config, or None before it is written (raises on a config it cannot read)."""
        if self.config is None and (self.folder / layout.CONFIG).exists():
            self.config = read_config(self.folder / layout.CONFIG, check_paths=False)
        return self.config


class ExperimentView:
    """The dashboard's reading of an experiment folder; :meth:`snapshot` gives the page's state.

    ``thresholds``: the experiment's :class:`~closedloop.config.DashboardSection`
    (``silent_presentations``: the valid presentations behind each site's recent and reference
    rate, as the alarms use them); ``n_strip``: presentations in each site's strip.
    """

    def __init__(self, experiment: str | Path, thresholds, *, n_strip: int = 120) -> None:
        self.experiment = Path(experiment).absolute()
        self.thresholds, self.n_strip = thresholds, n_strip
        self._days: dict[int, _Day] = {}
        self._curves: dict[int, tuple] = {}  # day -> (mtime of sensitivity.json, curve or None, problem or None)
        self._reliability: tuple[int, list | None] | None = None

    def snapshot(self) -> dict:
        """The page's state (docs/dashboard.md, "State"): the current day and its stages, the live
        session, the sites, the stimuli still lacking, the alarms and warnings, the finished days'
        sensitivity curves. JSON-ready."""
        now = time.time()
        state = {"format": STATE_FORMAT, "experiment": str(self.experiment), "now_utc": _utc(now), "current": None,
                 "days": [], "present": None, "sites": None, "lacking": None, "alarms": [], "warnings": [],
                 "history": [], "problems": []}
        folders = layout.find_day_folders(self.experiment) if self.experiment.is_dir() else {}
        if not self.experiment.is_dir():
            state["problems"].append(f"{self.experiment} is not a folder" if self.experiment.exists()
                                     else f"{self.experiment} does not exist (yet)")
        for number, folder in folders.items():
            if number not in self._days or self._days[number].replaced:
                self._days[number] = _Day(folder, n_recent=self.thresholds.silent_presentations, n_strip=self.n_strip)
                self._curves.pop(number, None)
        states = {}
        for number in folders:
            day = self._days[number]
            self._guard(state, f"day {number}: stage markers", day.read_markers)
            self._guard(state, f"day {number}: log.jsonl", day.log.read)
            states[number] = self._day_state(number, day)
            state["days"].append({"day": number, "state": states[number][0]})
        if folders:
            last = max(folders)
            self._guard(state, f"day {last}", lambda: self._current(state, last, states[last], now))
        state["history"] = self._guard(state, "the finished days' curves", lambda: self._history(state, folders)) or []
        return _clean(state)

    # -- the current day ----------------------------------------------------------------------
    def _current(self, state: dict, number: int, day_state: tuple[str, str | None], now: float) -> None:
        day = self._days[number]
        self._guard(state, f"day {number}: live.json", day.read_live)
        day_state, running = day_state
        stages = []
        for stage in STAGES:
            if stage in day.markers:
                stages.append({"name": stage, "state": "done", "seconds": _number(day.markers[stage].get("seconds"), 1)})
            elif stage in day.log.started and stage == running:
                stages.append({"name": stage, "state": "running", "seconds": _number(now - day.log.started[stage], 1)})
            elif stage in day.log.started and stage == self._first_pending(day):
                stages.append({"name": stage, "state": "interrupted", "seconds": None})
            else:
                stages.append({"name": stage, "state": "pending", "seconds": None})
        state["current"] = {"day": number, "state": day_state, "stage": running, "stages": stages,
                            "eta_s": self._eta(number, day, stages)}
        state["present"] = self._present(day, now, running == "present")
        config = self._guard(state, f"day {number}: config.toml", day.read_config)
        if config is not None and (day.folder / layout.STORE).exists() and "synthesize" in day.markers:
            if self._guard(state, f"day {number}: store.zarr", lambda: day.store.read() or True):
                window = config.response.window_s
                state["sites"] = day.store.sites(window[1] - window[0], self._day0_reliability(state))
                if "present" in day.log.started or "present" in day.markers:
                    state["lacking"] = day.store.lacking(config.rsvp.repetitions)
        state["alarms"] = list(day.log.alarms.values()) if running == "present" else []
        state["warnings"] = list(reversed(day.log.warnings))

    def _day_state(self, number: int, day: _Day) -> tuple[str, str | None]:
        """The day's state ("finished", "running", "waiting for recording", "stopped", "not started")
        and its running stage (or None)."""
        if all(stage in day.markers for stage in STAGES):
            return "finished", None
        holder = read_lock_holder(layout.day_lock_path(self.experiment, number))
        pending = self._first_pending(day)
        if holder is not None:
            return "running", pending
        if pending in ("present", "ingest") and compute_waiting(day.folder) is not None:
            return "waiting for recording", None
        return ("stopped" if day.markers or day.log.started else "not started"), None

    @staticmethod
    def _first_pending(day: _Day) -> str | None:
        return next((stage for stage in STAGES if stage not in day.markers), None)

    def _eta(self, number: int, day: _Day, stages: list[dict]) -> float | None:
        """Seconds until the day ends: the live ETA of a running present stage, and for the other
        stages left the time they took on the latest earlier day that ran them (None if unknown)."""
        total = 0.0
        for entry in stages:
            if entry["state"] == "done":
                continue
            live_eta = _number(day.live.get("eta_s")) if day.live else None
            if entry["name"] == "present" and entry["state"] == "running" and live_eta is not None:
                total += live_eta
                continue
            before = self._earlier_seconds(number, entry["name"])
            if before is None:
                return None
            total += max(before - (entry["seconds"] or 0.0), 0.0) if entry["state"] == "running" else before
        return _number(total, 0)

    def _earlier_seconds(self, number: int, stage: str) -> float | None:
        for earlier in sorted((n for n in self._days if n < number), reverse=True):
            marker = self._days[earlier].markers.get(stage)
            if marker is not None and _number(marker.get("seconds")) is not None:
                return _number(marker.get("seconds"))
        return None

    def _present(self, day: _Day, now: float, running: bool) -> dict | None:
        live = day.live
        if not live:
            return None
        age = now - (_number(live.get("updated_unix")) or 0.0)
        stale = bool(live.get("live")) and age > _STALE_S
        return {
            "updated_s_ago": _number(age, 1), "stale": stale, "live": bool(live.get("live")) and not stale and running,
            "presentations": live.get("presentations"), "valid": live.get("valid"), "target_valid": live.get("target_valid"),
            "window_s": live.get("window_s"), "presentations_per_min": live.get("window_per_min"),
            "valid_fraction": live.get("window_valid_fraction"), "fixation_break_rate": live.get("window_fixation_break_rate"),
            "eta_s": live.get("eta_s"),
            "link": {"heartbeat_age_s": live.get("link_silent_s"), "queue_depth": live.get("queue_depth"),
                     "reconnects": live.get("reconnects"), "requeued": live.get("requeued")},
            "history": [row for row in live.get("history", []) if isinstance(row, list) and len(row) == 4
                        and all(value is None or _number(value) is not None for value in row)],
        }

    def _day0_reliability(self, state: dict) -> list | None:
        """Each site's split-half reliability on day 0 (day 0's refit marker), or None before it is known."""
        path = layout.marker_path(layout.day_folder(self.experiment, 0), "refit")
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        if self._reliability is None or self._reliability[0] != mtime:
            summary = self._guard(state, "day 0: refit marker", lambda: read_json(path)["summary"])
            values = summary.get("reliability") if isinstance(summary, dict) else None
            self._reliability = (mtime, [_number(v) for v in values] if isinstance(values, list) else None)
        return self._reliability[1]

    # -- the finished days --------------------------------------------------------------------
    def _history(self, state: dict, folders: dict[int, Path]) -> list[dict]:
        """The mean normalised bound against the paper-equivalent budget of every estimated day."""
        history = []
        for number, folder in folders.items():
            path = folder / layout.SENSITIVITY
            if "estimate" not in self._days[number].markers:
                continue
            mtime = path.stat().st_mtime_ns if path.exists() else None
            if number not in self._curves or self._curves[number][0] != mtime:
                try:
                    self._curves[number] = (mtime, _curve(path), None)
                except Exception as error:  # noqa: BLE001 - any damage: a problem on the page, read again when it changes
                    self._curves[number] = (mtime, None, f"day {number}: sensitivity.json: {str(error)[:200]}")
            _, curve, problem = self._curves[number]
            if problem:
                state["problems"].append(problem)
            if curve:
                history.append({"day": number, **curve})
        return history

    @staticmethod
    def _guard(state: dict, what: str, read):
        """``read()``, or None when it fails: a file missing, half-written, damaged or being replaced
        becomes a problem on the page, never an error of the snapshot (the next one reads it again)."""
        try:
            return read()
        except Exception as error:  # noqa: BLE001 - whatever a file holds, the page must go on
            state["problems"].append(f"{what}: {type(error).__name__}: {str(error)[:200]} (read again in a moment)")
            return None


def _inode(folder: Path) -> int | None:
    try:
        return folder.stat().st_ino
    except FileNotFoundError:
        return None


def _curve(path: Path) -> dict | None:
    """A day's mean normalised bound per budget and kind, from its ``sensitivity.json``."""
    records = read_json(path)
    if not isinstance(records, list):
        raise ValueError("not a list of sensitivity records")
    if not records:
        return None
    scale = {r["eps"]: _number(r.get("eps_paper", r["eps"]), 9) for r in records}
    curves = {kind: {row["eps"]: row["mean"] for row in compute_sensitivity_curves(records, kind=kind)["mean"]}
              for kind in KINDS}
    budgets = sorted(scale)
    return {"eps": budgets, "eps_paper": [scale[eps] for eps in budgets],
            **{kind: [_number(curves[kind].get(eps)) for eps in budgets] for kind in KINDS}}
