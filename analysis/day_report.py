"""The short per-day report (``day_NNN/report.html``): what was shown, what was recorded, the bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.html import make_figure, render_figure, render_table, write_page
from closedloop.core.files import read_json
from closedloop.data.layout import SENSITIVITY, STAGES, STORE
from closedloop.sensitivity.responses import read_day_responses

__all__ = ["compute_sensitivity_summary", "write_day_report"]

KIND_STYLE = {"attack": ("tab:red", "model-guided attack"), "gaussian": ("tab:gray", "Gaussian noise"),
              "interpolation": ("tab:blue", "interpolation")}


def compute_sensitivity_summary(records: list[dict]) -> list[dict]:
    """Mean ± s.d. over sites per (kind, ε) of the estimate, normalised estimate and truth.

    ``records``: the rows of ``sensitivity.json``. Returns rows with ``kind``, ``eps``,
    ``n_sites``, ``n_images`` (total), ``estimate`` / ``estimate_sd`` (spikes per window),
    ``normalized`` / ``normalized_sd`` (None when no site has a σ, e.g. a day whose clean images
    lack valid presentations), ``truth`` (mean over the sites that have one, or None),
    ``below_truth`` (sites whose estimate ≤ truth, or None).
    """
    rows = []
    for kind in ("attack", "gaussian", "interpolation"):
        for eps in sorted({r["eps"] for r in records if r["kind"] == kind}):
            chosen = [r for r in records if r["kind"] == kind and r["eps"] == eps]
            estimate = np.array([r["estimate"] for r in chosen])
            normalized = np.array([np.nan if r["normalized"] is None else r["normalized"] for r in chosen])
            truth = [r["truth"] for r in chosen if r["truth"] is not None]
            rows.append({
                "kind": kind, "eps": eps, "n_sites": len(chosen), "n_images": int(sum(r["n_images"] for r in chosen)),
                "estimate": float(estimate.mean()), "estimate_sd": float(estimate.std()),
                **({"normalized": float(np.nanmean(normalized)), "normalized_sd": float(np.nanstd(normalized))}
                   if np.isfinite(normalized).any() else {"normalized": None, "normalized_sd": None}),  # no site's σ
                "truth": float(np.mean(truth)) if truth else None,
                "below_truth": sum(r["estimate"] <= r["truth"] for r in chosen if r["truth"] is not None) if truth else None,
            })
    return rows


def _sensitivity_figure(summary: list[dict]) -> str:
    figure, axes = make_figure(7.5, 4.2)
    for offset, (kind, (color, label)) in zip((0.0, -0.015, 0.015), KIND_STYLE.items()):
        rows = [r for r in summary if r["kind"] == kind]
        if rows:
            eps = [r["eps"] * (1 + offset) for r in rows]  # side by side, so overlapping curves stay visible
            axes.errorbar(eps, [r["estimate"] for r in rows], yerr=[r["estimate_sd"] for r in rows], color=color,
                          marker="o", capsize=3, label=f"{label} (lower bound)")
    truth = [r for r in summary if r["kind"] == "attack" and r["truth"] is not None]
    if truth:
        axes.plot([r["eps"] for r in truth], [r["truth"] for r in truth], "k--", marker="s",
                  label="true sensitivity (simulated rig)")
    axes.axhline(0, color="k", lw=0.5)
    axes.set_xlabel("budget ε (L2, [0,1] pixel units)")
    axes.set_ylabel("sensitivity (spikes per window)")
    axes.set_title("Sensitivity lower bound, mean ± s.d. over sites")
    axes.legend(fontsize=8)
    n_sites = max(r["n_sites"] for r in summary)
    return render_figure(figure, f"Biased-down estimate per site, averaged over {n_sites} sites; error bars: s.d. over sites. "
                                 "A model-guided bound above the baselines means the model found directions that move the sites.")


def _no_estimates_reason(store: Path) -> str:
    """Why a day's ``sensitivity.json`` has no records, from its store (e.g. a session cut short)."""
    if not store.exists():
        return "the day has no store.zarr"
    responses = read_day_responses(store)
    perturbed = responses.stimuli["parent"] >= 0
    n_stimuli, n_perturbed = perturbed.size, int(perturbed.sum())
    if n_perturbed == 0:
        return f"none of the day's {n_stimuli} stimuli is a perturbed image"
    shown = responses.n_valid > 0
    n_clean_shown = int(shown[~perturbed].sum())
    n_perturbed_shown = int(shown[perturbed].sum())
    return (f"no perturbed image has valid presentations of both itself and its clean image "
            f"({n_perturbed_shown} of {n_perturbed} perturbed and {n_clean_shown} of {n_stimuli - n_perturbed} clean images "
            f"have valid presentations; {int(responses.valid.sum())} valid presentations, counts from {responses.source})")


def _sensitivity_section(folder: Path) -> str:
    """The sensitivity figure and table, or a note saying why the day has no estimates."""
    records = read_json(folder / SENSITIVITY)
    if not records:
        return f'<p class="note">No estimates: {_no_estimates_reason(folder / STORE)}.</p>'
    summary = compute_sensitivity_summary(records)
    columns = ["kind", "eps", "n_sites", "n_images", "estimate", "estimate_sd", "normalized", "truth", "below_truth"]
    return _sensitivity_figure(summary) + render_table(summary, columns)


def write_day_report(folder: str | Path) -> Path:
    """Write ``folder/report.html`` from the day's artifacts; return its path."""
    folder = Path(folder)

    stages = {stage: read_json(folder / "stages" / f"{stage}.json") for stage in STAGES
              if (folder / "stages" / f"{stage}.json").exists()}
    sections = []
    timing = [{"stage": name, "seconds": s["seconds"], **{k: v for k, v in s["summary"].items() if not isinstance(v, (list, dict))}}
              for name, s in stages.items()]
    sections.append(("Stages", render_table([{"stage": t["stage"], "seconds": t["seconds"]} for t in timing])))
    present = stages.get("present", {}).get("summary", {})
    if present:
        lacking = present.get("lacking_valid", [])
        note = (f'<p class="note">{len(lacking)} stimuli lack their valid repetitions (not re-queued): '
                f'{", ".join(map(str, lacking))}.</p>' if lacking else "")
        sections.append(("Presentations", render_table([{k: v for k, v in present.items() if not isinstance(v, (list, dict))}])
                         + note))
    if (folder / SENSITIVITY).exists():
        sections.append(("Sensitivity", _sensitivity_section(folder)))
    fit = stages.get("refit", {}).get("summary")
    if fit:
        pairs = zip(fit["held_out_r"], fit["reliability"])
        rows = [{"site": i, "held_out_r": r, "reliability": q} for i, (r, q) in enumerate(pairs)]
        note = (f'<p class="note">Fitted on {fit["n_stimuli"]} stimuli and {fit["n_presentations"]} valid presentations '
                f'from {fit["n_days"]} day(s); {fit["n_epochs"]} epochs, best {fit["best_epoch"]}.</p>')
        sections.append(("Model refit (held-out)", note + render_table(rows)))
    day = folder.name.removeprefix("day_")
    return write_page(folder / "report.html", f"{folder.parent.name}: day {int(day)}", sections)
