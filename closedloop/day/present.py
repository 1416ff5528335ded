"""Stage 4 of a day: present the day's stimuli on the rig and record every outcome.

On a rig that runs its own software (``[rig] kind = "files"``) nothing is streamed: the bundle
stage wrote the RSVP list, the stage waits (:class:`~closedloop.day.waiting.WaitingForRecording`)
until the NSP's ``recording.nev`` is in the day folder, then stores the presentations it holds
(:func:`closedloop.data.handoff.read_recorded_presentations`: stimulus codes, validity from the
outcome codes or ``trial_log.csv``), without live counts. Nothing is re-queued; the summary
names the stimuli that lack their valid repetitions.

Otherwise the shuffled RSVP list goes to the day's rig (:class:`~closedloop.link.access.RigAccess`: the
``[rig] address``, or the simulated IT rig that :class:`rigs.launch.RigLauncher` starts on
loopback for the session, with CURVE keys made on first use); the outcomes are
appended to the day store as they arrive, in batches of up to a second (an outcome not yet
stored when the process dies is resent by the rig on the next connection), so a crash loses
nothing and a rerun resumes with the presentations already stored
(:func:`closedloop.link.presentations.run_presentations`). The operator sees a live view on a
terminal (presentations, valid and fixation-break rates, ETA, link health, per-site mean rates)
and plain log lines otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from rich.live import Live
from rich.table import Table

from closedloop.config import ExperimentConfig
from closedloop.core.files import compute_file_digest, read_json, write_bytes
from closedloop.core.logs import logger
from closedloop.data import layout
from closedloop.data.bundle import read_bundle
from closedloop.data.handoff import make_rsvp_list, read_recorded_presentations
from closedloop.data.store import open_store
from closedloop.day.alarms import AlarmLog, SessionWatch
from closedloop.day.context import make_site_table
from closedloop.day.waiting import make_waiting_error
from closedloop.link.presentations import run_presentations

__all__ = ["SessionMonitor", "compute_lacking_valid", "run_stage"]


class SessionMonitor:
    """What the operator watches during ``present``: :meth:`update` per outcome, :meth:`facts` for display.

    ``n_target``: valid presentations needed (n_stimuli × repetitions); ``window_s``: response
    window length, s (to turn counts into rates, Hz); ``rates_window_s``: the sliding window of the
    presentation rate, valid fraction and fixation-break rate, s. Outcomes without counts (a real
    presenter) leave the per-site rates out. The link facts come from the client handed to
    :meth:`attach`. Thread-safe: the live view reads it while the session updates it.
    """

    def __init__(self, n_target: int, n_sites: int, window_s: float, *, n_valid: int = 0, n_done: int = 0,
                 rates_window_s: float = 60.0) -> None:
        self.n_target, self.window_s, self.rates_window_s = n_target, window_s, rates_window_s
        self.n_done, self.n_valid, self.n_new, self.n_valid_before = n_done, n_valid, 0, n_valid
        self.rate_sum = np.zeros(n_sites)
        self.started = time.monotonic()
        self.n_counted = 0
        self.client = None
        self._recent: deque[tuple[float, bool]] = deque()
        self._lock = threading.Lock()

    def attach(self, client) -> None:
        """Read the link's health (heartbeat age, queue depth, reconnects, re-queues) from ``client``."""
        self.client = client

    def update(self, outcome: dict) -> None:
        now = time.monotonic()
        with self._lock:
            self.n_done += 1
            self.n_new += 1
            self._recent.append((now, bool(outcome["valid"])))
            if outcome["valid"]:
                self.n_valid += 1
                if outcome.get("counts") is not None:
                    self.n_counted += 1
                    self.rate_sum += np.asarray(outcome["counts"], dtype=float) / self.window_s

    def facts(self) -> dict:
        """The session so far: counts, rates over the sliding window (``window_*``), ETA (s), link health."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.rates_window_s:
                self._recent.popleft()
            n_window = len(self._recent)
            n_window_valid = sum(valid for _, valid in self._recent)
            span = min(now - self.started, self.rates_window_s)
            per_valid = (now - self.started) / max(self.n_valid - self.n_valid_before, 1)
            remaining = max(self.n_target - self.n_valid, 0)
            facts = {
                "presentations": self.n_done,
                "valid": self.n_valid,
                "target_valid": self.n_target,
                "valid_rate": self.n_valid / self.n_done if self.n_done else float("nan"),
                "fixation_break_rate": 1 - self.n_valid / self.n_done if self.n_done else float("nan"),
                "eta_s": remaining * per_valid if self.n_new else float("nan"),
                "window_s": self.rates_window_s,
                "window_presentations": n_window,
                "window_per_min": 60.0 * n_window / span if span > 0 else float("nan"),
                "window_valid_fraction": n_window_valid / n_window if n_window else float("nan"),
                "window_fixation_break_rate": 1 - n_window_valid / n_window if n_window else float("nan"),
                "mean_rate_hz": (self.rate_sum / self.n_counted).round(1).tolist() if self.n_counted else None,
            }
        client = self.client
        facts["link_silent_s"] = client.seconds_since_heard if client is not None else float("nan")
        facts["queue_depth"] = len(client.outstanding) if client is not None else 0
        facts["reconnects"] = client.n_reconnects if client is not None else 0
        facts["requeued"] = client.n_requeued if client is not None else 0
        return facts

    def render(self):
        facts = self.facts()
        table = Table(title="present", show_header=False)
        table.add_row("presentations", f"{facts['presentations']} ({facts['valid']}/{facts['target_valid']} valid)")
        table.add_row("valid / fixation breaks", f"{facts['valid_rate']:.0%} / {facts['fixation_break_rate']:.0%}")
        table.add_row("ETA", f"{facts['eta_s']:.0f} s" if np.isfinite(facts["eta_s"]) else "…")
        health = "ok" if facts["link_silent_s"] < 2.0 else f"silent {facts['link_silent_s']:.1f} s"
        table.add_row("rig link", f"{health}, {facts['queue_depth']} queued, {facts['reconnects']} reconnects")
        rates = facts["mean_rate_hz"]
        if rates is None:
            table.add_row("mean rate per site (Hz)", "no live counts (the .nev has them)")
        else:
            table.add_row("mean rate per site (Hz)", " ".join(f"{r:.0f}" for r in rates[:24]) + (" …" if len(rates) > 24 else ""))
        return table


class _LiveFile:
    """The present stage's ``live.json``, rewritten every second for ``closedloop dashboard``.

    It holds the monitor's facts, the link's health and a history of the sliding-window rates
    (one sample every ``sample_s``, the last ``n_samples``); ``live`` is false once the stage has
    ended. Written by rename (a reader sees the old file or the new one) and without fsync: it is
    a view, rewritten a second later, not a record.
    """

    def __init__(self, path: Path, *, sample_s: float = 2.0, n_samples: int = 900) -> None:
        self.path, self.sample_s = path, sample_s
        self.history: deque[list] = deque(maxlen=n_samples)
        self._sampled = 0.0

    def write(self, facts: dict, *, live: bool) -> None:
        now = time.time()
        if now - self._sampled >= self.sample_s:
            self._sampled = now
            self.history.append([round(now, 1), *(_finite(facts[key]) for key in
                                 ("window_per_min", "window_valid_fraction", "window_fixation_break_rate"))])
        payload = {"format": layout.LIVE_FORMAT, "pid": os.getpid(), "updated_unix": round(now, 3), "live": live,
                   **{key: _finite(value) for key, value in facts.items() if key != "mean_rate_hz"},
                   "history": list(self.history)}
        write_bytes(self.path, json.dumps(payload, allow_nan=False).encode())


def _finite(value):
    """A number as JSON takes it: None for NaN and infinity, 4 significant decimals for floats."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


