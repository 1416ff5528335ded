"""What every stage of a day is handed: the experiment, the day, its folder, config, seeds, rig and ranks."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from closedloop.config import ExperimentConfig
from closedloop.core.distributed import ProcessGroup
from closedloop.core.provenance import derive_seed
from closedloop.data import layout
from closedloop.data.sites import SiteTable, make_default_sites, read_site_map
from closedloop.images import read_image_source
from closedloop.link.access import RigAccess
from models import make_it_model, read_it_model
from models.devices import resolve_device

__all__ = ["DayContext", "make_site_table"]

_LOG_LOCK = threading.Lock()  # the stage runner and the present stage's live thread both append


@dataclass
class DayContext:
    """Everything a stage needs: the experiment, the day number and its folder, the config, the rig,
    and the ``torchrun`` ranks that share the synthesize stage (``group``; one process by default)."""

    experiment: Path
    number: int
    config: ExperimentConfig
    folder: Path
    rig: RigAccess = field(default_factory=RigAccess)
    group: ProcessGroup = field(default_factory=ProcessGroup)

    def path(self, name: str) -> Path:
        """A file of the day folder (a name from :mod:`closedloop.data.layout`)."""
        return self.folder / name

    def log_event(self, **event) -> None:
        """Append one event to the day's ``log.jsonl``: a JSON line with ``time_utc`` and ``day`` first
        (stage start and end, warnings, alarms; docs/dashboard.md lists them)."""
        event = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "day": self.number, **event}
        line = json.dumps(event) + "\n"
        with _LOG_LOCK, self.path(layout.LOG).open("a", encoding="utf-8") as stream:
            stream.write(line)

    def seed(self, stage: str) -> int:
        """The seed of ``stage`` on this day, derived from the experiment's master seed."""
        return derive_seed(self.config.experiment.seed, self.number, stage)

    @cached_property
    def images(self):
        """The experiment's image pool (:class:`~closedloop.images.ImageSet`)."""
        images = self.config.images
        return read_image_source(images.source, per_photo=images.embedded_per_photo, seed=self.config.experiment.seed)

    @cached_property
    def device(self):
        """The torch device of ``[model] device``; under ``torchrun``, GPU ``LOCAL_RANK`` (modulo
        the GPUs present, so ranks may share a GPU)."""
        device = resolve_device(self.config.model.device)
        if device.type == "cuda" and self.group.world_size > 1:
            device = torch.device("cuda", self.group.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device

    def previous_model_path(self) -> Path:
        """Day N−1's fitted model."""
        return layout.day_folder(self.experiment, self.number - 1) / layout.MODEL

    def earlier_days(self) -> list[Path]:
        """The folders of days 0..N−1."""
        return [layout.day_folder(self.experiment, d) for d in range(self.number)]

    def generating_model(self):
        """The model that makes today's attacks: day N−1's fitted model; on day 0 the base backbone
        with a random readout."""
        if self.number == 0:
            model = self.config.model
            return make_it_model(
                model.backbone, model.layer, self.config.sites.n_sites, trust=model.trust_checkpoint,
                positive=model.readout_positive, seed=layout.compute_base_seed(self.config),
            )
        return read_it_model(self.previous_model_path())  # run_day checked that it exists


def make_site_table(config: ExperimentConfig) -> SiteTable:
    """The experiment's sites: ``[sites] site_map`` when given (it must define ``n_sites`` sites),
    else one site per electrode 1..n_sites."""
    if config.sites.site_map:
        sites = read_site_map(config.sites.site_map)
        if sites.n_sites != config.sites.n_sites:
            raise ValueError(
                f"[sites] site_map {config.sites.site_map!r} defines {sites.n_sites} sites but n_sites = "
                f"{config.sites.n_sites}; make them agree"
            )
        return sites
    return make_default_sites(config.sites.n_sites)
