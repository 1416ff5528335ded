"""The experiment configuration: one ``experiment.toml`` per experiment, validated on load.

Every field has a documented default; :func:`write_default_config` writes a commented file with
them (``closedloop init DIR``). Unknown keys, wrong types, out-of-range values and missing paths
are refused with a message naming the key, the bad value and what is allowed. Numbers and
booleans are strict: ``"4"``, ``true`` or ``["3"]`` is never taken for a number (a whole number is
accepted where a float is expected), and ``inf``/``nan`` are refused. Relative paths in the file are
relative to the folder that holds it; :func:`make_relative_paths` writes a config whose paths
inside a folder are relative (a day's frozen config, so that a moved experiment folder resumes) and
:func:`resolve_paths` reads them back. :func:`write_config_targets` changes ``[sites] targets`` in
place, keeping the rest of the file (and its comments) as it was.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import textwrap
import tomllib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from closedloop.core.files import write_text
from closedloop.core.validation import check_option
from models.backbones import registered_backbones

__all__ = [
    "ExperimentConfig",
    "read_config",
    "build_config",
    "render_config",
    "write_default_config",
    "write_preset_config",
    "format_config_error",
    "ConfigSection",
    "validate_config",
    "read_toml_config",
    "resolve_paths",
    "make_relative_paths",
    "PRESETS",
    "CONFIG_NAME",
    "DAY_INDEPENDENT_SECTIONS",
    "NWB_REQUIRED",
    "write_config_targets",
]

CONFIG_NAME = "experiment.toml"
EMBEDDED = "embedded"


class ConfigSection(BaseModel):
    """Base of every configuration and its sections: unknown keys refused, frozen, defaults validated.

    Strict: a number or boolean must be written as one (``"4"``, ``true`` or ``4.5`` is not an
    integer; a whole number is a float); ``inf`` and ``nan`` are refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)

    def to_dict(self) -> dict:
        """The configuration as plain TOML-ready data."""
        return self.model_dump(mode="json")


class _KeyValueError(ValueError):
    """A value refused by a check across keys: names the one key and value that it is about.

    Raised inside a validator of a section (or of the whole config); ``key`` is relative to it,
    e.g. "targets" in [sites]. :func:`format_config_error` shows "'sites.targets' = [0, 5]: …"
    rather than the section (or the whole config) that the validator was handed.
    """

    def __init__(self, key: str, value, message: str) -> None:
        super().__init__(message)
        self.key, self.value = key, value


class ExperimentSection(ConfigSection):
    """[experiment]: names and seeds."""

    name: str = Field("experiment", min_length=1, description="Name of the experiment; used in logs and reports.")
    seed: int = Field(0, ge=0, description="Master seed; every stage of every day derives its own seed from it.")


class ImagesSection(ConfigSection):
    """[images]: where clean images come from."""

    source: str = Field(
        EMBEDDED,
        description='"embedded" (natural photographs shipped with scikit-image, no download) or a folder '
        "in ImageFolder layout (one sub-folder per category, e.g. ImageNet's train/).",
    )
    n_clean_day0: int = Field(
        1000, ge=1, description="Day 0: clean images shown, one per category in turn (round robin), up to this many."
    )
    n_clean_per_day: int = Field(
        42,
        ge=1,
        description="Clean images attacked each day, every targeted site at every budget; later days show only "
        "these (never reusing an earlier day's clean image).",
    )
    embedded_per_photo: int = Field(
        40, ge=1, le=500, description="Embedded source only: random crops/flips/scales made from each photograph."
    )