class _OutcomeWriter:
    """Appends outcomes to the day store in batches of up to ``n_max`` or every ``every_s`` seconds.

    One append costs tens of ms whatever its length (zarr resizes and rewrites each column's last
    chunk), so one per outcome would be most of a simulated session's time. Nothing is lost by
    waiting: an outcome not yet stored when the control process dies is resent by the rig, which
    replays its whole session to a new connection, and stored then.
    """

    def __init__(self, store, *, n_max: int = 64, every_s: float = 1.0) -> None:
        self.store, self.n_max, self.every_s = store, n_max, every_s
        self._pending: list[dict] = []
        self._since = time.monotonic()

    def add(self, outcome: dict) -> None:
        self._pending.append(outcome)
        if len(self._pending) >= self.n_max or time.monotonic() - self._since >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._since = time.monotonic()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        counts = [outcome.get("counts") for outcome in pending]
        self.store.append_presentations(
            [o["presentation_id"] for o in pending], [o["stimulus_id"] for o in pending], [o["onset_s"] for o in pending],
            [bool(o["valid"]) for o in pending],
            None if counts[0] is None else np.asarray(counts, dtype=np.int64).reshape(len(pending), -1),
        )


def _run(client, monitor: SessionMonitor, watch: SessionWatch, store, n_stimuli: int, config: ExperimentConfig,
         seed: int) -> dict:
    writer = _OutcomeWriter(store)

    def on_result(outcome: dict) -> None:
        writer.add(outcome)
        monitor.update(outcome)
        watch.add(outcome)

    recorded = store.read_presentations()
    try:
        return run_presentations(
            client, np.arange(n_stimuli), repetitions=config.rsvp.repetitions, seed=seed, on_result=on_result,
            already_recorded=(recorded["id"], recorded["stimulus"], recorded["valid"]),
        )
    finally:
        writer.flush()


