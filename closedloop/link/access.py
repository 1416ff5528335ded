"""How a day reaches its rig: the address to talk to, and what only a simulated rig can add.

The day runner never starts a rig itself. It is handed a :class:`RigAccess`: this plain one
talks to the rig at the ``[rig] address`` of the experiment (a rig agent on the display computer,
started there); :class:`rigs.launch.RigLauncher` also starts the simulated rig for
``[rig] kind = "sim"``, copies its recording into the day folder and knows its sites' truth.
Entry points (the CLI, the demo) choose which one to pass, so the loop's code depends on no rig.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from closedloop.link.client import RigClient, make_rig_client

__all__ = ["RigAccess"]


class RigAccess:
    """The rig at the configured address; subclass to start rigs or to add validation truth."""

    @contextmanager
    def open(self, config, folder: Path) -> Iterator[str]:
        """Yield the ZeroMQ address of the rig for a session of the day in ``folder``."""
        if config.rig.kind == "sim":
            raise ValueError(
                "[rig] kind = 'sim' needs the simulated rig, which this caller does not start; run the day with "
                "`closedloop fit-day`, or pass rig=rigs.RigLauncher() to closedloop.day.run_day"
            )
        if config.rig.kind == "files":
            raise ValueError(
                "[rig] kind = 'files' hands the RSVP list over as files: there is no rig link to open; set [rig] kind = "
                "'zmq' for a rig agent"
            )
        yield config.rig.address

    @contextmanager
    def connect(self, config, folder: Path, *, n_sites: int | None = None) -> Iterator[RigClient]:
        """A client of the day's rig that has said hello (:meth:`open`, then ``hello``), closed afterwards.

        ``n_sites``: the sites the day expects (``config.sites.n_sites``); a rig that records another
        number is refused at hello with a ``ValueError`` naming both, before any bundle is sent. The
        hello carries the experiment's ``[rsvp]`` timing and image size, which a display rig shows (or
        refuses at hello, saying why: docs/rig.md).
        """
        rsvp = {"on_s": config.rsvp.on_s, "off_s": config.rsvp.off_s, "image_size_deg": config.rsvp.image_size_deg}
        with self.open(config, folder) as address:
            rig = config.rig.model_copy(update={"address": address})
            with make_rig_client(rig, window_s=config.response.window_s, n_sites=n_sites, rsvp=rsvp) as client:
                client.connect()
                yield client

    def collect_recording(self, config, folder: Path) -> None:
        """Put the session's recording into the day folder, where the rig wrote it elsewhere (a real
        rig's ``.nev`` is copied in by the operator: nothing to do)."""

    def compute_truth(self, config, store_path: Path, *, seed: int, device) -> tuple | None:
        """``(sensitivity(site, eps), expected_counts)`` of a simulated rig's sites; None for a real rig."""
        return None
