"""The simulated IT rig: a digital twin of the monkey, the display and the Blackrock NSP.

Its sites are units of a hidden network (:func:`make_hidden_sites`: a copy of the experiment's
base network mixed with a non-robust network, with a per-site readout, see :class:`HiddenSites`)
whose output is turned into firing rates (tens of Hz at baseline, hundreds for strong responses). For each presentation the
presenter draws Poisson spike trains on the 30 kHz NSP clock: baseline rate, then the
stimulus-driven rate from ``latency_s`` after onset for ``on_s``; a fixation break (probability
``fixation_break_rate``) leaves only the baseline. Like a Utah array, a day may record electrodes
that carry no visually driven site: with ``driven_fraction`` < 1 only that fraction of the sites
(chosen by :func:`compute_site_gains`) respond as above, the others stay near their baseline
(weakly driven, down to not at all). RSVP timing is ``on_s`` on and ``off_s`` grey;
``time_scale`` scales the real time spent (0.01 runs 100x faster than real time) while the
recording clock keeps real-time values. At ``stop`` it writes what it recorded as a Blackrock
``.nev`` (spikes on electrodes 1..n_sites, unit 1; on the digital port the event codes of
:mod:`closedloop.data.event_codes`: the stimulus's code at each onset, ``OFFSET`` at its offset,
and ``VALID`` at the end of the response window or ``FIXATION_BREAK`` at its start, always
before the next onset). With ``live_counts=False`` it streams outcomes without spike counts, as a
real presenter does; the ``.nev`` is then the only source of counts. Its site function is exposed as a differentiable torch
module (``site_function``) for validation only; the loop never reads it.

Run it with ``closedloop rig-sim``; a day starts it through :class:`rigs.launch.RigLauncher`.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from closedloop.core.logs import logger
from closedloop.core.validation import check_integer, check_integer_array, check_number
from closedloop.data.bundle import read_bundle
from closedloop.data.event_codes import FIXATION_BREAK, OFFSET, VALID
from closedloop.data.layout import compute_base_seed
from closedloop.data.recording import NSP_CLOCK_HZ, Recording
from closedloop.data.window import compute_duration_ticks, compute_window_ticks
from closedloop.images import make_embedded_image_set, to_tensor
from models import load_backbone
from rigs.agent import Outcome, RigAgent, StreamFaults
from rigs.nev import write_nev

__all__ = [
    "ExpectedCounts", "HiddenSites", "compute_hidden_site_options", "compute_site_gains", "compute_sim_rig_options",
    "SimulatedPresenter",
    "load_nonrobust_backbone", "make_hidden_sites", "make_sim_agent",
    "run_sim_rig",
]

_SPIKE_UNIT = 1
DEFAULT_LATENCY_S = 0.07
_BATCH = 32
_GAIN_STREAM = 0x5E1EC7  # the random stream of compute_site_gains, apart from every other draw
_CALIBRATION_PER_PHOTO = 4  # crops per embedded photograph that standardise the drive and set the gains
_NONROBUST_SEED_OFFSET = 1_000_003  # the non-robust network's weights: a stream apart from the base model's
_MIN_CEILING_HZ = 450.0  # above the highest preferred rate (400 Hz) plus the highest baseline (30 Hz)


class HiddenSites(nn.Module):
    """The simulated sites: images (n_images, 3, 224, 224) in [0, 1] → firing rates, Hz, (n_images, n_sites).

    The monkey's IT resembles the lab's base model without being it (docs/riglink.md, "The
    simulated rig's sites"):

    - **features**: a copy of the base backbone (``backbone`` at ``layer``, built with
      ``base_seed`` exactly as the day-0 model's is; its convolution weights carry independent
      noise of ``weight_noise`` × their standard deviation) and, when ``nonrobust_fraction`` > 0,
      the same layer of a second, non-robust network ``nonrobust_backbone`` (by default a
      random-weight ``resnet_tiny``, drawn from ``seed``), seeing the image at
      ``nonrobust_input_size`` px;
    - **drive**: per site, a compact Gaussian receptive field on each feature grid and random
      channel weights; each network's drive is standardised over natural calibration images
      (the embedded photographs) and the two are mixed so that ``nonrobust_fraction`` (m) of the
      drive's variance comes from the non-robust network: z = √(1 − m) z_base + √m z_nonrobust,
      standardised again. The base share (98% by default) lies in the loop's model class (the
      base backbone and a factorized readout represent it exactly; what the loop must learn from
      data is each site's readout), and attacks made by it are what the paper measured: the
      calibration sets the budgets' scale k so that they match the paper's numbers. The small
      non-robust share lies outside the class and keeps the white-box truth above anything the
      class can reach;
    - **rate**: ``baseline_hz`` (5–30 Hz) + S(``gain_hz`` · softplus(z − ``threshold``)), an
      expansive rectifier under a smooth ceiling: S(r) = c · r / (r + c), the hyperbolic ratio
      (Naka–Rushton, exponent 1) with c = ``max_rate_hz`` − ``baseline_hz``, so that no site fires
      above ``max_rate_hz`` (500 Hz; IT multi-unit sites do not fire at 1000 Hz) and strong
      stimuli still drive a site above its preferred rate (super-stimuli). Each site's gain is
      solved (:func:`_solve_gain`) so that its mean rate over the calibration images of its
      preferred photograph is its ``preferred_hz``, drawn from N(216, 60) Hz (Guo et al. Fig. 2C)
      and kept within 100–400 Hz; the stimulus-driven part is then scaled by the site's ``gain``
      (:func:`compute_site_gains`: 1 for a visually driven site, at most ``undriven_gain`` for
      the others).

    Everything random comes from ``seed``; differentiable in the images. The defaults are the
    calibrated values (also the ``[sim]`` defaults); how they were found: docs/riglink.md.
    """

    def __init__(self, n_sites: int, seed: int, *, backbone: str = "resnet_tiny", layer: str = "layer4.0",
                 base_seed: int = 0, weight_noise: float = 0.0, nonrobust_backbone: str = "resnet_tiny",
                 nonrobust_fraction: float = 0.02, nonrobust_input_size: int = 56, threshold: float = 1.0,
                 max_rate_hz: float = 500.0, trust: bool = False, driven_fraction: float = 1.0,
                 undriven_gain: float = 0.03) -> None:

        super().__init__()
        self.nonrobust_fraction = check_number("nonrobust_fraction", nonrobust_fraction, minimum=0.0, maximum=1.0)
        self.threshold = check_number("threshold", threshold, minimum=-10.0, maximum=10.0)
        self.max_rate_hz = check_number("max_rate_hz", max_rate_hz, minimum=_MIN_CEILING_HZ)
        if self.nonrobust_fraction > 0 and not nonrobust_backbone:
            raise ValueError(f"'nonrobust_fraction' = {nonrobust_fraction} needs a 'nonrobust_backbone' (a backbone name or "
                             "checkpoint path); give one, or set nonrobust_fraction = 0.")
        if not 0.0 <= self.nonrobust_fraction < 1.0:
            raise ValueError(f"'nonrobust_fraction' must lie in [0, 1) (the base network must drive the sites), "
                             f"but got {nonrobust_fraction}.")
        generator = torch.Generator().manual_seed(seed)
        base = load_backbone(backbone, layer, trust=trust, seed=base_seed).eval()
        with torch.no_grad():
            for parameter in base.parameters():
                if parameter.ndim == 4:
                    parameter.add_(weight_noise * parameter.std() * torch.randn(parameter.shape, generator=generator))
        centres = torch.rand(n_sites, 2, generator=generator)
        self.readouts = nn.ModuleList([_SiteReadout(base, centres, generator)])
        if self.nonrobust_fraction > 0:
            nonrobust = load_nonrobust_backbone(nonrobust_backbone, layer, input_size=nonrobust_input_size, trust=trust,
                                                seed=seed + _NONROBUST_SEED_OFFSET)
            self.readouts.append(_SiteReadout(nonrobust, centres, generator))
        self.register_buffer("baseline_hz", 5.0 + 25.0 * torch.rand(n_sites, generator=generator))
        preferred = 216.0 + 60.0 * torch.randn(n_sites, generator=generator)
        self.register_buffer("preferred_hz", preferred.clamp(100.0, 400.0))
        self.register_buffer("gain_hz", torch.ones(n_sites))
        self.register_buffer("ceiling_hz", self.max_rate_hz - self.baseline_hz)
        self.register_buffer("mean", torch.zeros(n_sites))
        self.register_buffer("std", torch.ones(n_sites))
        self.register_buffer("gain", torch.from_numpy(compute_site_gains(n_sites, seed, driven_fraction, undriven_gain)))
        self.requires_grad_(False)
        calibration = make_embedded_image_set(per_photo=_CALIBRATION_PER_PHOTO, seed=seed)
        with torch.no_grad():
            images = to_tensor(calibration.read(np.arange(len(calibration))))
            for readout in self.readouts:
                readout.standardise(images)
            z = self._mixed(images)
            self.mean.copy_(z.mean(0))
            self.std.copy_(z.std(0).clamp_min(1e-6))
            rectified = F.softplus(self._standardised(images) - self.threshold)
            categories = torch.as_tensor(calibration.categories)
            names = categories.unique()
            preferred = names[torch.stack([rectified[categories == c].mean(0) for c in names]).argmax(dim=0)]
            of_preferred = (categories[:, None] == preferred[None]).to(rectified.dtype)  # (n_images, n_sites)
            self.gain_hz.copy_(_solve_gain(rectified, of_preferred, self.preferred_hz - self.baseline_hz, self.ceiling_hz))

    def _mixed(self, images: torch.Tensor, base_share_only: bool = False) -> torch.Tensor:
        z = self.readouts[0](images)
        if len(self.readouts) == 1:
            return z
        m = self.nonrobust_fraction
        # the non-robust drive is standardised over natural images, so 0 is its mean
        nonrobust = 0.0 if base_share_only else self.readouts[1](images)
        return math.sqrt(1.0 - m) * z + math.sqrt(m) * nonrobust

    def _standardised(self, images: torch.Tensor, base_share_only: bool = False) -> torch.Tensor:
        return (self._mixed(images, base_share_only) - self.mean) / self.std

    def forward(self, images: torch.Tensor, *, base_share_only: bool = False) -> torch.Tensor:
        """Rates, Hz (n_images, n_sites). ``base_share_only``: the non-robust network's drive held at
        its mean over natural images (0), leaving what the loop's model class can represent exactly
        (validation only: :func:`rigs.truth.compute_class_ceiling`)."""
        drive = self._standardised(images, base_share_only)
        return self.baseline_hz + self.gain * _saturate(self.gain_hz * F.softplus(drive - self.threshold), self.ceiling_hz)


def _saturate(rate: torch.Tensor, ceiling: torch.Tensor) -> torch.Tensor:
    """The stimulus-driven rate with its ceiling, Hz: the hyperbolic ratio (Naka–Rushton, exponent 1)
    ceiling · rate / (rate + ceiling) of cortical response functions; ≈ rate well below the ceiling."""
    return ceiling * rate / (rate + ceiling)


def _solve_gain(rectified: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, ceiling: torch.Tensor) -> torch.Tensor:
    """Per site the gain g, Hz, whose saturated rate _saturate(g · rectified) has the weighted mean ``target``.

    ``rectified``, ``weights``: (n_images, n_sites), ≥ 0 (the weights: 1 for the images of the site's
    preferred category, else 0); ``target``, ``ceiling``: (n_sites,) with target < ceiling.
    Bisection on log g (the mean rises with g), 60 halvings of [e⁻¹⁰, e²⁰].
    """
    low = torch.full_like(target, -10.0)
    high = torch.full_like(target, 20.0)
    weights = weights / weights.sum(0)
    for _ in range(60):
        middle = (low + high) / 2
        below = (weights * _saturate(middle.exp() * rectified, ceiling)).sum(0) < target
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return ((low + high) / 2).exp()


def load_nonrobust_backbone(source: str, layer: str, *, input_size: int = 0, trust: bool = False,
                            seed: int = 0) -> nn.Module:
    """The twin's non-robust network (:func:`models.load_backbone` of ``source``, random weights
    from ``seed`` for a registered name), seeing the 224 px image area-downsampled to
    ``input_size`` px when > 0 (else at the network's own input size)."""
    backbone = load_backbone(source, layer, trust=trust, seed=seed).eval()
    backbone.input_size = check_integer("nonrobust_input_size", input_size, minimum=0, maximum=224) or backbone.input_size
    return backbone


def compute_site_gains(n_sites: int, seed: int, driven_fraction: float = 1.0, undriven_gain: float = 0.03) -> np.ndarray:
    """How strongly each simulated site is visually driven: float32 ``(n_sites,)``, in [0, 1].

    ``round(driven_fraction × n_sites)`` sites, chosen at random from ``seed``, have gain 1 (the
    stimulus-driven rate of :class:`HiddenSites`); the others draw theirs uniformly from
    [0, ``undriven_gain``]: multi-unit activity that the images barely move (gain near
    ``undriven_gain``) or not at all (gain near 0). The draws come from a generator of their own, so
    ``driven_fraction = 1`` leaves every other random choice of the simulated rig as it was.
    :func:`rigs.truth.compute_driven_sites` tells validation which sites are driven.
    """
    n_sites = check_integer("n_sites", n_sites, minimum=1)
    driven_fraction = check_number("driven_fraction", driven_fraction, minimum=0.0, maximum=1.0)
    undriven_gain = check_number("undriven_gain", undriven_gain, minimum=0.0, maximum=1.0)
    rng = np.random.default_rng([check_integer("seed", seed, minimum=0), _GAIN_STREAM])
    gains = undriven_gain * rng.random(n_sites)
    gains[rng.permutation(n_sites)[: round(driven_fraction * n_sites)]] = 1.0
    return gains.astype(np.float32)


class _SiteReadout(nn.Module):
    """One network's drive of every site, standardised over calibration images: (n, 3, 224, 224) → (n, n_sites).

    ``centres``: (n_sites, 2) receptive-field centres as fractions of the feature grid.
    """

    def __init__(self, backbone: nn.Module, centres: torch.Tensor, generator: torch.Generator) -> None:
        super().__init__()
        self.backbone = backbone
        channels, height, width = backbone.out_shape(224)
        grid = centres * torch.tensor([height - 1.0, width - 1.0])
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        distance = (rows[None] - grid[:, 0, None, None]) ** 2 + (columns[None] - grid[:, 1, None, None]) ** 2
        mask = torch.exp(-distance / 2.0)
        n_sites = len(centres)
        self.register_buffer("mask", mask / mask.sum(dim=(1, 2), keepdim=True))
        self.register_buffer("channels", torch.randn(n_sites, channels, generator=generator) / math.sqrt(channels))
        self.register_buffer("mean", torch.zeros(n_sites))
        self.register_buffer("std", torch.ones(n_sites))

    def _drive(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)  # (n, channels, height, width)
        return torch.einsum("nchw,shw,sc->ns", features, self.mask, self.channels)

    def standardise(self, images: torch.Tensor) -> None:
        """Set the mean and s.d. of the drive to those over ``images``."""
        drive = self._drive(images)
        self.mean.copy_(drive.mean(0))
        self.std.copy_(drive.std(0).clamp_min(1e-6))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self._drive(images) - self.mean) / self.std