@contextmanager
def _display(day, monitor: SessionMonitor, watch: SessionWatch, every_s: float = 0.5, log_every_s: float = 10.0):
    """Show ``monitor`` while the block runs and keep the operator informed.

    A live table on a terminal (else a log line every ``log_every_s``); every second, the alarms
    of ``watch`` (raised and cleared in the day's log) and the day's ``live.json`` for
    ``closedloop dashboard``. When the block ends the alarms are cleared and ``live.json`` says
    the stage is no longer live.
    """
    done = threading.Event()
    live = Live(monitor.render(), refresh_per_second=2, console=None) if sys.stderr.isatty() else None
    live_file = _LiveFile(day.path(layout.LIVE))
    alarms = AlarmLog(day.log_event, hold_s=day.config.dashboard.alarm_hold_s)

    def inform() -> None:
        facts = monitor.facts()
        alarms.update(watch.check(break_rate=facts["window_fixation_break_rate"], n_in_window=facts["window_presentations"],
                                  link_silent_s=facts["link_silent_s"], free_bytes=shutil.disk_usage(day.folder).free))
        live_file.write(facts, live=True)

    def refresh() -> None:
        last_inform = last_log = time.monotonic()
        failing = False
        while not done.wait(every_s):
            now = time.monotonic()
            if live:
                live.update(monitor.render())
            if now - last_inform >= 1.0:
                last_inform = now
                try:
                    inform()
                    failing = False
                except OSError as error:  # a full disk: the session goes on, the view and alarms wait
                    if not failing:
                        logger.warning("present: cannot write the live view or the alarms (said once until it works "
                                       "again): %s", error)
                    failing = True
            if not live and now - last_log >= log_every_s:
                last_log = now
                facts = monitor.facts()
                logger.info("present: %d presentations, %d/%d valid, %.0f%% fixation breaks, ETA %.0f s, link silent %.1f s",
                            facts["presentations"], facts["valid"], facts["target_valid"],
                            100 * facts["fixation_break_rate"], facts["eta_s"], facts["link_silent_s"])
    thread = threading.Thread(target=refresh, daemon=True)
    if live:
        live.start()
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if live:
            live.update(monitor.render())
            live.stop()
        with suppress(OSError):
            alarms.clear_all()
        with suppress(OSError):
            live_file.write(monitor.facts(), live=False)


def _check_bundle(day) -> None:
    """The bundle about to be sent is the one the bundle stage wrote (its frames' sha256)."""
    expected = read_json(layout.marker_path(day.folder, "bundle"))["summary"]["sha256"]
    actual = read_bundle(day.path(layout.BUNDLE)).sha256
    if actual != expected:
        raise ValueError(
            f"{day.path(layout.BUNDLE)} changed after the bundle stage: its frames hash to {actual[:16]}…, the bundle "
            f"stage wrote {expected[:16]}…; restore the file, or run the day again with --force"
        )


def _session_over(client, bundle) -> bool:
    """The rig reports this day's session (same bundle) as stopped: it ended before a crash."""
    return client.rig.get("stopped", False) and client.rig.get("bundle_sha256") == compute_file_digest(bundle)


