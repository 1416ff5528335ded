"""Choosing the sites to attack on a new array: reliability, visual drive, rate and predictivity per site.

A Utah-array day 0 records every electrode (96 per array), most of which a lab does not want to
attack: some carry no visually driven activity, others respond too unreliably for a lower bound
to say anything. For each site of a recorded day (an electrode with its units merged, or a sorted
unit where the site map names one), over the valid presentations of the day's clean images that
the Blackrock recording holds:

- **reliability** ρ: split-half reliability of the mean responses (spikes in the response window)
  over the clean images, Spearman-Brown corrected to the repetitions available
  (:func:`models.predictivity.compute_split_half_reliability`, averaged over random splits);
- **visual drive**: the rate in the response window (``[response] window_s``, 70–170 ms) minus
  the rate in a baseline window (default 0–50 ms after onset: before IT's response latency; in
  RSVP at 100 ms on / 100 ms off the time just before onset still holds the previous image's
  response), Hz, mean over presentations, and the p-value of a one-sided paired Wilcoxon
  signed-rank test across presentations (response rate > baseline rate);
- **rate**: the mean rate in the response window, Hz;
- **predictivity**: the held-out Pearson r of the model fitted at the end of that day (the refit
  stage's, ``stages/refit.json``), when the day's model is fitted; otherwise not available.

A site passes when it meets every criterion of :class:`SiteCriteria`; the passing sites are
ranked by reliability and the first ``max_sites`` are chosen. :func:`write_site_selection`
writes the ranked table and figure, and the chosen sites into the experiment's ``[sites]
targets`` with the criteria and the date beside them (``site_selection.json``).
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from analysis.html import make_figure, render_figure, render_links, render_table, write_csv, write_page
from closedloop.config import CONFIG_NAME, read_config, write_config_targets
from closedloop.core.files import atomic_path, compute_file_digest, read_json, write_json
from closedloop.core.lock import hold_lock
from closedloop.core.validation import check_dir, check_integer, check_number
from closedloop.data import layout
from closedloop.data.counts import compute_nev_counts
from closedloop.data.reconcile import compute_day_reconciliation
from closedloop.data.store import open_store
from closedloop.data.window import check_window
from models.predictivity import compute_split_half_reliability

__all__ = ["SiteCriteria", "compute_site_metrics", "compute_site_selection", "write_site_selection",
           "DEFAULT_BASELINE_WINDOW_S"]

DEFAULT_BASELINE_WINDOW_S = (0.0, 0.05)
_TABLE_COLUMNS = ["rank", "site", "label", "electrode", "unit", "reliability", "drive_hz", "drive_p", "rate_hz",
                  "predictivity", "passes", "chosen", "failed"]


@dataclass(frozen=True)
class SiteCriteria:
    """What a site must meet to be attacked, and how many to take.

    ``min_reliability``: split-half ρ (Spearman-Brown) at least this, in [-1, 1];
    ``max_drive_p``: the visual-drive test's p-value below this, in (0, 1]; ``min_rate_hz``:
    mean rate in the response window at least this, Hz; ``min_predictivity``: the fitted model's
    held-out r at least this, in [-1, 1] (None: not a criterion); ``max_sites``: at most this many
    sites, the most reliable first (0: every passing site). Defaults: ρ ≥ 0.5, p < 0.001, ≥ 1 Hz,
    21 sites (the published run attacked 21 sites of two 96-electrode arrays).
    """

    min_reliability: float = 0.5
    max_drive_p: float = 1e-3
    min_rate_hz: float = 1.0
    min_predictivity: float | None = None
    max_sites: int = 21

    def __post_init__(self) -> None:
        check_number("min_reliability", self.min_reliability, minimum=-1.0, maximum=1.0)
        check_number("max_drive_p", self.max_drive_p, minimum=0.0, maximum=1.0)
        if self.max_drive_p == 0:
            raise ValueError("'max_drive_p' must lie in (0, 1], but got 0; no p-value is below 0.")
        check_number("min_rate_hz", self.min_rate_hz, minimum=0.0)
        if self.min_predictivity is not None:
            check_number("min_predictivity", self.min_predictivity, minimum=-1.0, maximum=1.0)
        check_integer("max_sites", self.max_sites, minimum=0)

    def describe(self) -> str:
        """The criteria in one line, e.g. ``reliability >= 0.5, drive p < 0.001, rate >= 1 Hz, at most 21 sites``."""
        parts = [f"reliability >= {self.min_reliability:g}", f"drive p < {self.max_drive_p:g}",
                 f"rate >= {self.min_rate_hz:g} Hz"]
        parts += [f"held-out r >= {self.min_predictivity:g}"] if self.min_predictivity is not None else []
        return ", ".join(parts + [f"at most {self.max_sites} sites" if self.max_sites else "every passing site"])


def _finite(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _drive_test(response_hz: np.ndarray, baseline_hz: np.ndarray) -> tuple[float, float]:
    """Mean of (response − baseline) rate, Hz, and the one-sided Wilcoxon signed-rank p-value."""
    difference = response_hz - baseline_hz
    if not difference.size or not difference.any():
        return float(difference.mean()) if difference.size else float("nan"), 1.0
    return float(difference.mean()), float(wilcoxon(difference, alternative="greater").pvalue)


def compute_site_metrics(store_path: str | Path, recording_path: str | Path, *, window_s,
                         baseline_window_s=DEFAULT_BASELINE_WINDOW_S, held_out_r=None, n_splits: int = 100,
                         seed: int = 0) -> list[dict]:
    """Reliability, visual drive, rate and predictivity of every site of a recorded day.

    ``store_path``: the day store (stimuli, presentation log, validity, sites); ``recording_path``:
    the day's Blackrock ``.nev``, whose onsets are matched to the log by code and time (by the
    ingest's own :func:`~closedloop.data.reconcile.compute_day_reconciliation`, through the clock
    fit when the log is on a display computer's clock) and counted in ``window_s`` and ``baseline_window_s`` ((start, stop) s after
    onset, 0 ≤ start < stop). ``held_out_r``: (n_sites,) the fitted model's held-out r (None
    entries or None: not available). Uses the valid, recorded presentations of clean stimuli.
    Returns one row per site: ``site``, ``label``, ``array``, ``electrode``, ``unit``,
    ``reliability`` (ρ over ``n_splits`` random splits drawn with ``seed``), ``drive_hz``,
    ``drive_p``, ``rate_hz``, ``baseline_hz``, ``predictivity``, ``n_images`` (clean images with
    ≥ 2 such presentations), ``n_presentations``. Raises ``ValueError`` when fewer than 2 clean
    images have 2 valid recorded presentations.
    """
    window, baseline = check_window(window_s), check_window(baseline_window_s)
    store = open_store(store_path)
    stimuli, log = store.read_stimuli(pixels=False), store.read_presentations()
    onsets, response = compute_nev_counts(recording_path, window_s=window, sites=store.sites, unmapped="ignore")
    _, spontaneous = compute_nev_counts(recording_path, window_s=baseline, sites=store.sites, unmapped="ignore")
    matched = compute_day_reconciliation(onsets, store)[0].onset_index
    use = log["valid"] & (matched >= 0) & (stimuli["parent"][log["stimulus"]] < 0)
    stimulus = log["stimulus"][use]
    response = response[matched[use]].astype(np.float64)
    spontaneous = spontaneous[matched[use]].astype(np.float64)
    shown, repeats = np.unique(stimulus, return_counts=True)
    n_images = int((repeats >= 2).sum())
    if n_images < 2:
        raise ValueError(
            f"{store.path}: {n_images} clean images have 2 or more valid presentations in {Path(recording_path).name} "
            f"({int(use.sum())} valid recorded presentations of {shown.size} clean images); reliability needs at least "
            "2 clean images shown validly twice. Record day 0 with its clean images ([rsvp] repetitions >= 2)."
        )
    reliability = compute_split_half_reliability(response, stimulus, n_splits=n_splits, seed=seed)
    response_hz = response / (window[1] - window[0])
    baseline_hz = spontaneous / (baseline[1] - baseline[0])
    held_out = list(held_out_r) if held_out_r is not None else [None] * store.n_sites
    sites, rows = store.sites, []
    for site in range(store.n_sites):
        drive_hz, drive_p = _drive_test(response_hz[:, site], baseline_hz[:, site])
        rows.append({
            "site": site, "label": sites.label[site], "array": int(sites.array[site]),
            "electrode": int(sites.electrode[site]), "unit": int(sites.unit[site]),
            "reliability": _finite(reliability[site]), "drive_hz": _finite(drive_hz), "drive_p": drive_p,
            "rate_hz": float(response_hz[:, site].mean()), "baseline_hz": float(baseline_hz[:, site].mean()),
            "predictivity": _finite(held_out[site]), "n_images": n_images, "n_presentations": int(use.sum()),
        })
    return rows


def _failures(row: dict, criteria: SiteCriteria) -> list[str]:
    """The criteria ``row`` does not meet (a missing value fails its criterion)."""
    failed = []
    if row["reliability"] is None or row["reliability"] < criteria.min_reliability:
        failed.append("reliability")
    if not row["drive_p"] < criteria.max_drive_p:
        failed.append("drive")
    if row["rate_hz"] < criteria.min_rate_hz:
        failed.append("rate")
    if criteria.min_predictivity is not None and (row["predictivity"] is None or row["predictivity"] < criteria.min_predictivity):
        failed.append("predictivity")
    return failed


def compute_site_selection(rows: list[dict], criteria: SiteCriteria) -> dict:
    """Apply ``criteria`` to the rows of :func:`compute_site_metrics` and rank the sites.

    Returns ``sites``: the rows ranked (passing sites first, each group by reliability, highest
    first), each with ``rank`` (1-based), ``passes``, ``chosen`` and ``failed`` (the criteria it
    misses, comma-separated); ``targets``: the chosen site indices, ascending; ``n_passed``;
    ``removed``: ``{criterion: sites failing it}`` (a site failing two criteria counts in both).
    Raises ``ValueError`` naming how many sites each criterion removed when no site passes.
    """
    if criteria.min_predictivity is not None and all(row["predictivity"] is None for row in rows):
        raise ValueError(
            "'min_predictivity' needs the day's fitted model (its held-out r per site), but the day has none; finish its "
            "refit stage (`closedloop fit-day N`) or leave out --min-predictivity."
        )
    failed = [_failures(row, criteria) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: (bool(failed[i]), -(rows[i]["reliability"] if rows[i]["reliability"]
                                                                         is not None else -np.inf), rows[i]["site"]))
    n_passed = sum(not f for f in failed)
    removed = {name: sum(name in f for f in failed) for name in ("reliability", "drive", "rate", "predictivity")
               if name != "predictivity" or criteria.min_predictivity is not None}
    if not n_passed:
        counts = ", ".join(f"{name} removed {n}" for name, n in removed.items())
        raise ValueError(f"no site of {len(rows)} passes the criteria ({criteria.describe()}): {counts}; loosen the "
                         "criteria (see `closedloop select-sites --help`) or check the recording.")
    n_chosen = min(n_passed, criteria.max_sites or n_passed)
    ranked = [rows[i] | {"rank": rank + 1, "passes": not failed[i], "chosen": rank < n_chosen,
                         "failed": ",".join(failed[i])} for rank, i in enumerate(order)]
    return {"sites": ranked, "targets": sorted(row["site"] for row in ranked if row["chosen"]), "n_passed": n_passed,
            "removed": removed}


def _read_recorded_day(experiment: Path, day: int) -> tuple[Path, Path]:
    """The day folder and its Blackrock recording; ``FileNotFoundError`` when the day is not recorded."""
    folder = layout.day_folder(experiment, day)
    if not layout.marker_path(folder, "present").exists():
        raise FileNotFoundError(
            f"day {day} of {str(experiment)!r} is not recorded yet (no finished present stage in {folder}); "
            f"run `closedloop fit-day {day} --experiment {experiment}` first."
        )
    recording = folder / layout.RECORDING
    ingest = open_store(folder / layout.STORE).read_ingest()
    if not recording.is_file() and ingest is not None and Path(ingest["attrs"]["source"]).is_file():
        recording = Path(ingest["attrs"]["source"])
    if not recording.is_file():
        raise FileNotFoundError(
            f"day {day} has no Blackrock recording ({folder / layout.RECORDING}); the baseline window needs the spikes. "
            f"Copy the NSP's .nev there (or ingest it: `closedloop ingest REC.nev --experiment {experiment} --day {day}`)."
        )
    return folder, recording


def _figure(ranked: list[dict], criteria: SiteCriteria):
    """Reliability against visual drive, the ranked reliabilities, and predictivity against its ceiling."""
    has_predictivity = any(row["predictivity"] is not None for row in ranked)
    figure, axes = make_figure(13.5 if has_predictivity else 9.5, 4.2, ncols=3 if has_predictivity else 2)
    groups = [("chosen", "tab:blue", [r for r in ranked if r["chosen"]]),
              ("passes, not chosen", "tab:orange", [r for r in ranked if r["passes"] and not r["chosen"]]),
              ("fails a criterion", "0.6", [r for r in ranked if not r["passes"]])]
    value = lambda rows, key: np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)
    for label, color, rows in groups:
        if rows:
            axes[0].scatter(value(rows, "drive_hz"), value(rows, "reliability"), s=18, color=color, label=f"{label} ({len(rows)})")
    axes[0].axhline(criteria.min_reliability, color="k", ls="--", lw=0.8)
    axes[0].set(xlabel="visual drive: response − baseline rate (Hz)", ylabel="split-half reliability ρ (Spearman-Brown)")
    axes[0].legend(fontsize=8, loc="lower right")
    colors = [groups[0][1] if r["chosen"] else groups[1][1] if r["passes"] else groups[2][1] for r in ranked]
    axes[1].bar(np.arange(1, len(ranked) + 1), np.nan_to_num(value(ranked, "reliability")), color=colors, width=1.0)
    axes[1].axhline(criteria.min_reliability, color="k", ls="--", lw=0.8)
    axes[1].set(xlabel="rank (passing sites first, then by reliability)", ylabel="reliability ρ")
    if has_predictivity:
        rho = np.linspace(0, 1, 50)
        axes[2].plot(rho, np.sqrt(rho), color="k", lw=0.8, label="ceiling √ρ")
        for _, color, rows in groups:
            if rows:
                axes[2].scatter(value(rows, "reliability"), value(rows, "predictivity"), s=18, color=color)
        axes[2].set(xlabel="reliability ρ", ylabel="fitted model's held-out r")
        axes[2].legend(fontsize=8, loc="upper left")
    return figure


def _render_page(out: Path, experiment: Path, day: int, selection: dict, criteria: SiteCriteria, table: Path) -> None:
    """Write the HTML page and the figure's PNG beside it."""
    figure = _figure(selection["sites"], criteria)
    with atomic_path(out.with_suffix(".png"), suffix=".png") as temporary:
        figure.savefig(temporary, dpi=110)
    removed = ", ".join(f"{name}: {n}" for name, n in selection["removed"].items())
    first = selection["sites"][0]
    summary = (f'<p class="summary">{len(selection["targets"])} sites chosen of {len(selection["sites"])} '
               f'({selection["n_passed"]} pass: {html.escape(criteria.describe())}), from {first["n_presentations"]} valid '
               f'presentations of {first["n_images"]} clean images shown at least twice. Sites failing each criterion: '
               f'{html.escape(removed)}. Chosen: {html.escape(", ".join(map(str, selection["targets"])))}.</p>')
    caption = ("Left: each site's split-half reliability of its mean clean-image responses (Spearman-Brown corrected) "
               "against its visual drive (response-window minus baseline-window rate); dashed: the reliability "
               "criterion. Middle: reliabilities in rank order, coloured as on the left. Right (when the day's model is "
               "fitted): the model's held-out r against reliability; a perfect model sits on √ρ.")
    rows = [{key: row[key] for key in _TABLE_COLUMNS} for row in selection["sites"]]
    body = summary + render_figure(figure, caption) + render_table(rows, _TABLE_COLUMNS) + render_links([table], out.parent)
    write_page(out, f"{experiment.name}: site selection on day {day}", [("Sites ranked", body)])