class ExpectedCounts(nn.Module):
    """Expected spikes per response window of the simulated sites, (n_images, n_sites).

    Spikes are Poisson at the baseline rate except during [latency, latency + on) after onset,
    when they follow the stimulus-driven rate of ``sites``; the expected count in the window
    [start, stop) is baseline × (time outside the driven period) + rate × (time inside). This is
    the truth the validation compares the lower bound with; the loop never reads it.
    ``base_share_only``: the counts of the sites' base-network share alone (see :class:`HiddenSites`).
    """

    def __init__(self, sites: HiddenSites, *, window_s, on_s: float = 0.1, latency_s: float = DEFAULT_LATENCY_S,
                 base_share_only: bool = False):
        super().__init__()
        start, stop = window_s
        self.sites = sites
        self.base_share_only = base_share_only
        self.driven_s = max(0.0, min(stop, latency_s + on_s) - max(start, latency_s))
        self.baseline_s = (stop - start) - self.driven_s

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rates = self.sites(images, base_share_only=self.base_share_only)
        return self.sites.baseline_hz * self.baseline_s + rates * self.driven_s


def make_hidden_sites(n_sites: int, seed: int, **base) -> HiddenSites:
    """The simulated rig's sites: a :class:`HiddenSites` with ``n_sites`` units built from ``seed``.

    ``base``: the networks the monkey resembles and how (``backbone``, ``layer``, ``base_seed``,
    ``weight_noise``, ``nonrobust_backbone``, ``nonrobust_fraction``, ``nonrobust_input_size``,
    ``threshold``, ``trust``, ``driven_fraction``, ``undriven_gain``; see :class:`HiddenSites`),
    e.g. from :func:`compute_hidden_site_options`.
    """
    return HiddenSites(check_integer("n_sites", n_sites, minimum=1), check_integer("seed", seed, minimum=0), **base)