def run_stage(day) -> dict:
    """The present stage: show the day's stimuli (its ``stimuli.h5`` and ``store.zarr``) on the day's rig.

    Every outcome goes into the store at once; resumable. A session that the rig reports as
    stopped (the control side died after ``stop``) is not begun again: its recording is collected
    as it is. The rig's recording is collected into the day folder when the rig wrote it
    elsewhere (the simulated rig). For ``[rig] kind = "files"`` the presentations come from the
    recording instead (see the module docstring); raises
    :class:`~closedloop.day.waiting.WaitingForRecording` until it is there. Returns a summary
    (presentations, valid, fixation breaks, the stimuli lacking valid repetitions, recording path
    on the rig or how validity was decoded).
    """
    config = day.config
    store = open_store(day.path(layout.STORE), mode="a")
    facts = {} if config.rig.kind == "files" else {"recording_on_rig": None}
    if not store.finished:  # finished: killed after the session ended and its recording was collected
        _check_bundle(day)
        if config.rig.kind == "files":
            facts = _store_recorded_presentations(day, store)
        else:
            facts = {"recording_on_rig": _present(day, store).get("recording")}
            day.rig.collect_recording(config, day.folder)
        store.finish()
    recorded = store.read_presentations()
    n_valid = int(recorded["valid"].sum())
    lacking = compute_lacking_valid(recorded["stimulus"], recorded["valid"], store.n_stimuli, config.rsvp.repetitions)
    logger.info("present: %d presentations, %d valid", store.n_presentations, n_valid)
    if lacking["n_lacking_valid"]:
        logger.warning("present: %d stimuli lack their %d valid repetitions: %s", lacking["n_lacking_valid"],
                       config.rsvp.repetitions, ", ".join(map(str, lacking["lacking_valid"][:20]))
                       + (" …" if lacking["n_lacking_valid"] > 20 else ""))
    return {"n_presentations": store.n_presentations, "n_valid": n_valid,
            "n_fixation_breaks": store.n_presentations - n_valid, **lacking, **facts}


def compute_lacking_valid(stimulus, valid, n_stimuli: int, repetitions: int) -> dict:
    """The stimuli with fewer than ``repetitions`` valid presentations, as the present stage's summary has them.

    ``stimulus``: stimulus id of each presentation, int ``(n_presentations,)`` (ids 0..n_stimuli-1);
    ``valid``: bool ``(n_presentations,)``. Returns ``n_lacking_valid``, ``lacking_valid`` (their ids,
    ascending), ``n_valid_lacking`` (valid presentations of each of them, in the same order) and
    ``repetitions``.
    """
    stimulus, valid = np.asarray(stimulus, dtype=np.int64), np.asarray(valid, dtype=bool)
    valid_per_stimulus = np.bincount(stimulus[valid], minlength=n_stimuli)
    lacking = np.flatnonzero(valid_per_stimulus < repetitions)
    return {"n_lacking_valid": int(lacking.size), "lacking_valid": lacking.tolist(),
            "n_valid_lacking": valid_per_stimulus[lacking].tolist(), "repetitions": int(repetitions)}


def _store_recorded_presentations(day, store) -> dict:
    """The files hand-off: store the presentations of the day's recording (no live counts)."""
    recording = day.path(layout.RECORDING)
    if not recording.exists():
        raise make_waiting_error(day, "files")
    trial_log = day.path(layout.TRIAL_LOG)
    codes = store.read_stimuli(pixels=False)["code"]
    rsvp = make_rsvp_list(codes, day.config.rsvp.repetitions, day.seed("present"))  # as the bundle stage wrote it
    found = read_recorded_presentations(recording, codes, rsvp["code"], trial_log=trial_log if trial_log.exists() else None)
    store.append_presentations(np.arange(len(found.stimulus)), found.stimulus, found.onset_s, found.valid, None)
    return {"validity_from": found.validity_from, "n_in_list_order": found.n_in_list_order,
            "n_without_outcome": found.n_without_outcome, "n_orphan_outcomes": found.n_orphan_outcomes,
            "n_disagreements": found.n_disagreements}


def _present(day, store) -> dict:
    """Run the session on the rig; the rig's answer to ``stop`` (``recording``: its path on the rig)."""
    config = day.config
    recorded = store.read_presentations()
    window = config.response.window_s
    monitor = SessionMonitor(store.n_stimuli * config.rsvp.repetitions, store.n_sites, window[1] - window[0],
                             n_valid=int(recorded["valid"].sum()), n_done=len(recorded["id"]),
                             rates_window_s=config.dashboard.window_s)
    watch = SessionWatch(config.dashboard, list(make_site_table(config).label), window[1] - window[0])
    if store.has_live_counts:  # a session resumed after a crash: the day's start is what was stored first
        for valid, counts in zip(recorded["valid"], recorded["counts"], strict=True):
            watch.add({"valid": bool(valid), "counts": counts})
    with day.rig.connect(config, day.folder, n_sites=config.sites.n_sites) as client:
        if _session_over(client, day.path(layout.BUNDLE)):
            logger.warning("present: the rig's session of this day was already stopped; collecting its recording")
            return {"recording": None}
        client.load_bundle(day.path(layout.BUNDLE))
        monitor.attach(client)
        with _display(day, monitor, watch):
            _run(client, monitor, watch, store, store.n_stimuli, config, day.seed("present"))
        return client.stop()