class ModelSection(ConfigSection):
    """[model]: the IT model (backbone cut at a layer + factorized readout)."""

    backbone: str = Field(
        "resnet50",
        description="A registered name (resnet50, wide_resnet50_2, resnet_tiny; random weights) or a checkpoint "
        "path: a robustness-library .pt, a torchvision state dict, or a closedloop .safetensors.",
    )
    layer: str = Field("layer4.0", description="Backbone layer whose feature map feeds the readout.")
    trust_checkpoint: bool = Field(
        False, description="Allow full unpickling of a .pt checkpoint (runs code from the file: only for files you trust)."
    )
    readout_positive: bool = Field(False, description="Constrain readout channel and spatial weights to be >= 0.")
    readout_l1: float = Field(0.0, ge=0.0, description="Weight of the L1 penalty on the readout's mask x channel product.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description='"auto" uses CUDA when available.')


class SitesSection(ConfigSection):
    """[sites]: the recorded sites."""

    n_sites: int = Field(21, ge=1, description="Number of recorded sites the model predicts.")
    site_map: str = Field(
        "",
        description='CSV with columns site,array,electrode,unit,label mapping Blackrock units to sites; "" means '
        "one site per electrode, all units merged.",
    )
    targets: list[int] = Field([], description="Sites to attack (0-based); [] attacks every site.")

    @model_validator(mode="after")
    def _targets_exist(self) -> SitesSection:
        bad = [t for t in self.targets if not 0 <= t < self.n_sites]
        if bad:
            raise _KeyValueError(
                "targets", self.targets,
                f"sites {bad} do not exist; allowed are 0..{self.n_sites - 1} (n_sites = {self.n_sites})",
            )
        return self


class AttackSection(ConfigSection):
    """[attack]: per-site L2 PGD attacks (Guo et al.)."""

    budgets: list[float] = Field(
        [1.0, 2.0, 4.0, 6.0, 10.0],
        min_length=1,
        description="L2 budgets in paper-equivalent units: the attacks use eps = budget x paper_scale, in [0,1] pixel "
        "units over 3x224x224 values (one pixel black->white = 1.73). With paper_scale = 1 the two are the same.",
    )
    paper_scale: float = Field(
        1.0, gt=0.0, le=100.0,
        description="Pixel eps per paper eps (k): how many times less sensitive the base model's family is than the "
        "paper's AT-ResNet-50 on ImageNet, measured by `closedloop rig-sim --calibration` (docs/riglink.md). 1 for a "
        "real ImageNet checkpoint; the embedded resnet_tiny family needs more.",
    )
    steps: int = Field(100, ge=1, description="PGD iterations per attack.")
    step_ratio: float = Field(1 / 3, gt=0.0, le=2.0, description="PGD step size as a fraction of eps (paper: eps/3).")
    step_rule: Literal["pgd", "apgd"] = Field(
        "pgd",
        description='"pgd": the paper\'s fixed step (step_ratio x eps); "apgd": APGD\'s step schedule with momentum '
        "(Croce & Hein 2020; starts at 2 eps, halves on stalls, ignores step_ratio), which reaches the 100-step PGD "
        "objective in fewer steps at large budgets (docs/attacks.md).",
    )
    choose_direction_at: int = Field(
        0, ge=0,
        description="After this many steps each job keeps only the direction (increase or decrease) that has moved its "
        "site more so far and stops the other (2 <= it < steps; about half the work); 0: both directions to the end, "
        "the paper's. Early choices can be wrong at large budgets (docs/attacks.md).",
    )
    random_start: bool = Field(True, description="Start each attack from a random point in the eps-ball.")
    restarts: int = Field(1, ge=1, description="Random restarts per attack; the best is kept.")
    baselines: list[Literal["gaussian", "interpolation"]] = Field(
        ["gaussian", "interpolation"], description="Model-free baselines made at the same budgets."
    )
    batch_size: int = Field(
        0, ge=0, description="Images per attack batch; 0 sizes batches to the device memory (32 on CPU)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description='Arithmetic of the attack steps: "auto" = bf16 autocast where the device runs bf16 natively '
        '(CUDA GPUs from compute capability 8.0, CPUs with AVX-512 BF16/AMX), else fp32; "fp32" or "bf16" force it. '
        "Rounding, budgets and predictions are fp32 either way.",
    )
    part_size: int = Field(
        64, ge=1, description="Attack jobs saved to disk together while synthesizing (a crash loses at most one part)."
    )

    @field_validator("budgets")
    @classmethod
    def _positive_budgets(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if not (math.isfinite(b) and b > 0)]
        if bad:
            raise ValueError(f"every budget must be a finite number > 0; bad values: {bad}")
        return sorted(set(budgets))

    @model_validator(mode="after")
    def _choice_inside_the_steps(self) -> AttackSection:
        if self.choose_direction_at and not 2 <= self.choose_direction_at < self.steps:
            raise _KeyValueError("choose_direction_at", self.choose_direction_at,
                                 f"must lie in [2, steps - 1] = [2, {self.steps - 1}], or be 0 (no early choice)")
        return self


class RSVPSection(ConfigSection):
    """[rsvp]: rapid serial visual presentation."""

    on_s: float = Field(0.1, gt=0.0, le=5.0, description="Image on time, s.")
    off_s: float = Field(0.1, ge=0.0, le=5.0, description="Grey screen between images, s.")
    image_size_deg: float = Field(8.0, gt=0.0, le=60.0, description="Image size on the screen, degrees of visual angle.")
    repetitions: int = Field(2, ge=1, description="Valid (fixation held) presentations required per stimulus.")


class ResponseSection(ConfigSection):
    """[response]: how spikes become a response."""

    window_s: tuple[float, float] = Field(
        (0.07, 0.17), description="Spike-count window [start, stop) after image onset, s."
    )

    @field_validator("window_s", mode="before")
    @classmethod
    def _list_as_pair(cls, window):
        return tuple(window) if isinstance(window, list) else window  # TOML has arrays, not tuples

    @field_validator("window_s")
    @classmethod
    def _ordered_window(cls, window: tuple[float, float]) -> tuple[float, float]:
        start, stop = window
        if not (0.0 <= start < stop <= 5.0):
            raise ValueError(f"need 0 <= start < stop <= 5 s; got [{start}, {stop}]")
        return window


class RigSection(ConfigSection):
    """[rig]: the link to the rig."""

    kind: Literal["sim", "zmq", "files"] = Field(
        "zmq", description='"zmq": a rig agent at `address`; "sim": start the simulated IT rig on loopback; "files": '
        "a rig that runs its own software (MWorks, MonkeyLogic, Psychtoolbox): fit-day writes the RSVP list into the day "
        "folder and waits for the NSP's .nev (docs/rig.md).",
    )
    address: str = Field("tcp://127.0.0.1:5555", description="ZeroMQ endpoint of the rig agent's command socket.")
    security: Literal["curve", "plain"] = Field(
        "curve", description='"curve": encrypted and authenticated (default); "plain": unencrypted TCP, trusted networks only.'
    )
    keys_dir: str = Field("keys", description="Folder with this side's CURVE key pair and the allowed rig public keys.")
    heartbeat_s: float = Field(1.0, gt=0.0, le=60.0, description="Heartbeat interval, s.")
    timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="A peer silent this long is considered dead, s.")
    retries: int = Field(3, ge=1, le=100, description="Tries per command (same request id; the rig answers a repeat once).")
    reconnect_s: float = Field(
        60.0, ge=0.0, le=3600.0, description="Keep reconnecting (with back-off) to a vanished rig this long before giving up, s."
    )

    @field_validator("address")
    @classmethod
    def _zmq_endpoint(cls, address: str) -> str:
        found = re.fullmatch(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d+)", address)
        if not (found and 1 <= int(found[2]) <= 65535) and not re.fullmatch(r"ipc://\S+", address):
            raise ValueError("must be a ZeroMQ endpoint tcp://HOST:PORT (port 1-65535), e.g. tcp://192.168.1.20:5555")
        return address

    @model_validator(mode="after")
    def _heartbeat_within_timeout(self) -> RigSection:
        if self.heartbeat_s >= self.timeout_s:
            raise _KeyValueError(
                "heartbeat_s", self.heartbeat_s,
                f"must be shorter than timeout_s ({self.timeout_s} s), or a live rig is taken for a dead one; "
                "e.g. heartbeat_s = timeout_s / 5",
            )
        return self