def compute_hidden_site_options(config) -> dict:
    """The :class:`HiddenSites` arguments for an experiment: its base model and ``[sim]`` ``weight_noise``,
    ``nonrobust_backbone``, ``nonrobust_fraction``, ``nonrobust_input_size``, ``threshold``, ``driven_fraction``
    and ``undriven_gain``."""

    model, sim = config.model, config.sim
    return {"backbone": model.backbone, "layer": model.layer, "base_seed": compute_base_seed(config),
            "weight_noise": sim.weight_noise, "nonrobust_backbone": sim.nonrobust_backbone,
            "nonrobust_fraction": sim.nonrobust_fraction, "nonrobust_input_size": sim.nonrobust_input_size,
            "threshold": sim.threshold, "max_rate_hz": sim.max_rate_hz, "trust": model.trust_checkpoint,
            "driven_fraction": sim.driven_fraction,
            "undriven_gain": sim.undriven_gain}


def compute_sim_rig_options(config, *, address: str, state_dir: str | Path, seed: int | None = None,
                            time_scale: float | None = None, fixation_break_rate: float | None = None,
                            faults: StreamFaults | None = None) -> dict:
    """The :func:`make_sim_agent` arguments for an experiment's simulated rig.

    From the experiment config (``[sites]``, ``[rsvp]``, ``[rig]``, ``[sim]`` and its base model);
    ``seed``, ``time_scale`` and ``fixation_break_rate`` override ``[sim]`` when given.
    """
    rig, sim = config.rig, config.sim
    return dict(
        address=address, state_dir=Path(state_dir), n_sites=config.sites.n_sites,
        seed=sim.seed if seed is None else seed,
        time_scale=sim.time_scale if time_scale is None else time_scale,
        on_s=config.rsvp.on_s, off_s=config.rsvp.off_s,
        fixation_break_rate=sim.fixation_break_rate if fixation_break_rate is None else fixation_break_rate,
        live_counts=sim.live_counts, silent_sites=tuple(sim.silent_sites), silent_after=sim.silent_after,
        faults=faults, security=rig.security, keys_dir=rig.keys_dir, heartbeat_s=rig.heartbeat_s,
        timeout_s=rig.timeout_s, hidden=compute_hidden_site_options(config),
    )