def write_site_selection(experiment: str | Path, day: int = 0, criteria: SiteCriteria | None = None, *,
                         baseline_window_s=DEFAULT_BASELINE_WINDOW_S, out: str | Path | None = None,
                         dry_run: bool = False, n_splits: int = 100, seed: int = 0) -> dict:
    """Rank the sites of a recorded day and make the chosen ones the experiment's targets.

    Computes :func:`compute_site_metrics` on day ``day`` (its store, its ``.nev``, its fitted model's
    held-out r when refit has finished) and :func:`compute_site_selection` with ``criteria``;
    writes the page ``out`` (default ``EXPERIMENT/report/select_sites_day_NNN.html``), its figure
    (``.png`` beside it) and the table ``<stem>_tables/sites.csv``. Unless ``dry_run``, sets
    ``[sites] targets`` of ``experiment.toml`` to the chosen sites (in place, with a comment naming
    the criteria and date; the next days attack only them) and writes ``site_selection.json``
    beside it (date, day, criteria, windows, recording and its sha256, every site's row). Returns
    the selection plus ``html``, ``png``, ``table``, ``config`` and ``record`` (None in a dry
    run), ``previous_targets``, ``later_days`` (days after ``day`` already begun: their frozen
    configs keep the old targets). One ``select-sites`` at a time per experiment: a second is
    refused with :class:`~closedloop.core.lock.LockedError` naming the first (``site_selection.lock``).
    """
    experiment = check_dir("experiment", experiment)
    with hold_lock(experiment / layout.SITE_SELECTION_LOCK):
        return _write_site_selection(experiment, day, criteria, baseline_window_s=baseline_window_s, out=out,
                                     dry_run=dry_run, n_splits=n_splits, seed=seed)