class SimSection(ConfigSection):
    """[sim]: the simulated IT rig (used when [rig] kind = "sim", by `closedloop rig-sim` and the demo)."""

    seed: int = Field(1, ge=0, description="Seed of the simulated monkey's hidden sites (the same every day).")
    weight_noise: float = Field(
        0.0, ge=0.0, le=10.0,
        description="Noise on the copy of the base backbone that the simulated sites read, in units of each convolution "
        "weight's standard deviation (a mismatch the loop's model can hardly learn).",
    )
    nonrobust_backbone: str = Field(
        "resnet_tiny", description="The non-robust network whose features the sites also read (a backbone name: random "
        "weights from [sim] seed; or a checkpoint path).",
    )
    nonrobust_fraction: float = Field(
        0.02, ge=0.0, lt=1.0,
        description="Share of the sites' drive variance that comes from the non-robust network: the calibrated mismatch "
        "knob (it sets how sensitive the sites are; the loop's model learns it only in part, by refitting its backbone).",
    )
    nonrobust_input_size: int = Field(
        56, ge=0, le=224,
        description="Input size, px, at which the non-robust network sees the 224 px image (area-downsampled; 0 = its own).",
    )
    threshold: float = Field(
        1.0, ge=-10.0, le=10.0,
        description="Rectifier threshold of the sites' rate function, in s.d. of their drive over natural images.",
    )
    max_rate_hz: float = Field(
        500.0, ge=450.0, le=2000.0,
        description="Ceiling of the sites' rate, Hz: the stimulus-driven rate saturates smoothly towards it (IT multi-unit "
        "sites do not fire at 1000 Hz); at least 450 (the highest preferred rate, 400, plus the highest baseline, 30).",
    )
    driven_fraction: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Fraction of the sites (electrodes) that carry a visually driven, reliable site; the others carry "
        "multi-unit activity the images barely move (a Utah array's day 0). 1 = every site driven.",
    )
    undriven_gain: float = Field(
        0.03, ge=0.0, le=1.0,
        description="Sites not driven respond with a gain drawn from [0, undriven_gain] times a driven site's "
        "stimulus-driven rate (0 = baseline only). 0.03: at most a few Hz of the calibrated twin's drive "
        "(preferred ~216 Hz); 0.1 already makes a weakly but reliably driven site.",
    )
    time_scale: float = Field(
        1.0, ge=0.0, le=10.0, description="Real seconds per recording-clock second (0.01 runs 100x faster than real time)."
    )
    fixation_break_rate: float = Field(
        0.05, ge=0.0, le=0.9, description="Probability that a presentation ends in a fixation break."
    )
    silent_sites: list[int] = Field(
        [],
        description="Sites (0-based) whose electrode dies part-way through each session: from presentation "
        "silent_after on they record no spikes at all (to try the dashboard's silent-site alarm; docs/dashboard.md).",
    )
    silent_after: int = Field(0, ge=0, description="The presentation id from which the silent_sites record nothing.")
    live_counts: bool = Field(
        True,
        description="Stream spike counts with each outcome; false: outcomes only, like a real presenter, and the day "
        "waits until the simulated NSP's .nev (day_NNN/rig_sim/recording.nev) is copied into the day folder.",
    )
    truth_starts: int = Field(
        4, ge=1,
        description="Validation only: random starts per direction of the white-box solver giving each site's true sensitivity.",
    )
    truth_steps: int = Field(60, ge=2, description="Validation only: steps of that solver.")
    truth_step_rule: Literal["pgd", "apgd"] = Field(
        "pgd",
        description='Validation only: that solver\'s step rule, "pgd" (the paper\'s adaptive step for network units) or '
        '"apgd" (APGD\'s schedule with momentum: at 30 steps 98% of a 100-step solve where "pgd" reaches 94%, at the '
        "same cost; docs/attacks.md).",
    )
    truth_images: int = Field(
        0, ge=0,
        description="Validation only: solve the truth on at most this many of each budget's attacked clean images, a "
        "seeded random subsample shared by the sites (0: all). Unbiased for the mean over images, at that fraction of "
        "the cost; the validation campaign uses 14 of its 42 (docs/validate.md).",
    )
    truth_choose_direction_at: int = Field(
        0, ge=0,
        description="Validation only: after this many steps of the solver's first phase each (image, site) keeps only "
        "the direction that has moved it more and stops the other (2 <= it < truth_steps // 2); 0: both to the end. "
        'With truth_step_rule = "apgd", 20 steps and 3: the 30-step paper rule\'s strength in half its time '
        "(docs/attacks.md).",
    )

    @field_validator("silent_sites")
    @classmethod
    def _distinct_sites(cls, sites: list[int]) -> list[int]:
        if any(site < 0 for site in sites) or len(set(sites)) != len(sites):
            raise ValueError("must list distinct site indices >= 0, e.g. [3] or [0, 5]")
        return sites

    @model_validator(mode="after")
    def _choice_inside_the_first_phase(self) -> SimSection:
        if self.truth_choose_direction_at and not 2 <= self.truth_choose_direction_at < self.truth_steps // 2:
            raise _KeyValueError("truth_choose_direction_at", self.truth_choose_direction_at,
                                 f"must lie in [2, truth_steps // 2 - 1] = [2, {self.truth_steps // 2 - 1}], or be 0")
        return self

    @model_validator(mode="after")
    def _fraction_needs_network(self) -> SimSection:
        if self.nonrobust_fraction > 0 and not self.nonrobust_backbone:
            raise _KeyValueError(
                "nonrobust_fraction", self.nonrobust_fraction,
                "needs nonrobust_backbone (a backbone name or checkpoint path); set one, or nonrobust_fraction = 0",
            )
        return self