class SimulatedPresenter:
    """The presenter of the simulated rig (see the module docstring); plugs into :class:`RigAgent`.

    ``recording_path``: where ``finish`` writes the ``.nev``. Times in s; ``time_scale`` >= 0;
    ``live_counts``: whether outcomes carry the spike counts (False: like a real presenter).
    ``silent_sites``: sites (0-based) whose electrode dies: from presentation id ``silent_after``
    on they record no spike at all.
    """

    def __init__(
        self,
        site_function: HiddenSites,
        *,
        recording_path: str | Path,
        seed: int = 0,
        time_scale: float = 1.0,
        on_s: float = 0.1,
        off_s: float = 0.1,
        latency_s: float = DEFAULT_LATENCY_S,
        fixation_break_rate: float = 0.05,
        live_counts: bool = True,
        silent_sites: tuple[int, ...] = (),
        silent_after: int = 0,
    ) -> None:
        self.site_function = site_function
        self.live_counts = bool(live_counts)
        self.recording_path = Path(recording_path)
        self.seed = check_integer("seed", seed, minimum=0)
        self.time_scale = check_number("time_scale", time_scale, minimum=0.0)
        self.on_s = check_number("on_s", on_s, minimum=0.0, inclusive=False)
        self.off_s = check_number("off_s", off_s, minimum=0.0)
        self.latency_s = check_number("latency_s", latency_s, minimum=0.0)
        self.fixation_break_rate = check_number("fixation_break_rate", fixation_break_rate, minimum=0.0, maximum=1.0)
        n_sites = len(site_function.baseline_hz)
        self.sites = tuple(f"sim{site:03d}" for site in range(n_sites))
        self.silent_sites = check_integer_array("silent_sites", list(silent_sites), shape=(None,), minimum=0, maximum=n_sites - 1)
        self.silent_after = check_integer("silent_after", silent_after, minimum=0)
        self._rates: dict[int, np.ndarray] = {}
        self._codes: dict[int, int] = {}
        self._next_tick = 0
        self._due = 0.0

    def compute_rates(self, pixels: np.ndarray) -> np.ndarray:
        """Firing rates, Hz, (n_images, n_sites) of uint8 images (n_images, 224, 224, 3)."""
        with torch.no_grad():
            return np.concatenate([
                self.site_function(to_tensor(pixels[start:start + _BATCH])).numpy()
                for start in range(0, len(pixels), _BATCH)
            ]) if len(pixels) else np.zeros((0, len(self.sites)))

    def load_bundle(self, path: Path, outcomes: list[dict]) -> list[int]:
        """Read the bundle, compute every stimulus's rates, continue the clock after ``outcomes``."""
        bundle = read_bundle(path)
        rates = self.compute_rates(bundle.pixels)
        ids = bundle.stimulus_ids.tolist()
        self._rates = dict(zip(ids, rates))
        self._codes = dict(zip(ids, bundle.codes.tolist()))
        last = max((entry["record"]["onset_tick"] for entry in outcomes), default=None)
        self._next_tick = int(NSP_CLOCK_HZ) if last is None else last + self._ticks(self.on_s + self.off_s + 1.0)
        self._due = time.monotonic()
        return ids

    def _ticks(self, seconds: float) -> int:
        return compute_duration_ticks(seconds, NSP_CLOCK_HZ)

    def present(self, presentation_id: int, stimulus_id: int, window_s) -> Outcome:
        """Show one stimulus (sleeping ``(on_s + off_s) * time_scale``), draw its spikes, count them."""
        self._due = max(self._due, time.monotonic()) + (self.on_s + self.off_s) * self.time_scale
        rng = np.random.default_rng([self.seed, presentation_id])
        valid = bool(rng.random() >= self.fixation_break_rate)
        onset = self._next_tick
        self._next_tick += self._ticks(self.on_s + self.off_s)
        baseline = self.site_function.baseline_hz.numpy()
        driven = self._rates[stimulus_id] if valid else baseline
        start, stop = self._ticks(self.latency_s), self._ticks(self.latency_s + self.on_s)
        pieces = [(0, start, baseline), (start, stop, driven), (stop, self._next_tick - onset, baseline)]
        sites, ticks = [], []
        for low, high, rate in pieces:
            if high <= low:
                continue
            n_spikes = rng.poisson(rate * (high - low) / NSP_CLOCK_HZ)
            if presentation_id >= self.silent_after:
                n_spikes[self.silent_sites] = 0
            sites.append(np.repeat(np.arange(len(rate)), n_spikes))
            ticks.append(onset + rng.integers(low, high, size=int(n_spikes.sum())))
        sites, ticks = np.concatenate(sites), np.concatenate(ticks)
        window = compute_window_ticks(window_s, NSP_CLOCK_HZ)
        inside = (ticks >= onset + window[0]) & (ticks < onset + window[1])
        counts = np.bincount(sites[inside], minlength=len(self.sites))
        time.sleep(max(0.0, self._due - time.monotonic()))
        outcome_tick = onset + min(window[1] if valid else window[0], self._next_tick - onset - 1)
        record = {"onset_tick": onset, "code": self._codes[stimulus_id], "sites": sites.tolist(),
                  "ticks": ticks.tolist(), "outcome_tick": outcome_tick, "outcome": VALID if valid else FIXATION_BREAK}
        return Outcome(valid, onset / NSP_CLOCK_HZ, counts if self.live_counts else None, record)

    def finish(self, outcomes: list[dict]) -> str:
        """Write the session's recording (from the journaled ``outcomes``) as a Blackrock .nev; return its path."""

        records = [entry["record"] for entry in outcomes]
        off = self._ticks(self.on_s)
        events = sorted((tick, order, word) for r in records for order, (tick, word) in enumerate(
            ((r["onset_tick"], r["code"]), (r["onset_tick"] + off, OFFSET), (r["outcome_tick"], r["outcome"]))))
        event_ticks = [tick for tick, _, _ in events]
        event_words = [word for _, _, word in events]
        spike_ticks = np.array([t for r in records for t in r["ticks"]], dtype=np.int64)
        spike_sites = np.array([s for r in records for s in r["sites"]], dtype=np.int64)
        recording = Recording.from_ticks(
            spike_ticks, spike_sites + 1, np.full(len(spike_ticks), _SPIKE_UNIT), np.array(event_ticks, dtype=np.int64),
            np.array(event_words, dtype=np.uint16), tuple(range(1, len(self.sites) + 1)),
        )
        path = write_nev(self.recording_path, recording)
        logger.info("simulated rig wrote %s (%d presentations, %d spikes)", path, len(records), len(spike_ticks))
        return str(path)


