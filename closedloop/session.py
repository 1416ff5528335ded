"""Stage 4 of a day: present the day's stimuli on the rig and record every outcome.

The shuffled RSVP list goes to the rig named by ``[rig]`` (for ``kind = "sim"`` the simulated IT
rig is started on loopback for the session, with CURVE keys made on first use); every outcome is
appended to the day store as it arrives, so a crash loses nothing and a rerun resumes with the
presentations already stored (:func:`closedloop.present.run_presentations`). The operator sees a
live view on a terminal (presentations, valid and fixation-break rates, ETA, link health,
per-site mean rates) and plain log lines otherwise.
"""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from closedloop.config import ExperimentConfig
from closedloop.logs import logger
from closedloop.store import open_store

__all__ = ["run_day_session", "SessionMonitor", "open_rig_address"]

RIG_STATE = "rig_sim"


class SessionMonitor:
    """What the operator watches during ``present``; ``update`` per outcome, ``render`` for display.

    ``n_target``: valid presentations needed (n_stimuli × repetitions); ``window_s``: response
    window length, s (to turn counts into rates, Hz).
    """

    def __init__(self, n_target: int, n_sites: int, window_s: float, *, n_valid: int = 0, n_done: int = 0) -> None:
        self.n_target, self.window_s = n_target, window_s
        self.n_done, self.n_valid, self.n_new, self.n_valid_before = n_done, n_valid, 0, n_valid
        self.rate_sum = np.zeros(n_sites)
        self.started = time.monotonic()
        self.link_s = 0.0

    def update(self, outcome: dict) -> None:
        self.n_done += 1
        self.n_new += 1
        if outcome["valid"]:
            self.n_valid += 1
            self.rate_sum += np.asarray(outcome["counts"], dtype=float) / self.window_s

    def facts(self) -> dict:
        elapsed = time.monotonic() - self.started
        per_valid = elapsed / max(self.n_valid - self.n_valid_before, 1)
        remaining = max(self.n_target - self.n_valid, 0)
        return {
            "presentations": self.n_done,
            "valid": self.n_valid,
            "target_valid": self.n_target,
            "valid_rate": self.n_valid / self.n_done if self.n_done else float("nan"),
            "fixation_break_rate": 1 - self.n_valid / self.n_done if self.n_done else float("nan"),
            "eta_s": remaining * per_valid if self.n_new else float("nan"),
            "link_silent_s": self.link_s,
            "mean_rate_hz": (self.rate_sum / max(self.n_valid, 1)).round(1).tolist(),
        }

    def render(self):
        from rich.table import Table

        facts = self.facts()
        table = Table(title="present", show_header=False)
        table.add_row("presentations", f"{facts['presentations']} ({facts['valid']}/{facts['target_valid']} valid)")
        table.add_row("valid / fixation breaks", f"{facts['valid_rate']:.0%} / {facts['fixation_break_rate']:.0%}")
        table.add_row("ETA", f"{facts['eta_s']:.0f} s" if np.isfinite(facts["eta_s"]) else "…")
        health = "ok" if facts["link_silent_s"] < 2.0 else f"silent {facts['link_silent_s']:.1f} s"
        table.add_row("rig link", health)
        rates = facts["mean_rate_hz"]
        table.add_row("mean rate per site (Hz)", " ".join(f"{r:.0f}" for r in rates[:24]) + (" …" if len(rates) > 24 else ""))
        return table