class DashboardSection(ConfigSection):
    """[dashboard]: `closedloop dashboard` and the present stage's alarms (docs/dashboard.md)."""

    host: str = Field("127.0.0.1", min_length=1, description="Address the dashboard binds to; any other than loopback "
                      "requires the access token printed at start on every request.")
    port: int = Field(8050, ge=1, le=65535, description="Port of the dashboard.")
    window_s: float = Field(60.0, gt=0.0, le=3600.0, description="Sliding window of the live rates (presentations per "
                            "minute, valid fraction, fixation-break rate), s.")
    silent_presentations: int = Field(
        50, ge=5, le=100_000,
        description="A site with no spike in its last this many valid presentations raises the silent-site alarm; at "
        "baseline, the site-at-baseline alarm (see baseline_fraction).",
    )
    baseline_fraction: float = Field(
        0.25, gt=0.0, lt=1.0,
        description="A site whose mean rate over its last silent_presentations valid presentations has fallen below this "
        "fraction of its rate over the day's first silent_presentations is at baseline (an electrode losing its unit).",
    )
    min_reference_rate_hz: float = Field(
        5.0, ge=0.0, description="Sites whose rate over the day's first presentations is below this, Hz, raise neither "
        "site alarm (a channel dead from the start is not dying).",
    )
    max_fixation_break_rate: float = Field(
        0.3, gt=0.0, le=1.0,
        description="Fixation-break rate over the window above which the monkey is taken to have stopped working.",
    )
    rig_silent_s: float = Field(10.0, gt=0.0, le=3600.0, description="Seconds without a word from the rig that raise "
                                "the rig-silent alarm.")
    min_free_gb: float = Field(5.0, ge=0.0, description="Free space on the experiment's disk below which the "
                               "disk-low alarm is raised, GB (10^9 bytes).")
    alarm_hold_s: float = Field(10.0, ge=0.0, le=3600.0, description="An alarm is cleared only once its condition has "
                                "not held for this long, s (one that flickers at its threshold stays one alarm).")


class FitSection(ConfigSection):
    """[fit]: end-to-end refitting of the IT model after each day."""

    loss: Literal["poisson", "mse"] = Field("poisson", description="Training loss on spike counts.")
    epochs: int = Field(30, ge=1, description="Maximum passes over the data.")
    learning_rate: float = Field(1e-2, gt=0.0, description="Adam learning rate of the readout.")
    backbone_learning_rate: float = Field(1e-5, ge=0.0, description="Adam learning rate of the backbone.")
    batch_size: int = Field(32, ge=1, description="Images per training step.")
    held_out_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Fraction of images held out for early stopping.")
    patience: int = Field(5, ge=1, description="Epochs without held-out improvement before stopping.")
    freeze_backbone: bool = Field(False, description="Train only the readout.")


_ISO_DURATION = re.compile(r"P(?!$)(?:(?P<Y>\d+)Y)?(?:(?P<M>\d+)M)?(?:(?P<W>\d+)W)?(?:(?P<D>\d+)D)?"
                           r"(?:T(?=\d)(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?")