def make_sim_agent(
    *,
    address: str,
    state_dir: str | Path,
    n_sites: int,
    seed: int = 0,
    time_scale: float = 1.0,
    on_s: float = 0.1,
    off_s: float = 0.1,
    fixation_break_rate: float = 0.05,
    live_counts: bool = True,
    silent_sites: tuple[int, ...] = (),
    silent_after: int = 0,
    faults: StreamFaults | None = None,
    security: str = "curve",
    keys_dir: str | Path | None = None,
    heartbeat_s: float = 1.0,
    timeout_s: float = 5.0,
    hidden: dict | None = None,
) -> RigAgent:
    """A (not yet started) :class:`RigAgent` serving a :class:`SimulatedPresenter` on ``address``.

    The hidden sites come from ``seed`` and ``hidden`` (the base network options of
    :func:`make_hidden_sites`); the session state and the ``.nev`` go to ``state_dir``.
    Building it again with the same arguments continues the same session (a rig restart).
    """
    state_dir = Path(state_dir)
    presenter = SimulatedPresenter(
        make_hidden_sites(n_sites, seed, **(hidden or {})), recording_path=state_dir / "recording.nev", seed=seed,
        time_scale=time_scale, on_s=on_s, off_s=off_s, fixation_break_rate=fixation_break_rate, live_counts=live_counts,
        silent_sites=silent_sites, silent_after=silent_after,
    )
    return RigAgent(presenter, address=address, state_dir=state_dir, rig_id=f"sim-{seed}", security=security,
                    keys_dir=keys_dir, heartbeat_s=heartbeat_s, timeout_s=timeout_s, faults=faults)