def _write_site_selection(experiment: Path, day: int, criteria: SiteCriteria | None, *, baseline_window_s,
                          out: str | Path | None, dry_run: bool, n_splits: int, seed: int) -> dict:
    day = check_integer("day", day, minimum=0, maximum=999)
    criteria = criteria or SiteCriteria()
    baseline_window_s = check_window(baseline_window_s)
    config = read_config(experiment)
    response_start = config.response.window_s[0]
    if baseline_window_s[1] > response_start:
        raise ValueError(
            f"'baseline_window_s' {list(baseline_window_s)} must end by the response window's start "
            f"({response_start:g} s after onset), or it counts the response; e.g. [0, {response_start:g}]."
        )
    out = Path(out) if out is not None else experiment / "report" / f"select_sites_day_{day:03d}.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"'out' must be an .html path, but got {str(out)!r}; e.g. {out.with_suffix('.html')}.")
    folder, recording = _read_recorded_day(experiment, day)
    refit = layout.marker_path(folder, "refit")
    held_out = read_json(refit)["summary"]["held_out_r"] if refit.exists() else None
    rows = compute_site_metrics(folder / layout.STORE, recording, window_s=config.response.window_s,
                                baseline_window_s=baseline_window_s, held_out_r=held_out, n_splits=n_splits, seed=seed)
    selection = compute_site_selection(rows, criteria)
    table = write_csv(out.parent / f"{out.stem}_tables" / "sites.csv", selection["sites"])
    _render_page(out, experiment, day, selection, criteria, table)
    later = [d for d in layout.find_day_folders(experiment) if d > day]
    result = {**selection, "day": day, "criteria": asdict(criteria), "baseline_window_s": list(baseline_window_s),
              "window_s": list(config.response.window_s), "predictivity_available": held_out is not None,
              "previous_targets": list(config.sites.targets), "later_days": later, "html": str(out),
              "png": str(out.with_suffix(".png")), "table": str(table), "config": None, "record": None}
    if dry_run:
        return result
    now = datetime.now(UTC).isoformat(timespec="seconds")
    note = (f"chosen by `closedloop select-sites` from day {day} on {now[:10]}; details in {layout.SITE_SELECTION}\n"
            f"criteria: {criteria.describe()}\n"
            f"{len(selection['targets'])} of {len(rows)} sites chosen ({selection['n_passed']} passed)")
    result["config"] = str(write_config_targets(experiment / CONFIG_NAME, selection["targets"], note=note))
    record = {key: result[key] for key in ("day", "criteria", "baseline_window_s", "window_s", "targets",
                                           "previous_targets", "n_passed", "removed", "predictivity_available")}
    record |= {"selected_at": now, "recording": str(recording), "recording_sha256": compute_file_digest(recording),
               "sites": selection["sites"]}
    result["record"] = str(write_json(experiment / layout.SITE_SELECTION, record))
    return result