# Days per unit of an ISO 8601 duration, for comparing the bounds of an age range: the mean
# Gregorian year and month, so that P12M and P1Y are equal (as the NWB Inspector finds them).
_DAYS = {"Y": Fraction(146097, 400), "M": Fraction(146097, 4800), "W": Fraction(7), "D": Fraction(1),
         "h": Fraction(1, 24), "m": Fraction(1, 1440), "s": Fraction(1, 86400)}
# What DANDI's NWB Inspector (check_subject_species_form, nwbinspector 0.7.2) accepts, verbatim.
_SPECIES = re.compile(r"([A-Z][a-z]* [a-z]+)|(http://purl.obolibrary.org/obo/NCBITaxon_\d+)")
_NCBI_CURIE = re.compile(r"NCBITaxon[:_](\d+)")
NWB_REQUIRED = ("subject_id", "species", "sex", "age")


class NwbSection(ConfigSection):
    """[nwb]: subject and lab for closedloop export-nwb; DANDI needs subject_id, species, sex, age."""

    subject_id: str = Field("", description='The monkey\'s id (no "/"), e.g. "monkeyA". Required for export.')
    species: str = Field(
        "Macaca mulatta",
        description='Latin binomial of the subject\'s species, or its NCBI taxonomy URL '
                    '("http://purl.obolibrary.org/obo/NCBITaxon_9544"). Required for export.',
    )
    sex: Literal["", "M", "F", "U", "O"] = Field(
        "", description='"M", "F", "U" (unknown) or "O" (other). Required for export.'
    )
    age: str = Field(
        "",
        description='Age at the first day, an ISO 8601 duration such as "P5Y" or "P5Y3M", or a range such as "P5Y/P7Y" '
                    '("P5Y/": 5 years or more); each day\'s file gets the age at its session. Required for export '
                    "unless date_of_birth is given.",
    )
    date_of_birth: str = Field("", description='Date of birth, "YYYY-MM-DD"; DANDI takes it instead of an age.')
    experimenter: list[str] = Field([], description='People who ran the sessions, each "Last, First".')
    institution: str = Field("", description="Institution where the experiment was done.")
    lab: str = Field("", description="Lab where the experiment was done.")
    session_description: str = Field(
        "", description='What one day is, in a sentence; "" writes a description of the closed-loop day.'
    )
    location: str = Field("inferior temporal cortex", description="Brain area of the Utah arrays.")

    @field_validator("subject_id")
    @classmethod
    def _no_slash(cls, subject_id: str) -> str:
        if "/" in subject_id:
            raise ValueError(f'must not contain "/" (DANDI uses it in file paths); got {subject_id!r}')
        return subject_id

    @field_validator("species")
    @classmethod
    def _species_form(cls, species: str) -> str:
        if species and not _SPECIES.fullmatch(species):
            curie = _NCBI_CURIE.fullmatch(species)
            fix = f'; write it "http://purl.obolibrary.org/obo/NCBITaxon_{curie[1]}"' if curie else ""
            raise ValueError('must be a Latin binomial such as "Macaca mulatta" (genus capitalised, species in lower '
                             'case) or an NCBI taxonomy URL such as "http://purl.obolibrary.org/obo/NCBITaxon_9544", '
                             f"as DANDI requires{fix}")
        return species

    @field_validator("age")
    @classmethod
    def _iso_duration(cls, age: str) -> str:
        if not age:
            return age
        bounds = age.split("/")
        if len(bounds) > 2 or not all(_ISO_DURATION.fullmatch(bound) for bound in bounds if bound) or not bounds[0]:
            raise ValueError('must be an ISO 8601 duration such as "P5Y" (5 years) or "P70M" (70 months), or a range '
                             'of two such as "P5Y/P7Y" ("P5Y/": 5 years or more)')
        if len(bounds) == 2 and bounds[1] and _count_days(bounds[0]) >= _count_days(bounds[1]):
            raise ValueError(f"an age range must grow: {bounds[0]} is not shorter than {bounds[1]}")
        return age

    @field_validator("date_of_birth", mode="before")
    @classmethod
    def _toml_date(cls, value):
        return value.isoformat() if isinstance(value, datetime.date) else value  # a TOML date (or date-time)

    @field_validator("date_of_birth")
    @classmethod
    def _iso_date(cls, date_of_birth: str) -> str:
        if not date_of_birth:
            return date_of_birth
        rule = 'must be a date written YYYY-MM-DD, such as "2019-04-01"'
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date_of_birth):
            raise ValueError(rule)
        try:
            datetime.date.fromisoformat(date_of_birth)
        except ValueError as error:
            raise ValueError(f"{rule} ({error})") from None
        return date_of_birth

    @field_validator("location")
    @classmethod
    def _named(cls, location: str) -> str:
        if not location.strip():
            raise ValueError('must name the brain area of the arrays, e.g. "inferior temporal cortex"')
        return location

    @field_validator("experimenter")
    @classmethod
    def _last_first(cls, experimenter: list[str]) -> list[str]:
        bad = [name for name in experimenter if "," not in name]
        if bad:
            raise ValueError(f'each experimenter must be written "Last, First"; got {bad}')
        return experimenter

    def find_missing(self) -> list[str]:
        """The DANDI-required fields (:data:`NWB_REQUIRED`) that are still empty (``age`` is not
        missing when ``date_of_birth`` is given)."""
        return [name for name in NWB_REQUIRED if not getattr(self, name) and not (name == "age" and self.date_of_birth)]

    def compute_age(self, days: int) -> str:
        """The configured age (at the first day) ``days`` days later, as an ISO 8601 duration (or
        range, each bound moved): ``"P5Y"`` and 3 give ``"P5Y3D"``; ``""`` when no age is given."""
        return "/".join(_add_days(bound, days) if bound else bound for bound in self.age.split("/")) if self.age else ""


