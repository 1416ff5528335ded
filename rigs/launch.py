"""The simulated rig as a day's rig: started on loopback for a session, its recording and truth.

:class:`RigLauncher` is the :class:`~closedloop.link.access.RigAccess` that entry points hand
to the day runner: for ``[rig] kind = "sim"`` it runs the simulated IT rig in a thread for the
session (state in ``<day>/rig_sim``, CURVE keys made on first use), copies its ``.nev`` into the
day folder (unless ``[sim] live_counts = false``: then, as with a real presenter, the operator
copies it and the day waits until then), and gives the estimate stage the sites' true sensitivity (validation only); for a
real rig it behaves like the plain access.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from closedloop.data import layout
from closedloop.link.access import RigAccess
from closedloop.link.keys import make_keys
from rigs.sim import compute_sim_rig_options, run_sim_rig
from rigs.truth import compute_sim_truth

__all__ = ["RigLauncher", "open_sim_rig"]


@contextmanager
def open_sim_rig(config, state_dir: Path) -> Iterator[str]:
    """Run the experiment's simulated rig on loopback for the duration; yield its address.

    ``state_dir``: the rig's session state and ``.nev``. Keys for ``security = "curve"`` are made
    in ``[rig] keys_dir`` when missing.
    """
    if config.rig.security == "curve" and not (Path(config.rig.keys_dir) / "control.key_secret").exists():
        make_keys(config.rig.keys_dir)
    started, stop, agents = threading.Event(), threading.Event(), []

    def remember(agent) -> None:
        agents.append(agent)
        started.set()

    options = compute_sim_rig_options(config, address="tcp://127.0.0.1:*", state_dir=state_dir)
    thread = threading.Thread(target=run_sim_rig, args=(stop,), daemon=True, kwargs=dict(on_start=remember, **options))
    thread.start()
    if not started.wait(30):
        stop.set()
        raise RuntimeError("the simulated rig did not start within 30 s")
    try:
        yield agents[-1].address
    finally:
        stop.set()
        thread.join(30)


class RigLauncher(RigAccess):
    """A day's rig, starting the simulated one when the experiment asks for it (``[rig] kind = "sim"``)."""

    @contextmanager
    def open(self, config, folder: Path) -> Iterator[str]:
        if config.rig.kind != "sim":
            with super().open(config, folder) as address:
                yield address
            return
        with open_sim_rig(config, Path(folder) / layout.RIG_STATE) as address:
            yield address

    def collect_recording(self, config, folder: Path) -> None:
        if config.rig.kind != "sim" or not config.sim.live_counts:
            return
        folder = Path(folder)
        partial = folder / "recording.partial.nev"
        shutil.copyfile(folder / layout.RIG_STATE / layout.RECORDING, partial)
        partial.rename(folder / layout.RECORDING)

    def compute_truth(self, config, store_path: Path, *, seed: int, device) -> tuple | None:
        if config.rig.kind != "sim":
            return None
        return tuple(compute_sim_truth(config, store_path, seed=seed, device=device))