def run_sim_rig(
    stop: threading.Event,
    *,
    crash_after: int | None = None,
    restart_delay_s: float = 1.0,
    on_start=None,
    **agent_arguments,
) -> None:
    """Serve the simulated rig until ``stop`` is set (see :func:`make_sim_agent` for the arguments).

    Fault injection: after ``crash_after`` outcomes the agent dies without a word (queue and
    sockets gone), stays away ``restart_delay_s`` s and restarts from its state folder, once.
    ``on_start(agent)`` is called after each start (e.g. to learn the bound address). Raises
    :class:`rigs.agent.RigAgentError` when a thread of the agent died (it stopped serving), so
    ``closedloop rig-sim`` exits with a non-zero status and the traceback.
    """
    agent = make_sim_agent(**agent_arguments).start()
    address = agent.address
    crashed = False
    try:
        if on_start:
            on_start(agent)
        while not stop.wait(0.02):
            agent.check()
            if crash_after is not None and not crashed and agent.n_sent >= crash_after:
                logger.warning("simulated rig: crashing after %d outcomes", agent.n_sent)
                agent.close()
                crashed = True
                if stop.wait(restart_delay_s):
                    return
                agent = make_sim_agent(**{**agent_arguments, "address": address}).start()
                if on_start:
                    on_start(agent)
    finally:
        agent.close()