def _count_days(duration: str) -> Fraction:
    """An ISO 8601 duration in days (a year and a month: their mean Gregorian lengths)."""
    parts = _ISO_DURATION.fullmatch(duration).groupdict()
    return sum((Fraction(value) * _DAYS[unit] for unit, value in parts.items() if value), Fraction(0))


def _add_days(duration: str, days: int) -> str:
    """ISO 8601 ``duration`` plus ``days`` whole days, keeping its other parts as written."""
    if days == 0:
        return duration
    match = _ISO_DURATION.fullmatch(duration)
    if match["D"]:
        return f"{duration[:match.start('D')]}{int(match['D']) + days}{duration[match.end('D'):]}"
    at = max([1] + [match.end(unit) + 1 for unit in "YMW" if match[unit]])  # after P and any year, month, week
    return f"{duration[:at]}{days}D{duration[at:]}"


class ExperimentConfig(ConfigSection):
    """The whole experiment configuration (one TOML file)."""

    experiment: ExperimentSection = ExperimentSection()
    images: ImagesSection = ImagesSection()
    model: ModelSection = ModelSection()
    sites: SitesSection = SitesSection()
    attack: AttackSection = AttackSection()
    rsvp: RSVPSection = RSVPSection()
    response: ResponseSection = ResponseSection()
    rig: RigSection = RigSection()
    sim: SimSection = SimSection()
    fit: FitSection = FitSection()
    nwb: NwbSection = NwbSection()
    dashboard: DashboardSection = DashboardSection()

    @model_validator(mode="after")
    def _silent_sites_exist(self) -> ExperimentConfig:
        bad = [site for site in self.sim.silent_sites if site >= self.sites.n_sites]
        if bad:
            n = self.sites.n_sites
            raise _KeyValueError("sim.silent_sites", self.sim.silent_sites,
                                 f"sites {bad} do not exist; allowed are 0..{n - 1} (n_sites = {n})")
        return self


# Sections that do not change what a day makes, left out of a day's frozen config.toml so that
# changing them later never makes a day look reconfigured: [nwb] describes the experiment for
# export, [dashboard] holds the operator's alarm thresholds (they may change while a day runs).
DAY_INDEPENDENT_SECTIONS = ("nwb", "dashboard")

# k of the embedded robust resnet_tiny (the demo's base): the class reference's crossing budget
# is the paper's 4.0 at pixel eps = 4.0 k (`closedloop rig-sim --calibration`, docs/riglink.md).
DEMO_PAPER_SCALE = 6.3

PRESETS: dict[str, dict] = {
    "paper": {},
    "demo": {
        "images": {"n_clean_day0": 48, "n_clean_per_day": 8, "embedded_per_photo": 24},
        "model": {"backbone": "resnet_tiny"},
        "sites": {"n_sites": 8},
        "attack": {"budgets": [1.0, 3.0, 10.0], "steps": 20, "paper_scale": DEMO_PAPER_SCALE},
        "rig": {"kind": "sim"},
        "sim": {"time_scale": 0.0, "fixation_break_rate": 0.05, "truth_starts": 1, "truth_steps": 30},
        "fit": {"epochs": 15, "batch_size": 32, "backbone_learning_rate": 1e-4},
    },
}