@contextmanager
def open_rig_address(config: ExperimentConfig, folder: Path):
    """Yield the address of the rig to talk to; for a simulated rig, run one for the duration (its
    state in ``folder/rig_sim``)."""
    if config.rig.kind != "sim":
        yield config.rig.address
        return
    from rigs.sim import compute_hidden_site_options, run_sim_rig

    if config.rig.security == "curve" and not (Path(config.rig.keys_dir) / "control.key_secret").exists():
        from closedloop.keys import make_keys

        make_keys(config.rig.keys_dir)
    started, stop, agents = threading.Event(), threading.Event(), []

    def remember(agent) -> None:
        agents.append(agent)
        started.set()

    thread = threading.Thread(target=run_sim_rig, args=(stop,), daemon=True, kwargs=dict(
        on_start=remember, address="tcp://127.0.0.1:*", state_dir=folder / RIG_STATE,
        n_sites=config.sites.n_sites, seed=config.sim.seed, time_scale=config.sim.time_scale,
        on_s=config.rsvp.on_s, off_s=config.rsvp.off_s, fixation_break_rate=config.sim.fixation_break_rate,
        security=config.rig.security, keys_dir=config.rig.keys_dir,
        heartbeat_s=config.rig.heartbeat_s, timeout_s=config.rig.timeout_s,
        hidden=compute_hidden_site_options(config),
    ))
    thread.start()
    if not started.wait(30):
        stop.set()
        raise RuntimeError("the simulated rig did not start within 30 s")
    try:
        yield agents[-1].address
    finally:
        stop.set()
        thread.join(30)


def _run(client, monitor: SessionMonitor, store, n_stimuli: int, config: ExperimentConfig, seed: int) -> dict:
    from closedloop.present import run_presentations

    def on_result(outcome: dict) -> None:
        store.append_presentations(
            [outcome["presentation_id"]], [outcome["stimulus_id"]], [outcome["onset_s"]], [bool(outcome["valid"])],
            np.asarray(outcome["counts"], dtype=np.int64)[None, :],
        )
        monitor.update(outcome)
        monitor.link_s = client.seconds_since_heard

    recorded = store.read_presentations()
    return run_presentations(
        client, np.arange(n_stimuli), repetitions=config.rsvp.repetitions, seed=seed, on_result=on_result,
        already_recorded=(recorded["id"], recorded["stimulus"], recorded["valid"]),
    )


@contextmanager
def _display(monitor: SessionMonitor, every_s: float = 0.5, log_every_s: float = 10.0):
    """Show ``monitor`` while the block runs: a live table on a terminal, else a log line now and then."""
    import sys

    from rich.live import Live

    done = threading.Event()
    if sys.stderr.isatty():
        live = Live(monitor.render(), refresh_per_second=2, console=None)

        def refresh() -> None:
            while not done.wait(every_s):
                live.update(monitor.render())
    else:
        live = None

        def refresh() -> None:
            while not done.wait(log_every_s):
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


def run_day_session(config: ExperimentConfig, folder: str | Path, *, seed: int) -> dict:
    """Present the day in ``folder`` (its ``stimuli.h5`` and ``store.zarr``) on the configured rig.

    Every outcome goes into the store at once; resumable. For a simulated rig the recording it
    writes is copied to ``folder/recording.nev``. Returns a summary (presentations, valid,
    fixation breaks, seconds, recording path on the rig).
    """
    from closedloop.link import make_rig_client

    folder = Path(folder)
    store = open_store(folder / "store.zarr", mode="a")
    recorded = store.read_presentations()
    window = config.response.window_s
    monitor = SessionMonitor(store.n_stimuli * config.rsvp.repetitions, store.n_sites, window[1] - window[0],
                             n_valid=int(recorded["valid"].sum()), n_done=len(recorded["id"]))
    with open_rig_address(config, folder) as address:
        rig = config.rig.model_copy(update={"address": address})
        with make_rig_client(rig, window_s=window) as client:
            client.connect()
            client.load_bundle(folder / "stimuli.h5")
            with _display(monitor):
                result = _run(client, monitor, store, store.n_stimuli, config, seed)
            stopped = client.stop()
    if config.rig.kind == "sim":
        shutil.copyfile(folder / RIG_STATE / "recording.nev", folder / "recording.partial.nev")
        (folder / "recording.partial.nev").rename(folder / "recording.nev")
    store.finish()
    facts = monitor.facts()
    logger.info("present: %d presentations, %d valid (%.0f%%)", facts["presentations"], facts["valid"],
                100 * facts["valid_rate"])
    return {**result, "n_presentations": store.n_presentations, "recording_on_rig": stopped.get("recording")}