def format_config_error(source: str, error: ValidationError, root: type[BaseModel] | None = None) -> str:
    """One message for every problem in ``error``; ``root``: the config class (ExperimentConfig by default)."""
    parts = []
    for item in error.errors():
        location, value = item["loc"], item.get("input")
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, _KeyValueError):
            location, value = (*location, cause.key), cause.value
        key = ".".join(str(p) for p in location)
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(location[:-1], root or ExperimentConfig)
            parts.append(f"unknown key '{key}'; allowed keys here are: {', '.join(allowed)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            # never a whole section or config (what a check across keys is handed): only the value
            shown = "" if item["type"] == "missing" or isinstance(value, dict) else f" = {_show(value)}"
            parts.append(f"'{key}'{shown}: {message}")
    return f"{source}: invalid configuration: " + "; ".join(parts)


def _show(value) -> str:
    """A value as the TOML file wrote it: a date or time as written (not ``datetime.date(…)``), else its repr."""
    return value.isoformat() if isinstance(value, (datetime.date, datetime.time)) else repr(value)


def _allowed_keys(section: tuple, root: type[BaseModel]) -> list[str]:
    model = root
    for name in section:
        annotation = model.model_fields[name].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _path_keys(config: ExperimentConfig) -> list[tuple[str, str]]:
    """The (section, key) pairs that hold a file or folder path in ``config``."""
    keys = [("images", "source")] if config.images.source != EMBEDDED else []
    keys += [("model", "backbone")] if config.model.backbone not in registered_backbones() else []
    keys += [("sites", "site_map")] if config.sites.site_map else []
    nonrobust = config.sim.nonrobust_backbone
    keys += [("sim", "nonrobust_backbone")] if nonrobust and nonrobust not in registered_backbones() else []
    return [*keys, ("rig", "keys_dir")]


def _map_paths(config: ExperimentConfig, change: Callable[[Path], str]) -> ExperimentConfig:
    updates: dict[str, dict] = {}
    for section, key in _path_keys(config):
        updates.setdefault(section, {})[key] = change(Path(getattr(getattr(config, section), key)).expanduser())
    sections = {name: getattr(config, name).model_copy(update=values) for name, values in updates.items()}
    return config.model_copy(update=sections)


def resolve_paths(config: ExperimentConfig, base: str | Path) -> ExperimentConfig:
    """``config`` with every relative path resolved against the folder ``base`` (absolute ones kept)."""
    return _map_paths(config, lambda path: str((Path(base) / path).resolve()))


def make_relative_paths(config: ExperimentConfig, folder: str | Path, *, within: str | Path) -> ExperimentConfig:
    """``config`` (absolute paths) with each path inside the folder ``within`` written relative to
    ``folder``; paths outside ``within`` stay absolute. :func:`resolve_paths` against ``folder``
    gives ``config`` back, also after ``within`` (holding ``folder``) has been moved."""
    within, folder = Path(within).resolve(), Path(folder).resolve()

    def relative(path: Path) -> str:
        path = path.resolve()
        return Path(os.path.relpath(path, folder)).as_posix() if path.is_relative_to(within) else str(path)

    return _map_paths(config, relative)


def _check_paths(config: ExperimentConfig, base: Path) -> ExperimentConfig:
    """Resolve relative paths against ``base`` and check that the named files and folders exist."""
    resolved = resolve_paths(config, base)
    if config.images.source != EMBEDDED and not Path(resolved.images.source).is_dir():
        raise FileNotFoundError(
            f"[images] source = {config.images.source!r}: no such folder ({resolved.images.source}); "
            'give "embedded" or a folder in ImageFolder layout'
        )
    if config.model.backbone not in registered_backbones() and not Path(resolved.model.backbone).is_file():
        raise FileNotFoundError(
            f"[model] backbone = {config.model.backbone!r}: neither a registered name "
            f"({', '.join(registered_backbones())}) nor an existing checkpoint file ({resolved.model.backbone})"
        )
    if config.sites.site_map and not Path(resolved.sites.site_map).is_file():
        raise FileNotFoundError(f"[sites] site_map = {config.sites.site_map!r}: no such file ({resolved.sites.site_map})")
    nonrobust = config.sim.nonrobust_backbone
    if nonrobust and nonrobust not in registered_backbones() and not Path(resolved.sim.nonrobust_backbone).is_file():
        raise FileNotFoundError(
            f"[sim] nonrobust_backbone = {nonrobust!r}: neither a registered name "
            f"({', '.join(registered_backbones())}) nor an existing checkpoint file ({resolved.sim.nonrobust_backbone})"
        )
    return resolved


def read_toml_config(path: str | Path, name: str, *, missing: str) -> tuple[dict, Path]:
    """The parsed TOML of config file ``path`` (or of ``path/name`` for a folder), and its path.

    ``missing``: the message of the ``FileNotFoundError`` when there is no such file ("{path}"
    stands for it). A file that is not TOML gives a ``ValueError`` naming it.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise FileNotFoundError(missing.format(path=repr(str(path))))
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8")), path
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not valid TOML: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None


def validate_config(root: type[ConfigSection], data: dict, *, source: str) -> ConfigSection:
    """Validate a plain dict (as parsed from TOML) into ``root``; one ``ValueError`` lists every problem."""
    try:
        return root.model_validate(data)
    except ValidationError as error:
        raise ValueError(format_config_error(source, error, root)) from None


def read_config(path: str | Path, *, check_paths: bool = True) -> ExperimentConfig:
    """Read and validate an ``experiment.toml`` (or the one inside a folder).

    Raises ``ValueError`` naming the key, the bad value and what is allowed; ``FileNotFoundError``
    when the file or a path it names does not exist.
    """
    data, path = read_toml_config(
        path, CONFIG_NAME, missing="no experiment config at {path}; create one with `closedloop init DIR`"
    )
    config = build_config(data, source=str(path))
    return _check_paths(config, path.parent) if check_paths else config


def build_config(data: dict, *, source: str = "config") -> ExperimentConfig:
    """Validate a plain dict (as parsed from TOML) into an :class:`ExperimentConfig`."""
    return validate_config(ExperimentConfig, data, source=source)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_config(config: BaseModel, *, title: str = "closedloop experiment configuration.",
                  exclude: tuple[str, ...] = ()) -> str:
    """The configuration (any config class made of sections) as a commented TOML document.

    ``exclude``: names of sections to leave out (e.g. :data:`DAY_INDEPENDENT_SECTIONS`).
    """
    lines = [
        f"# {title}",
        "# Every key is optional; a missing key takes the default shown here.",
        "# Relative paths are relative to this file's folder.",
    ]
    for section_name, section_field in type(config).model_fields.items():
        if section_name in exclude:
            continue
        section = getattr(config, section_name)
        lines += ["", f"# {section_field.annotation.__doc__}", f"[{section_name}]"]
        for key, field in type(section).model_fields.items():
            lines += textwrap.wrap(field.description, 96, initial_indent="# ", subsequent_indent="# ")
            lines.append(f"{key} = {_toml_value(getattr(section, key))}")
    return "\n".join(lines) + "\n"


def write_default_config(
    folder: str | Path, *, preset: str = "paper", overwrite: bool = False, changes: dict | None = None
) -> Path:
    """Write a commented ``experiment.toml`` with the defaults of ``preset`` into ``folder``.

    ``changes``: {section: {key: value}} applied over the preset (validated like the file); the
    experiment's name is the folder's. Returns the path written. Refuses to overwrite an existing
    file unless ``overwrite``.
    """
    folder = Path(folder).expanduser()
    changes = dict(changes or {})
    changes["experiment"] = dict(changes.get("experiment", {})) | {"name": folder.resolve().name}
    return write_preset_config(
        folder / CONFIG_NAME, ExperimentConfig, PRESETS, preset, overwrite=overwrite, changes=changes
    )


def write_preset_config(
    path: Path,
    root: type[ConfigSection],
    presets: dict[str, dict],
    preset: str,
    *,
    render: Callable[[ConfigSection], str] = render_config,
    overwrite: bool = False,
    changes: dict | None = None,
) -> Path:
    """Write to ``path``, atomically, the commented TOML of ``preset`` (a name in ``presets``).

    ``presets``: name -> {section: {key: value}} over the defaults of ``root``, the config class;
    ``changes`` (same shape) are applied over the preset, and the result is validated into
    ``root`` and written as ``render`` gives it. Refuses to overwrite an existing file unless
    ``overwrite``. Returns ``path``.
    """
    check_option("preset", preset, presets)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    data = {section: dict(values) for section, values in presets[preset].items()}
    for section, values in (changes or {}).items():
        data.setdefault(section, {}).update(values)
    return write_text(path, render(validate_config(root, data, source=f"preset {preset!r}")))


_SECTION_HEADER = re.compile(r"\s*\[\s*([A-Za-z0-9_.\"' -]+?)\s*\]\s*(#.*)?")
_TARGETS_KEY = re.compile(r"\s*targets\s*=")


def _find_targets_lines(lines: list[str]) -> tuple[int, int, int] | None:
    """In the lines of an experiment.toml: (first line of [sites], first and end line of its
    ``targets = …`` value, or -1 and the line to insert at); None without a [sites] table."""
    headers = [(i, match[1]) for i, line in enumerate(lines) if (match := _SECTION_HEADER.fullmatch(line.rstrip("\n")))]
    start = next((i for i, name in headers if name == "sites"), None)
    if start is None:
        return None
    end = next((i for i, _ in headers if i > start), len(lines))
    while end - 1 > start and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    first = next((i for i in range(start + 1, end) if _TARGETS_KEY.match(lines[i])), None)
    if first is None:
        return start, -1, end
    for last in range(first + 1, len(lines) + 1):  # the value may span lines: up to the first end that parses
        try:
            tomllib.loads("".join(lines[first:last]))
            return start, first, last
        except tomllib.TOMLDecodeError:
            continue
    raise ValueError(f"line {first + 1}: cannot read the value of [sites] targets")


def write_config_targets(path: str | Path, targets, *, note: str = "") -> Path:
    """Set ``[sites] targets`` of the experiment config at ``path`` (a file or its folder) to ``targets``.

    Only that key changes: its line (or lines) is replaced, or added to the ``[sites]`` table (or
    a new ``[sites]`` table at the end); every other line and comment stays as it was. ``note``: a
    comment (one line per line of text) written just above the key; an earlier note written by
    this function (lines starting ``# targets:``) is replaced. ``targets``: 0-based site indices,
    each < ``n_sites``. The result is validated (it must read back as the same configuration with
    the new targets) and written atomically. Returns the file's path.
    """
    _, path = read_toml_config(path, CONFIG_NAME, missing="no experiment config at {path}; create one with `closedloop init DIR`")
    text = path.read_text(encoding="utf-8")
    before = build_config(tomllib.loads(text), source=str(path))
    targets = [int(t) for t in targets]
    expected = before.model_copy(update={"sites": SitesSection.model_validate(before.sites.to_dict() | {"targets": targets})})
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    comment = [f"# targets: {line}\n" for line in note.splitlines() if line.strip()]
    new = comment + [f"targets = {_toml_value(targets)}\n"]
    found = _find_targets_lines(lines)
    if found is None:
        lines += ["\n", "[sites]\n", *new]
    else:
        _, first, last = found
        if first < 0:
            first = last
        while first > 0 and lines[first - 1].startswith("# targets:"):
            first -= 1
        lines[first:last] = new
    written = "".join(lines)
    try:
        problem = "it would change other keys" if build_config(tomllib.loads(written)) != expected else ""
    except (tomllib.TOMLDecodeError, ValueError) as error:
        problem = str(error)
    if problem:
        raise ValueError(
            f"{path}: cannot set [sites] targets in place, the file's layout is unusual ({problem}); set it by hand: "
            f"targets = {_toml_value(targets)} in the [sites] table"
        )
    return write_text(path, written)
