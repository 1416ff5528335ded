"""The ``closedloop`` command line: thin wrappers that check input, call the library, print.

Every subcommand has ``--help``; bad input (and a rig that cannot be reached,
:class:`~closedloop.link.client.RigLinkError`) ends with a one-line ``error:`` message and exit
status 2; commands that print results accept ``--json``.

Each command imports the library it calls inside its function: importing every command's
library up front (torch, zarr, matplotlib, playwright, ribs/numba) took 77 s against 3 s for
this module alone on the 2-core development machine (``python -c "import closedloop.cli"``),
and ``closedloop --help`` or ``closedloop status`` should not wait for torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from closedloop.core.files import DiskFullError, describe_disk_full
from closedloop.core.lock import LockedError
from closedloop.core.logs import set_log_level
from closedloop.data.layout import STAGES

__all__ = ["main", "cli"]

EXPERIMENT_HELP = "Experiment folder holding experiment.toml."
_experiment_option = click.option(
    "--experiment", "experiment", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
    help=EXPERIMENT_HELP,
)


def _stop_on_signals(stop) -> None:
    """Set the ``stop`` event (threading.Event) on Ctrl-C (SIGINT) and SIGTERM, for the serving commands.

    Installed explicitly rather than relying on KeyboardInterrupt: a program started as a background
    job of a non-interactive shell (`... &`, nohup, many process managers) inherits SIGINT ignored,
    and Python then never raises KeyboardInterrupt, so a rig would outlive its Ctrl-C.
    """
    import signal

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())


def _emit(result: dict, as_json: bool, text: str) -> None:
    """Print ``result`` as JSON, or ``text`` for people."""
    click.echo(json.dumps(result, indent=2, sort_keys=False) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-q", "--quiet", is_flag=True, help="Show warnings and errors only (no progress).")
@click.version_option(package_name="closedloop")
def cli(quiet: bool) -> None:
    """Closed-loop adversarial control of IT sites: fit, attack, present, estimate, refit."""
    set_log_level(False if quiet else None)


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["paper", "demo"]), default="paper", show_default=True,
              help="paper: the published protocol (ResNet-50, 21 sites); demo: small, CPU-friendly.")
@click.option("--force", is_flag=True, help="Overwrite an existing experiment.toml.")
def init(folder: Path, preset: str, force: bool) -> None:
    """Create FOLDER with a commented experiment.toml holding every default."""
    from closedloop.config import write_default_config

    path = write_default_config(folder, preset=preset, overwrite=force)
    click.echo(f"wrote {path}")


@cli.command("check-model")
@click.option("--experiment", "experiment", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help=EXPERIMENT_HELP)
@click.option("--n-images", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Clean images to push through the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_model(experiment: Path, n_images: int, as_json: bool) -> None:
    """Build the configured IT model and run a few clean images through it (a smoke check)."""
    from closedloop.config import read_config

    config = read_config(experiment)
    from closedloop.model_check import compute_model_check

    result = compute_model_check(config, n_images=n_images)
    text = "\n".join(f"{key:>16}: {value}" for key, value in result.items())
    _emit(result, as_json, text)


# --- attacks: closedloop bench -------------------------------------------------------------


@cli.command()
@click.option("--backbone", default="resnet_tiny", show_default=True,
              help="Registered backbone name (resnet_tiny, resnet50, ...) or a checkpoint path.")
@click.option("--layer", default="layer4.0", show_default=True, help="Backbone layer feeding the readout.")
@click.option("--n-sites", type=click.IntRange(1), default=21, show_default=True, help="Sites of the IT model.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Images per batch (32 was fastest on a 2-core CPU).")
@click.option("--n-steps", type=click.IntRange(1), default=20, show_default=True, help="PGD steps per timed run.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed runs (median reported).")
@click.option("--image-size", type=click.IntRange(32), default=224, show_default=True, help="Image side, px.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Attack steps in bf16 autocast or fp32; auto: bf16 where the device runs it natively.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Attack steps in channels-last memory format.")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--peers", is_flag=True, help="Instead: the site attacks end to end against torchattacks' PGDL2 "
              "(needs torchattacks: pip install --no-deps torchattacks==3.5.1).")
@click.option("--n-jobs", type=click.IntRange(1), default=16, show_default=True,
              help="With --peers: (image, site) attack jobs, both directions each.")
@click.option("--eps", type=click.FloatRange(0.0, min_open=True), default=1.0, show_default=True,
              help="With --peers: L2 budget in [0, 1] pixel units (the embedded family's paper eps 1 is 6.3).")
@click.option("--step-rule", type=click.Choice(["pgd", "apgd"]), default="apgd", show_default=True,
              help="With --peers: the step rule with which the site attacks race to the peers' objectives.")
@click.option("--ingest", is_flag=True, help="Measure .nev ingest instead: speed and memory against a memmap pass.")
@click.option("--ingest-mb", type=(click.FloatRange(0.01), click.FloatRange(0.01)), default=(100, 400),
              show_default=True, metavar="SMALL LARGE", help="With --ingest: the two synthetic files' sizes, MB.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench(backbone: str, layer: str, n_sites: int, batch_size: int, n_steps: int, repeats: int, image_size: int,
          device: str, precision: str, channels_last: bool, compile_model: bool, peers: bool, n_jobs: int, eps: float,
          step_rule: str, ingest: bool,
          ingest_mb: tuple, as_json: bool) -> None:
    """Measure attack speed here: bare fwd+bwd, the engine, batching, a paper-size day (--peers: against
    torchattacks; --ingest: .nev ingest)."""
    if ingest:
        from closedloop.bench_ingest import compute_ingest_bench

        result = compute_ingest_bench(sizes_mb=ingest_mb, n_repeats=repeats)
        text = "\n".join(f"{key:>26}: {value:.4g}" for key, value in result.items() if isinstance(value, float))
        _emit(result, as_json, text + "".join(
            f"\n{name}: {result[name]['file_mb']:.0f} MB, ingest {result[name]['ingest_s']:.3f} s, memmap pass "
            f"{result[name]['memmap_pass_s']:.3f} s, peak memory +{result[name]['peak_memory_growth_mb']:.1f} MB"
            for name in ("small", "large")))
        return
    from closedloop.bench import compute_bench, compute_peer_bench
    from models import make_it_model

    model = make_it_model(backbone, layer, n_sites, image_size=image_size)
    result = {"backbone": backbone, "layer": layer}
    if peers:
        try:
            result |= compute_peer_bench(model, n_jobs=n_jobs, n_steps=n_steps, n_repeats=repeats, batch_size=batch_size,
                                         eps=eps, image_size=image_size, device=device, precision=precision,
                                         step_rule=step_rule)
        except ModuleNotFoundError as error:
            raise click.ClickException(str(error)) from None
    else:
        result |= compute_bench(model, batch_size=batch_size, n_steps=n_steps, n_repeats=repeats, image_size=image_size,
                                device=device, precision=precision, channels_last=channels_last,
                                compile_model=compile_model)
    text = "\n".join(f"{key:>34}: {value:.4g}" if isinstance(value, float) else f"{key:>34}: {value}"
                     for key, value in result.items())
    _emit(result, as_json, text)


# --- end attacks ------------------------------------------------------------------------------


# -- recording: Blackrock ingest ---------------------------------------------------------------
def _ingest_settings(experiment: Path | None, window: tuple | None, site_map: Path | None):
    """Window (s) and site table for ingest: options first, then experiment.toml, then defaults."""
    from closedloop.config import CONFIG_NAME, read_config
    from closedloop.data.sites import read_site_map
    from closedloop.data.window import DEFAULT_WINDOW_S

    config = None
    if experiment is not None and (experiment / CONFIG_NAME).is_file():
        config = read_config(experiment, check_paths=False)
    if window is None:
        window = tuple(config.response.window_s) if config else DEFAULT_WINDOW_S
    if site_map is None and config is not None and config.sites.site_map:
        site_map = experiment / Path(config.sites.site_map).expanduser()
    return window, (read_site_map(site_map) if site_map is not None else None)


def _summary_text(summary: dict) -> str:
    start, stop = summary["window_s"]
    busiest = sorted(summary["counts"].items(), key=lambda item: -item[1])[:5]
    return "\n".join([
        f"presentations: {summary['n_presentations']}",
        f"electrodes:    {len(summary['electrodes'])}",
        f"window:        [{start:g}, {stop:g}) s after onset",
        f"spikes in window (top electrodes): {', '.join(f'e{e}: {n}' for e, n in busiest) or 'none'}",
        f"distinct codes: {len(summary['codes'])}",
        *([_photodiode_text(summary["photodiode"])] if "photodiode" in summary else []),
    ])


def _photodiode_text(photodiode: dict) -> str:
    latency = photodiode["latency_ms"]
    spread = ("no crossing near any code" if latency["median"] is None else
              f"code to light {latency['median']:.1f} ms (5th-95th percentile {latency['p5']:.1f}-{latency['p95']:.1f})")
    return (f"photodiode {photodiode['channel']}: {spread}; {photodiode['n_without_crossing']} of "
            f"{photodiode['n_codes']} codes without a crossing")


def _report_text(report: dict) -> str:
    from closedloop.data.reconcile import format_mismatch

    lines = [
        f"{report['n_matched']} of {report['n_presentations']} logged presentations matched "
        f"{report['n_onsets']} recorded onsets; {report['n_mismatches']} mismatches",
    ]
    lines += [f"  {format_mismatch(m)}" for m in report["mismatches"]]
    if report["n_unrecorded"]:
        runs = ", ".join(f"{first}-{last}" for first, last in report["unrecorded"])
        lines.append(f"{report['n_unrecorded']} presentations logged outside the recording (unrecorded, not mismatches): {runs}")
    if "photodiode" in report:
        lines.append(_photodiode_text(report["photodiode"]))
    lines.append(f"written to {report['store']}" if report["written"] else "nothing written")
    return "\n".join(lines)


@cli.command()
@click.argument("recording", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--summary", is_flag=True, help="Print the recording summary (the default without --experiment).")
@click.option("--experiment", type=click.Path(file_okay=False, path_type=Path), default=None, help=EXPERIMENT_HELP)
@click.option("--day", type=click.IntRange(0, 999), default=None, help="Day number N: the store DIR/day_NNN/store.zarr.")
@click.option("--window", type=(float, float), default=None, metavar="START STOP",
              help="Response window [START, STOP) in s after onset (default: experiment.toml, else 0.07 0.17).")
@click.option("--site-map", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV site,array,electrode,unit,label (default: experiment.toml, else one site per electrode).")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.010, show_default=True,
              help="Largest onset difference, s, between the day's log and the recording.")
@click.option("--ignore-unmapped", is_flag=True, help="Ignore spikes on electrodes missing from the site map.")
@click.option("--allow-mismatch", is_flag=True, help="Store counts of matched presentations despite mismatches.")
@click.option("--allow-truncated", is_flag=True, help="Drop a partial last data packet (a recording cut short) "
              "instead of refusing the file.")
@click.option("--engine", type=click.Choice(["stream", "neo"]), default="stream", show_default=True,
              help="stream: closedloop's reader, one pass in constant memory; neo: neo's BlackrockRawIO (the reference).")
@click.option("--photodiode", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE.nsX",
              help="Onsets from the photodiode in this Blackrock continuous file (with --photodiode-channel/-threshold).")
@click.option("--photodiode-channel", default=None, help="The photodiode's channel: label (ainp1) or id (129).")
@click.option("--photodiode-threshold", type=float, default=None,
              help="Light threshold in the channel's units (mV for analog inputs), between dark and lit.")
@click.option("--photodiode-max-latency", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="Longest code-to-light delay, s (below the shortest interval between codes).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def ingest(recording: Path, summary: bool, experiment: Path | None, day: int | None, window, site_map: Path | None,
           tolerance: float, ignore_unmapped: bool, allow_mismatch: bool, allow_truncated: bool, engine: str,
           photodiode: Path | None,
           photodiode_channel: str | None, photodiode_threshold: float | None, photodiode_max_latency: float,
           as_json: bool) -> None:
    """Read a Blackrock RECORDING.nev: summarise it, or count spikes into a day's store."""
    from closedloop.data import layout
    from closedloop.data.counts import compute_summary
    from closedloop.data.nev import read_nev
    from closedloop.data.photodiode import read_photodiode
    from closedloop.data.reconcile import write_day_counts
    from closedloop.day.ingest import remove_stale_markers

    if (experiment is None) != (day is None):
        raise click.UsageError("--experiment and --day go together")
    if (photodiode is None) != (photodiode_channel is None) or (photodiode is None) != (photodiode_threshold is None):
        raise click.UsageError("--photodiode, --photodiode-channel and --photodiode-threshold go together")
    window, sites = _ingest_settings(experiment, window, site_map)
    unmapped = "ignore" if ignore_unmapped else "error"
    light = None if photodiode is None else read_photodiode(photodiode, photodiode_channel, photodiode_threshold,
                                                             max_latency_s=photodiode_max_latency)
    result = {}
    if experiment is None or summary:
        source = read_nev(recording, engine="neo", allow_truncated=allow_truncated) if engine == "neo" else recording
        result = compute_summary(source, window_s=window, sites=sites, unmapped=unmapped, photodiode=light,
                                 allow_truncated=allow_truncated)
    if experiment is None:
        _emit(result, as_json, _summary_text(result))
        return
    store = layout.day_folder(experiment, day) / layout.STORE
    report = write_day_counts(recording, store, window_s=window, tolerance_s=tolerance, sites=sites,
                              unmapped=unmapped, allow_mismatch=allow_mismatch, engine=engine, photodiode=light,
                              allow_truncated=allow_truncated)
    report["redo"] = remove_stale_markers(layout.day_folder(experiment, day)) if report["written"] else []
    text = (_summary_text(result) + "\n" if result else "") + _report_text(report)
    if report["redo"]:
        text += f"\nthe counts changed: fit-day {day} redoes {', '.join(report['redo'])}"
    _emit(report | ({"summary": result} if result else {}), as_json, text)
    if not report["written"]:
        raise ValueError(
            f"{report['n_mismatches']} mismatches between {recording} and the log of {store}; nothing written; "
            "fix the day's log or recording, or pass --allow-mismatch to store the matched presentations"
        )


def _export_text(summary: dict) -> str:
    return (f"day {summary['day']}: {summary['path']} ({summary['bytes'] / 1e6:.1f} MB, {summary['n_stimuli']} stimuli, "
            f"{summary['n_presentations']} presentations, {summary['n_units']} units, {summary['seconds']:.1f} s)")


@cli.command("export-nwb")
@click.argument("out", type=click.Path(path_type=Path))
@_experiment_option
@click.option("--day", type=click.IntRange(0, 999), default=None, help="Export day N into the file OUT (ending in .nwb).")
@click.option("--all", "all_days", is_flag=True, help="Export every finished day into the folder OUT, one .nwb each.")
@click.option("--overwrite", is_flag=True, help="Replace existing .nwb files.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export_nwb(out: Path, experiment: Path, day: int | None, all_days: bool, overwrite: bool, as_json: bool) -> None:
    """Export finished days as NWB files for DANDI (subject and lab from experiment.toml [nwb])."""
    from closedloop.data.nwb import write_day_nwb, write_experiment_nwb

    if (day is None) == (not all_days):
        raise click.UsageError("give either --day N (one file OUT) or --all (a folder OUT)")
    if all_days:
        result = write_experiment_nwb(experiment, out, overwrite=overwrite)
        skipped = f"\nskipped unfinished days {result['skipped']}" if result["skipped"] else ""
        _emit(result, as_json, "\n".join(_export_text(summary) for summary in result["days"]) + skipped)
    else:
        summary = write_day_nwb(experiment, day, out, overwrite=overwrite)
        _emit(summary, as_json, _export_text(summary))


# ----- rig link (keys, simulated rig) ------------------------------------------------------------


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace existing key pairs (every peer then needs the new public keys).")
@click.option("--json", "as_json", is_flag=True, help="Print the paths written as JSON.")
def keys(folder: Path, force: bool, as_json: bool) -> None:
    """Make CURVE key pairs for the control PC and the rig in FOLDER, and allow the control key on the rig."""
    from closedloop.link.keys import make_keys

    written = {name: str(path) for name, path in make_keys(folder, overwrite=force).items()}
    text = "\n".join(f"{name:>8}: {path}" for name, path in written.items())
    _emit(written, as_json, text + "\ncopy rig.key_secret and allowed/ to the rig; keep control.key_secret here")


@cli.command("rig-sim")
@click.option("--experiment", "experiment", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help=EXPERIMENT_HELP + " Its [rig], [sites] and [rsvp] sections are used.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the rig's session state and .nev [default: EXPERIMENT/rig-sim].")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Seed of the hidden sites and spikes [default: [sim] seed].")
@click.option("--time-scale", type=click.FloatRange(0), default=None,
              help="Real seconds per recording-clock second (0.01 runs 100x faster) [default: [sim] time_scale].")
@click.option("--fixation-break-rate", type=click.FloatRange(0, 1), default=None,
              help="Probability that a presentation ends in a fixation break [default: [sim] fixation_break_rate].")
@click.option("--drop", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fault injection: probability of dropping a stream message.")
@click.option("--duplicate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fault injection: probability of sending a stream message twice.")
@click.option("--reorder", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fault injection: probability of holding a stream message back behind the next.")
@click.option("--crash-after", type=click.IntRange(1), default=None,
              help="Fault injection: crash after this many presentations and restart once.")
@click.option("--calibration", is_flag=True,
              help="Do not serve: measure the simulated sites against the paper's numbers (white-box attacks on the "
              "twin) and print the table.")
@click.option("--n-sites", type=click.IntRange(1), default=None,
              help="With --calibration: sites to measure [default: [sites] n_sites].")
@click.option("--steps", type=click.IntRange(2), default=20, show_default=True,
              help="With --calibration: white-box solver steps per direction and budget.")
@click.option("--standard", default=None,
              help="With --calibration: a standard (not adversarially trained) network of the base model's family "
              "(name or checkpoint) to place the sites' sensitivity between it and the base model.")
@click.option("--json", "as_json", is_flag=True, help="With --calibration: print the result as JSON.")
def rig_sim(experiment: Path, state_dir: Path | None, seed: int | None, time_scale: float,
            fixation_break_rate: float, drop: float, duplicate: float, reorder: float,
            crash_after: int | None, calibration: bool, n_sites: int | None, steps: int, standard: str | None,
            as_json: bool) -> None:
    """Run the simulated IT rig on the configured [rig] address until interrupted (Ctrl-C or SIGTERM).

    With --calibration, measure its sites against the paper's numbers instead (docs/riglink.md).
    """
    import threading

    from closedloop.config import read_config

    config = read_config(experiment)
    if calibration:
        from rigs.calibration import compute_twin_calibration, format_calibration

        if seed is not None:
            config = config.model_copy(update={"sim": config.sim.model_copy(update={"seed": seed})})
        result = compute_twin_calibration(config, n_sites=n_sites, n_steps=steps, standard=standard)
        _emit(result, as_json, format_calibration(result))
        return
    from rigs.agent import StreamFaults
    from rigs.sim import compute_sim_rig_options, run_sim_rig

    stop = threading.Event()
    arguments = compute_sim_rig_options(
        config, address=config.rig.address, state_dir=state_dir or Path(experiment) / "rig-sim", seed=seed,
        time_scale=time_scale, fixation_break_rate=fixation_break_rate,
        faults=StreamFaults(drop=drop, duplicate=duplicate, reorder=reorder, seed=config.experiment.seed),
    )
    _stop_on_signals(stop)
    run_sim_rig(stop, crash_after=crash_after, on_start=lambda agent: click.echo(f"serving on {agent.address}"),
                **arguments)


@cli.group()
def rig() -> None:
    """The display computer: rig.toml, a self-test, and the rig agent with the PsychoPy presenter (docs/rig.md)."""


@rig.command("init")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def rig_init(path: Path, force: bool) -> None:
    """Write a commented rig.toml with every default (PATH: a file, or a folder to hold rig.toml)."""
    from rigs.display.config import write_default_rig_config

    click.echo(f"wrote {write_default_rig_config(path, overwrite=force)}")


def _rig_summary_text(summary: dict) -> str:
    return "\n".join(f"{key:>21}: {value}" for key, value in summary.items() if key != "problems")


@rig.command("check")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("rig.toml"), show_default=True,
              help="The display computer's rig.toml.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def rig_check(config_path: Path, as_json: bool) -> None:
    """Self-test without the control PC: refresh rate and jitter, an event-code test pattern, a fixation readout.

    Exits with status 1 when something is off (each problem is printed).
    """
    from rigs.display.config import read_rig_config
    from rigs.display.serve import run_rig_check

    report = run_rig_check(read_rig_config(config_path))
    problems = "\n".join(f"problem: {p}" for p in report["problems"]) or "rig check passed"
    _emit(report, as_json, _rig_summary_text(report) + "\n" + problems)
    if report["problems"]:
        sys.exit(1)


@rig.command("serve")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("rig.toml"), show_default=True,
              help="The display computer's rig.toml.")
def rig_serve(config_path: Path) -> None:
    """Serve the rig agent with the PsychoPy presenter until interrupted (Ctrl-C or SIGTERM)."""
    import threading

    from rigs.display.config import read_rig_config
    from rigs.display.serve import run_rig_serve

    stop = threading.Event()
    _stop_on_signals(stop)
    run_rig_serve(read_rig_config(config_path), stop,
                  on_ready=lambda summary: click.echo(_rig_summary_text(summary) + "\nserving", nl=True))


@cli.command("fit-day")
@click.argument("day", type=click.IntRange(0, 999))
@_experiment_option
@click.option("--until", type=click.Choice(STAGES),
              default=None, help="Stop after this stage.")
@click.option("--force", is_flag=True, help="Start the day over although it was begun with another configuration "
              "(the old day folder is kept as day_NNN.replaced-<time>).")
@click.option("--rank-timeout", type=click.FloatRange(0, min_open=True), default=3600.0, show_default=True,
              help="Under torchrun: seconds a rank waits for the others at each step before all stop.")
@click.option("--json", "as_json", is_flag=True, help="Print what each stage did as JSON.")
def fit_day(day: int, experiment: Path, until: str | None, force: bool, rank_timeout: float, as_json: bool) -> None:
    """Run (or resume) day DAY: plan, synthesize, bundle, present, ingest, estimate, refit, report.

    Under torchrun with --until synthesize, the attacks are shared out over the ranks (docs/scaling.md).
    A day that waits for its recording (a rig that runs its own software, [rig] kind = "files",
    or a rig that streamed no spike counts) stops with one message saying what to run and where
    to put the .nev, and exit status 3; run the same command again once it is there.
    """
    from closedloop.core.distributed import join_process_group
    from closedloop.day.runner import run_day
    from closedloop.day.waiting import EXIT_WAITING, WaitingForRecording
    from rigs.launch import RigLauncher

    try:
        with join_process_group(rank_timeout) as group:
            if group.rank:  # rank 0 reports; the others show warnings and errors only
                set_log_level(False)
            results = run_day(experiment, day, force=force, until=until, rig=RigLauncher(), group=group)
    except WaitingForRecording as waiting:
        _emit({"waiting_for": str(waiting.recording), "reason": waiting.reason, "message": str(waiting)}, as_json,
              str(waiting))
        raise click.exceptions.Exit(EXIT_WAITING) from None
    if group.rank:
        return
    lines = [f"{stage:>10}: " + ("already done" if r["skipped"] else f"done in {r['seconds']:.1f} s")
             for stage, r in results.items()]
    lacking = results.get("present", {}).get("summary", {}).get("lacking_valid", [])
    if lacking:
        shown = ", ".join(map(str, lacking[:20])) + (" …" if len(lacking) > 20 else "")
        lines.append(f"{len(lacking)} stimuli lack their valid repetitions (not re-queued): {shown}")
    heading = f"day {day} of {experiment}" + (f" ({group.world_size} ranks)" if group.world_size > 1 else "")
    _emit(results, as_json, heading + "\n" + "\n".join(lines))


def _describe_lacking(lacking: list[dict], n_shown: int = 10) -> str:
    """'3 (1 of 2 valid), 7 (0 of 2 valid) and 5 more' for a day's stimuli lacking valid repetitions."""
    shown = ", ".join(f"{s['stimulus_id']}" + ("" if s["n_valid"] is None else f" ({s['n_valid']} of {s['repetitions']} valid)")
                      for s in lacking[:n_shown])
    return shown + (f" and {len(lacking) - n_shown} more (--json lists all)" if len(lacking) > n_shown else "")


@cli.command()
@_experiment_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(experiment: Path, as_json: bool) -> None:
    """Where every day of the experiment stands: next stage (or waiting for recording), presentations, model fitted."""
    from closedloop.core.validation import check_dir
    from closedloop.day.status import read_status

    records = read_status(check_dir("--experiment", experiment))
    lines = [f"{'day':>4}  {'next stage':<21} {'stimuli':>8} {'presentations':>13}  model"]
    for r in records:
        step = "waiting for recording" if r["waiting_for_recording"] else r["next_stage"] or "complete"
        lines.append(f"{r['day']:>4}  {step:<21} {r['n_stimuli']:>8} {r['n_presentations']:>13}  "
                     f"{'fitted' if r['model_fitted'] else '-'}")
        if r["lacking_valid"]:
            lines.append(f"      {r['n_lacking_valid']} stimuli lack valid repetitions: {_describe_lacking(r['lacking_valid'])}")
    _emit({"experiment": str(experiment), "days": records}, as_json, "\n".join(lines) if records else "no days yet")


@cli.command()
@_experiment_option
@click.option("--host", default=None, help="Address to listen on [default: [dashboard] host, 127.0.0.1]; any other "
              "than loopback requires the access token printed at start.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port [default: [dashboard] port, 8050]; 0: any free one.")
def dashboard(experiment: Path, host: str | None, port: int | None) -> None:
    """A live, read-only web page of the experiment: the day's stages, the session, the sites, alarms, earlier days."""
    from closedloop.config import read_config
    from closedloop.core.validation import check_dir
    from closedloop.dashboard.server import serve_dashboard

    thresholds = read_config(check_dir("--experiment", experiment), check_paths=False).dashboard
    host = host if host is not None else thresholds.host
    port = port if port is not None else thresholds.port
    try:
        serve_dashboard(experiment, thresholds, host=host, port=port,
                        announce=lambda text: click.echo(f"{text}\nread-only; Ctrl-C stops"))
    except KeyboardInterrupt:
        pass
    except OSError as error:
        raise click.ClickException(str(error)) from None
    click.echo("dashboard stopped")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("daily_runs/demo"),
              show_default=True, help="Experiment folder to create (an earlier demo there is replaced).")
@click.option("--days", type=click.IntRange(1, 20), default=4, show_default=True, help="Days to run (day_000 ...).")
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True,
              help="torch threads; the same count gives the same numbers on every run.")
@click.option("--no-probes", is_flag=True, help="Skip the probes and base selection at the end (report sections 7, 9-11).")
@click.option("--json", "as_json", is_flag=True, help="Print the demo's summary as JSON.")
def demo(out: Path, days: int, threads: int, no_probes: bool, as_json: bool) -> None:
    """The embedded demo: a fresh experiment against the simulated rig, days 0..DAYS-1, the probes, then the report."""
    from closedloop.demos.loop import run_demo

    result = run_demo(out, n_days=days, threads=threads, probes=not no_probes)
    _emit(result["summary"], as_json, result["text"])


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("daily_runs/validate"),
              show_default=True, help="Experiment folder to create (an earlier validation there is replaced, "
              "unless --resume).")
@click.option("--days", type=click.IntRange(2, 20), default=6, show_default=True,
              help="Day 0 plus DAYS-1 refitted days (paper: 6).")
@click.option("--resume", is_flag=True, help="Continue the campaign already in --out from where it stopped.")
@click.option("--sites", "n_sites", type=click.IntRange(1, 96), default=21, show_default=True, help="Simulated sites.")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="PGD steps of the loop's attacks.")
@click.option("--json", "as_json", is_flag=True, help="Print the validation summary as JSON.")
def validate(out: Path, days: int, resume: bool, n_sites: int, steps: int, as_json: bool) -> None:
    """The paper's protocol on the calibrated simulated rig; checks the paper's four claims (docs/validate.md)."""
    from closedloop.demos.validate import format_validation, run_validation

    result = run_validation(out, n_days=days, n_sites=n_sites, steps=steps, resume=resume)
    _emit(result, as_json, format_validation(result))


# --- behaviour: closedloop train-robust, closedloop behavior init|generate -------------------


@cli.command("train-robust")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", default="embedded", show_default=True,
              help='"embedded" (crops of the 9 embedded photographs) or an ImageFolder (root/<category>/<image>).')
@click.option("--eps", type=click.FloatRange(0), default=3.0, show_default=True,
              help="Training L2 budget in [0,1] pixel units at 224 px; 0 trains a vanilla classifier.")
@click.option("--attack-steps", type=click.IntRange(1), default=None,
              help="PGD steps per training step [default: published for eps 1, 3, 10 (7, 7, 10), else 7].")
@click.option("--attack-step", type=click.FloatRange(0, min_open=True), default=None,
              help="PGD step size [default: published for eps 1, 3, 10 (0.3, 0.5, 1.5), else 2.5 eps / 7].")
@click.option("--architecture", default=None, help="resnet50, wide_resnet50_2, wide_resnet50_4 or resnet_tiny "
              "[default: resnet_tiny for embedded, else resnet50].")
@click.option("--input-size", type=click.IntRange(0), default=None,
              help="Area-downsample images to this many px inside the classifier; 0: none [default: 56 for embedded, else 0].")
@click.option("--epochs", type=click.IntRange(1), default=12, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per step over all processes.")
@click.option("--lr", "learning_rate", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True,
              help="Initial SGD learning rate (cosine decay to 0).")
@click.option("--weight-decay", type=click.FloatRange(0), default=5e-4, show_default=True)
@click.option("--per-photo", type=click.IntRange(1, 500), default=40, show_default=True,
              help="Embedded data: crops per photograph.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Initial weights, shuffling and flips.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="Data-loading processes.")
@click.option("--restart", is_flag=True, help="Train from scratch although OUT holds a checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
def train_robust(out: Path, data: str, eps: float, attack_steps: int | None, attack_step: float | None,
                 architecture: str | None, input_size: int | None, epochs: int, batch_size: int, learning_rate: float,
                 weight_decay: float, per_photo: int, seed: int, device: str, workers: int, restart: bool,
                 as_json: bool) -> None:
    """Train a classifier into OUT, adversarially (PGD-L2 in every step) or vanilla (--eps 0); resumable.

    Runs unchanged under torchrun (DistributedDataParallel; gloo on CPU, nccl on GPU); only rank 0 writes.
    """
    import os

    from closedloop.behavior.models import EMBEDDED_CATEGORIES, make_embedded_training_set
    from closedloop.images import read_image_folder
    from models.classifiers import make_classifier
    from models.training import CHECKPOINT_NAME, fit_classifier

    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports
    if rank:
        set_log_level(False)
    embedded = data == "embedded"
    if embedded:
        images, labels = make_embedded_training_set(per_photo)
        names = EMBEDDED_CATEGORIES
    else:
        images = read_image_folder(data)
        labels, names = images.categories, images.category_names
    architecture = architecture or ("resnet_tiny" if embedded else "resnet50")
    input_size = (56 if embedded else 0) if input_size is None else input_size
    classifier = make_classifier(architecture, names, input_size=input_size, seed=seed, source=f"train-robust {data}")
    training = fit_classifier(classifier, images, labels, out, eps=eps, n_attack_steps=attack_steps, attack_step=attack_step,
                              epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
                              seed=seed, device=device, num_workers=workers, restart=restart)
    last = training["history"][-1]
    result = {"checkpoint": str(out / CHECKPOINT_NAME), "eps": eps, "attack_steps": training["attack_steps"],
              "attack_step": training["attack_step"], "epochs": len(training["history"]), "loss": last["loss"],
              "accuracy": last["accuracy"], "world_size": training["world_size"]}
    if rank == 0:
        _emit(result, as_json, "\n".join(f"{key:>13}: {value}" for key, value in result.items()))


@cli.group()
def behavior() -> None:
    """Behavioural stimulus sets: guides perturb start images; guides and surrogates score them."""


@behavior.command("init")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["embedded", "paper", "demo"]), default="embedded", show_default=True,
              help="embedded: CPU-sized (3 budgets, 50 PGD steps); paper: the published budgets and step schedule; "
                   "demo: what `closedloop behavior demo` uses.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def behavior_init(path: Path, preset: str, force: bool) -> None:
    """Write a commented behavior.toml (PATH: a file, or a folder to hold behavior.toml)."""
    from closedloop.behavior.config import write_default_behavior_config

    click.echo(f"wrote {write_default_behavior_config(path, preset=preset, overwrite=force)}")


@behavior.command("generate")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="behavior.toml (or its folder) [default: the preset].")
@click.option("--preset", type=click.Choice(["embedded", "paper", "demo"]), default="embedded", show_default=True,
              help="Configuration to use without --config (paths relative to the current folder).")
@click.option("--restart", is_flag=True, help="Delete an earlier stimulus set in OUT and start over.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="Arithmetic of the attack steps [default: [perturbations] precision, itself 'auto': bf16 where "
                   "the device runs it natively, else fp32].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def behavior_generate(out: Path, config_path: Path | None, preset: str, restart: bool, precision: str | None,
                      as_json: bool) -> None:
    """Make (or finish) a behavioural stimulus set in OUT: PNGs, manifest, every model's logits."""
    from closedloop.behavior.config import make_preset_config, read_behavior_config
    from closedloop.behavior.generate import write_behavior_stimuli

    config = read_behavior_config(config_path) if config_path is not None else make_preset_config(preset)
    if precision is not None:
        config = config.model_copy(update={"perturbations": config.perturbations.model_copy(update={"precision": precision})})
    result = write_behavior_stimuli(config, out, restart=restart)
    text = (f"{result['n_items']} images in {result['n_units']} units ({result['n_units_done_before']} done before) "
            f"in {result['seconds']:.1f} s\nmanifest: {result['manifest']}")
    _emit(result, as_json, text)


def _split_numbers(text: str | None, name: str) -> list[float] | None:
    """A comma-separated option of numbers (None stays None; "none" is [])."""
    names = _split_names(text)
    try:
        return None if names is None else [float(value) for value in names]
    except ValueError:
        raise click.BadParameter(f"give comma-separated numbers or 'none', not {text!r}", param_hint=name) from None


@behavior.command("build")
@click.argument("stimuli", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n-warmup", type=click.IntRange(0), default=10, show_default=True, help="Clean warm-up trials with feedback.")
@click.option("--n-test", type=click.IntRange(1), default=100, show_default=True, help="Perturbed images per session.")
@click.option("--n-reference", type=click.IntRange(0), default=10, show_default=True, help="Clean reference trials per session.")
@click.option("--n-catch", type=click.IntRange(1), default=10, show_default=True, help="Catch trials (circle / triangle).")
@click.option("--n-subjects-per-image", type=click.IntRange(1), default=2, show_default=True,
              help="Sessions (subjects) that see each perturbed image at least.")
@click.option("--detection-budgets", default=None, metavar="EPS", help="Comma-separated budgets of the same/different "
              "task [default: all]; 'none' builds no detection sessions.")
@click.option("--detection-modes", default=None, metavar="MODES", help="Comma-separated modes of the same/different task "
              "[default: all]; 'none' builds no detection sessions.")
@click.option("--n-detection-items", type=click.IntRange(1), default=20, show_default=True,
              help="Perturbed images per detection session (4 trials each).")
@click.option("--image-degrees", type=float, default=6.0, show_default=True, help="Image side, degrees of visual angle.")
@click.option("--px-per-degree", type=float, default=40.0, show_default=True,
              help="Screen pixels per degree (40: a 96 dpi screen at 57 cm).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of every order and assignment.")
@click.option("--json", "as_json", is_flag=True, help="Print the sessions as JSON.")
def behavior_build(stimuli: Path, out: Path, n_warmup: int, n_test: int, n_reference: int, n_catch: int,
                   n_subjects_per_image: int, detection_budgets: str | None, detection_modes: str | None,
                   n_detection_items: int, image_degrees: float, px_per_degree: float, seed: int, as_json: bool) -> None:
    """Build the web task (static jsPsych pages) for the stimulus set STIMULI into OUT."""
    from closedloop.behavior.sessions import write_behavior_sessions

    result = write_behavior_sessions(
        stimuli, out, n_warmup=n_warmup, n_test=n_test, n_reference=n_reference, n_catch=n_catch,
        n_subjects_per_image=n_subjects_per_image, detection_budgets=_split_numbers(detection_budgets, "--detection-budgets"),
        detection_modes=_split_names(detection_modes), n_detection_items=n_detection_items, image_degrees=image_degrees,
        px_per_degree=px_per_degree, seed=seed)
    kinds = result["n_sessions"]
    text = (f"{kinds['categorization']} categorisation and {kinds['detection']} detection sessions, "
            f"images {result['image_px']} px\n"
            f"upload {Path(out) / 'site'} or run `closedloop behavior serve {out}`")
    _emit(result, as_json, text)


@behavior.command("serve")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one).")
def behavior_serve(out: Path, host: str, port: int) -> None:
    """Serve the built task OUT and save each finished session to OUT/results (Ctrl-C stops)."""
    from closedloop.behavior.server import make_behavior_server

    server = make_behavior_server(out, host=host, port=port)
    address, bound = server.server_address[:2]
    click.echo(f"serving {out} at http://{address}:{bound}/start (detection: /start?kind=detection); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        server.server_close()


@behavior.command("simulate")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", required=True, help="Guide or surrogate of the stimulus set whose logits drive the choices.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature of the choices.")
@click.option("--lapse-rate", type=float, default=0.1, show_default=True, help="Probability of a random click.")
@click.option("--detection-scale", type=float, default=10.0, show_default=True,
              help="Detection task: eps at which a perturbation is seen with probability 1 - 1/e.")
@click.option("--sessions", default=None, metavar="IDS", help="Comma-separated session ids [default: every session].")
@click.option("--n-parallel", type=click.IntRange(1, 16), default=2, show_default=True, help="Browser pages at once.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the simulated choices.")
def behavior_simulate(out: Path, model: str, temperature: float, lapse_rate: float, detection_scale: float,
                      sessions: str | None, n_parallel: int, seed: int) -> None:
    """Simulated subjects do sessions of the built task OUT in headless Chromium (results in OUT/results)."""
    from closedloop.behavior.observers import ObserverModel, write_simulated_results

    observer = ObserverModel(model, temperature=temperature, lapse_rate=lapse_rate, detection_scale=detection_scale)
    files = write_simulated_results(out, observer, sessions=_split_names(sessions), n_parallel=n_parallel, seed=seed)
    click.echo(f"{len(files)} sessions done; results in {Path(out) / 'results'}")


@behavior.command("report")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file to write [default: OUT/report/behavior.html].")
@click.option("--n-boot", type=click.IntRange(0), default=1000, show_default=True, help="Bootstrap resamples per CI.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths, MTME and detection rows as JSON.")
def behavior_report(out: Path, html_path: Path | None, n_boot: int, seed: int, as_json: bool) -> None:
    """Write the behavioural report (people vs guides and surrogates) of the built task OUT with its results."""
    from analysis.behavior_report import write_behavior_report

    result = write_behavior_report(out, html_path=html_path, n_boot=n_boot, seed=seed)
    result.pop("rates")
    mtme = ", ".join(f"{r['observer']} {r['mode']}{'/' + r['guide'] if r['guide'] else ''}: "
                     f"{'never' if r['mtme'] is None else format(r['mtme'], '.2f')}" for r in result["mtme"])
    _emit(result, as_json, f"wrote {result['html']} ({result['n_subjects']} subjects)\nMTME: {mtme or '-'}")


@behavior.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("daily_runs/behavior-demo"),
              show_default=True, help="Folder for the stimulus set, the task, its results and the report.")
@click.option("--n-parallel", type=click.IntRange(1, 16), default=3, show_default=True, help="Browser pages at once.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of sessions and simulated choices.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def behavior_demo(out: Path, n_parallel: int, seed: int, as_json: bool) -> None:
    """The behavioural pipeline on the embedded default: generate, build, simulated observers in Chromium, report."""
    from closedloop.demos.behavior import run_behavior_demo

    result = run_behavior_demo(out, n_parallel=n_parallel, seed=seed)
    lines = [f"report: {result['report']}",
             "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()),
             f"lapse rate: true {result['lapse_true']:.3f}, recovered {result['lapse_recovered']:.3f}"]
    lines += [f"disruption {r['mode']:>8} eps {r['budget']:>4g}: true {r['true']:.3f}, measured {r['measured']:.3f} "
              f"[{r['low']:.3f}, {r['high']:.3f}] {'ok' if r['within_ci'] else 'OUTSIDE CI'}" for r in result["disruption"]]
    _emit(result, as_json, "\n".join(lines))


# --- end behaviour ----------------------------------------------------------------------------


# --- report: offline sensitivity reports, base-model selection -------------------------------------
def _split_names(text: str | None) -> list[str] | None:
    """A comma-separated option as a list of names (None stays None; "" or "none" is [])."""
    if text is None:
        return None
    return [] if text.strip().lower() in ("", "none") else [name.strip() for name in text.split(",") if name.strip()]


@cli.command()
@_experiment_option
@click.option("--day", type=click.IntRange(0, 999), default=None,
              help="Day of the single-day sections and last day included [default: the last finished day].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file to write [default: EXPERIMENT/report/report.html]; tables go to <stem>_tables/ beside it.")
@click.option("--pdf", is_flag=True, help="Also print the page to PDF (needs headless Chromium).")
@click.option("--networks", default=None, metavar="NAMES",
              help="Comma-separated backbone names or checkpoint paths whose penultimate units to compare "
                   "[default: the experiment's base backbone; 'none' skips].")
@click.option("--n-units", type=click.IntRange(1), default=4, show_default=True, help="Units per network.")
@click.option("--n-images", type=click.IntRange(1), default=2, show_default=True, help="Clean images per unit.")
@click.option("--n-starts", type=click.IntRange(1), default=2, show_default=True,
              help="Random starts per image, unit and direction (paper: 100).")
@click.option("--n-steps", type=click.IntRange(2), default=10, show_default=True, help="Solver steps (paper: 250).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that need full unpickling (runs code from the file).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of image and unit choices.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths written and the headline numbers as JSON.")
def report(experiment: Path, day: int | None, out: Path | None, pdf: bool, networks: str | None, n_units: int,
           n_images: int, n_starts: int, n_steps: int, trust_checkpoint: bool, device: str, seed: int, as_json: bool) -> None:
    """Write the offline sensitivity report of an experiment (HTML with figures, CSV tables)."""
    from analysis.report import NetworkOptions, write_report

    options = NetworkOptions(networks=_split_names(networks), n_units=n_units, n_images=n_images, n_starts=n_starts,
                             n_steps=n_steps, trust=trust_checkpoint)
    result = write_report(experiment, day=day, out=out, networks=options, pdf=pdf, seed=seed, device=device)
    text = f"wrote {result['html']}" + (f" and {result['pdf']}" if result["pdf"] else "") + \
        f"\n{len(result['tables'])} tables in {Path(result['tables'][0]).parent}"
    _emit(result, as_json, text)


@cli.command("select-base")
@_experiment_option
@click.option("--candidates", default=None, metavar="NAMES",
              help="Comma-separated backbone names or checkpoint paths [default: the experiment's base backbone].")
@click.option("--layers", default="layer3.0,layer4.0,avgpool", show_default=True, metavar="NAMES",
              help="Comma-separated layer names.")
@click.option("--n-images", type=click.IntRange(4), default=200, show_default=True, help="Clean images to score on.")
@click.option("--n-pairs", type=click.IntRange(0), default=200, show_default=True, help="Recorded attack pairs for transfer.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file to write [default: EXPERIMENT/report/select_base.html].")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that need full unpickling (runs code from the file).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of image choice and folds.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def select_base(experiment: Path, candidates: str | None, layers: str, n_images: int, n_pairs: int, out: Path | None,
                trust_checkpoint: bool, device: str, seed: int, as_json: bool) -> None:
    """Score candidate backbones x layers against the recorded responses (CKA, predictivity, transfer)."""
    from analysis.report import write_selection_report
    from closedloop.config import read_config

    names = _split_names(candidates) or [read_config(experiment).model.backbone]
    result = write_selection_report(experiment, names, _split_names(layers), out=out, n_images=n_images, n_pairs=n_pairs,
                                    trust=trust_checkpoint, seed=seed, device=device)
    lines = [f"{r['candidate']:>20} {r['layer']:>10}  cka {r['cka']:.3f}  predictivity {r['predictivity']:.3f}  "
             f"transfer {r['transfer']:.3f}" for r in result["scores"]]
    lines += [f"best {r['criterion']}: {r['candidate']} {r['layer']}" for r in result["best"]] + [f"wrote {result['html']}"]
    _emit(result, as_json, "\n".join(lines))


def _site_selection_text(result: dict) -> str:
    """The ranked table of ``closedloop select-sites`` and what was written, for people."""
    number = lambda value, spec: "-" if value is None else format(value, spec)
    lines = [f"{'rank':>4} {'site':>4} {'label':>10} {'reliab.':>7} {'drive Hz':>8} {'drive p':>8} {'rate Hz':>7} "
             f"{'held-out r':>10}  chosen / failed"]
    for row in result["sites"]:
        verdict = "chosen" if row["chosen"] else "passes" if row["passes"] else "fails " + row["failed"]
        lines.append(f"{row['rank']:>4} {row['site']:>4} {row['label'][:10]:>10} {number(row['reliability'], '7.2f')} "
                     f"{number(row['drive_hz'], '8.1f')} {row['drive_p']:>8.1e} {row['rate_hz']:>7.1f} "
                     f"{number(row['predictivity'], '10.2f')}  {verdict}")
    removed = ", ".join(f"{name} {n}" for name, n in result["removed"].items())
    lines += [f"sites failing each criterion: {removed}",
              f"chosen {len(result['targets'])} of {len(result['sites'])} ({result['n_passed']} pass): {result['targets']}"]
    if not result["predictivity_available"]:
        lines.append(f"held-out r: not available (day {result['day']}'s model is not fitted yet)")
    if result["config"] is None:
        lines.append("dry run: experiment.toml not changed")
    else:
        lines.append(f"wrote [sites] targets to {result['config']} (was {result['previous_targets'] or '[] = all'}); "
                     f"record: {result['record']}")
        if result["later_days"]:
            lines.append(f"note: days {result['later_days']} already begun keep the targets they were started with")
    return "\n".join(lines + [f"report: {result['html']} (figure {result['png']})"])


@cli.command("select-sites")
@_experiment_option
@click.option("--day", type=click.IntRange(0, 999), default=0, show_default=True, help="The recorded day to rank the sites on.")
@click.option("--min-reliability", type=float, default=0.5, show_default=True,
              help="Least split-half reliability (Spearman-Brown corrected) over the clean images, in [-1, 1].")
@click.option("--max-drive-p", type=float, default=1e-3, show_default=True,
              help="Visual drive: a site passes when the paired Wilcoxon test of response vs baseline rate gives p below "
                   "this, in (0, 1].")
@click.option("--min-rate", "min_rate_hz", type=float, default=1.0, show_default=True,
              help="Least mean rate in the response window, Hz.")
@click.option("--min-predictivity", type=float, default=None,
              help="Least held-out r of the day's fitted model, in [-1, 1] [default: not a criterion].")
@click.option("--max-sites", type=int, default=21, show_default=True,
              help="Attack at most this many sites, the most reliable first (the paper: 21 of two arrays); 0 = all that pass.")
@click.option("--baseline-window", type=(float, float), default=(0.0, 0.05), show_default=True, metavar="START STOP",
              help="Baseline window, s after onset; it must end by the response window's start.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML page to write [default: EXPERIMENT/report/select_sites_day_NNN.html]; the PNG figure and "
                   "<stem>_tables/sites.csv go beside it.")
@click.option("--dry-run", is_flag=True, help="Rank and write the report, but leave experiment.toml and site_selection.json alone.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the random split-halves.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranked sites and what was written as JSON.")
def select_sites(experiment: Path, day: int, min_reliability: float, max_drive_p: float, min_rate_hz: float,
                 min_predictivity: float | None, max_sites: int, baseline_window: tuple[float, float], out: Path | None,
                 dry_run: bool, seed: int, as_json: bool) -> None:
    """Rank a recorded day's sites (reliability, visual drive, rate, held-out r) and make the best the targets."""
    from analysis.site_selection import SiteCriteria, write_site_selection

    criteria = SiteCriteria(min_reliability=min_reliability, max_drive_p=max_drive_p, min_rate_hz=min_rate_hz,
                            min_predictivity=min_predictivity, max_sites=max_sites)
    result = write_site_selection(experiment, day, criteria, baseline_window_s=baseline_window, out=out, dry_run=dry_run,
                                  seed=seed)
    _emit(result, as_json, _site_selection_text(result))


# --- end report ---------------------------------------------------------------------------------------


# --- probes: evolve, patterns, geometry -------------------------------------------------------------
_SITES_HELP = "Comma-separated site indices [default: all sites]."
_PROBE_DAY_HELP = "Day whose fitted model and clean images to use [default: the last finished day]."


def _site_list(text: str | None, option: str = "--sites") -> list[int] | None:
    """'0,2,5' → [0, 2, 5]; None stays None."""
    names = _split_names(text)
    if names is None:
        return None
    try:
        return [int(name) for name in names]
    except ValueError:
        raise ValueError(f"'{option}' must be comma-separated indices such as 0,2,5, but got {text!r}.") from None


@cli.command()
@_experiment_option
@click.option("--mode", type=click.Choice(["silico", "loop"]), default="silico", show_default=True,
              help="Score with the IT model (silico) or with spike counts from the experiment's rig (loop).")
@click.option("--encoding", type=click.Choice(["cppn", "direct"]), default="cppn", show_default=True)
@click.option("--day", type=click.IntRange(0, 999), default=None, help=_PROBE_DAY_HELP)
@click.option("--sites", default=None, metavar="LIST", help=_SITES_HELP)
@click.option("--name", default=None, help="Run folder under EXPERIMENT/probes/evolve/ [default: MODE_ENCODING].")
@click.option("--generations", type=click.IntRange(1), default=20, show_default=True)
@click.option("--children", type=click.IntRange(1), default=16, show_default=True, help="Images per generation.")
@click.option("--genome-size", type=click.IntRange(1, 224), default=None,
              help="Side of a direct genome, px, upsampled to 224 [default: 224].")
@click.option("--eps", type=click.FloatRange(0, min_open=True), default=None,
              help="Search inside this L2 ball ([0, 1] pixel units) around a recorded clean image.")
@click.option("--clean-index", type=click.IntRange(0), default=0, show_default=True, help="That clean image (with --eps).")
@click.option("--references", type=click.IntRange(0), default=4, show_default=True,
              help="Natural reference images shown every generation (loop mode).")
@click.option("--repetitions", type=click.IntRange(1), default=2, show_default=True, help="Valid presentations per image (loop).")
@click.option("--rate", "rate_start", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Initial per-value mutation rate (direct).")
@click.option("--halve-every", type=click.IntRange(1), default=1000, show_default=True,
              help="Generations after which the mutation rate halves (direct).")
@click.option("--network", default=None, metavar="SOURCE",
              help="Evolve for units of this backbone (name or checkpoint) instead of the sites (silico).")
@click.option("--classifier", default=None, metavar="SOURCE",
              help="Evolve for classes of this classifier (fooling images, softmax confidence) instead of the sites.")
@click.option("--layer", default="avgpool", show_default=True, help="Layer of --network whose units are scored.")
@click.option("--units", default=None, metavar="LIST", help="Unit (--network) or class (--classifier) indices.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that need full unpickling (runs code from the file).")
@click.option("--optimizer", type=click.Choice(["map-elites", "cma"]), default="map-elites", show_default=True,
              help="MAP-Elites mutation, or one CMA-ES per site (direct encoding, --genome-size <= 64).")
@click.option("--sigma", type=click.FloatRange(0, min_open=True), default=0.2, show_default=True,
              help="Initial CMA-ES step, [0, 1] pixel units (--optimizer cma).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run of the same name.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def evolve(experiment: Path, mode: str, encoding: str, day: int | None, sites: str | None, name: str | None, generations: int,
           children: int, genome_size: int | None, eps: float | None, clean_index: int, references: int, repetitions: int,
           rate_start: float, halve_every: int, network: str | None, classifier: str | None, layer: str, units: str | None,
           trust_checkpoint: bool, optimizer: str, sigma: float, overwrite: bool, seed: int, as_json: bool) -> None:
    """Evolve images that drive each site, unit or class (MAP-Elites, one elite each; CPPN or direct encoding)."""
    from closedloop.probes.evolution import EvolutionSettings
    from closedloop.probes.run import write_evolution

    settings = EvolutionSettings(encoding=encoding, optimizer=optimizer, n_generations=generations, n_children=children,
                                 genome_size=genome_size, eps=eps, rate_start=rate_start, halve_every=halve_every,
                                 sigma=sigma, seed=seed)
    result = write_evolution(experiment, settings, mode=mode, day=day, sites=_site_list(sites), name=name,
                             clean_index=clean_index, n_references=references, repetitions=repetitions, network=network,
                             classifier=classifier, layer=layer, units=_site_list(units, "--units"), trust=trust_checkpoint,
                             overwrite=overwrite)
    lines = [f"{label:>10}: {first:.3g} -> {last:.3g}" for label, first, last in
             zip(result["objectives"], result["first_elite"], result["last_elite"])]
    _emit(result, as_json, "elite score per site, generation 0 -> last\n" + "\n".join(lines) + f"\nwrote {result['out']}")


@cli.command()
@_experiment_option
@click.option("--day", type=click.IntRange(0, 999), default=None, help=_PROBE_DAY_HELP)
@click.option("--sites", default=None, metavar="LIST", help=_SITES_HELP)
@click.option("--eps", type=click.FloatRange(0, min_open=True), default=3.0, show_default=True,
              help="Attack budget, L2 in [0, 1] pixel units.")
@click.option("--n-images", type=click.IntRange(2), default=64, show_default=True, help="Clean images for the contrast image.")
@click.option("--n-aai", type=click.IntRange(1), default=8, show_default=True, help="Clean images attacked for the AAI.")
@click.option("--n-noise", type=click.IntRange(1), default=8, show_default=True, help="Noise starts (noise feed).")
@click.option("--n-steps", type=click.IntRange(1), default=20, show_default=True, help="PGD steps (step eps/3).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def patterns(experiment: Path, day: int | None, sites: str | None, eps: float, n_images: int, n_aai: int, n_noise: int,
             n_steps: int, seed: int, as_json: bool) -> None:
    """Adversarial patterns per site (zero feed, noise feed, AAI) and their similarity to the data's contrast image."""
    from closedloop.probes.run import write_patterns

    result = write_patterns(experiment, day=day, sites=_site_list(sites), eps=eps, n_images=n_images, n_aai=n_aai,
                            n_noise=n_noise, n_steps=n_steps, seed=seed)
    lines = [f"site {r['site']:>3} {r['pattern']:>14}: cosine to recorded PNC {r['similarity_to_data']:+.3f}"
             for r in result["similarity"]]
    _emit(result, as_json, "\n".join(lines))


@cli.command()
@_experiment_option
@click.option("--day", type=click.IntRange(0, 999), default=None, help=_PROBE_DAY_HELP)
@click.option("--sites", default=None, metavar="LIST", help=_SITES_HELP)
@click.option("--eps", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Attack budget, L2 in [0, 1] pixel units (the map spans +-2 eps).")
@click.option("--n-images", type=click.IntRange(2), default=2, show_default=True, help="Clean images per site.")
@click.option("--second", type=click.Choice(["mei", "random"]), default="mei", show_default=True,
              help="Second direction of the plane.")
@click.option("--n-grid", type=click.IntRange(3), default=15, show_default=True, help="Grid points per side of a map.")
@click.option("--n-steps", type=click.IntRange(1), default=10, show_default=True, help="PGD steps (step eps/3).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def geometry(experiment: Path, day: int | None, sites: str | None, eps: float, n_images: int, second: str, n_grid: int,
             n_steps: int, seed: int, as_json: bool) -> None:
    """Iso-response contours in the attack plane, their curvature, and curvature vs sensitivity."""
    from closedloop.probes.run import write_geometry

    result = write_geometry(experiment, day=day, sites=_site_list(sites), eps=eps, n_images=n_images, second=second,
                            n_grid=n_grid, n_steps=n_steps, seed=seed)
    c = result["correlation"]
    _emit(result, as_json, f"curvature vs sensitivity over {c['n']} site x image pairs: Pearson r {c['pearson_r']}, "
                           f"Spearman r {c['spearman_r']}")


# --- end probes -------------------------------------------------------------------------------------


_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError, LockedError)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning bad input, an unreachable rig or a failed torchrun rank into a one-line
    error and exit status 2."""
    try:
        status = cli.main(args=argv, prog_name="closedloop", standalone_mode=False)  # a command's Exit comes back here
        if isinstance(status, int) and status:
            sys.exit(status)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        click.echo(f"error: {error.format_message()} (see --help)", err=True)
        sys.exit(2)
    except _BAD_INPUT as error:
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        click.echo("error: " + " ".join(message.split()), err=True)
        sys.exit(2)
    except DiskFullError as error:
        click.echo("error: " + describe_disk_full(error), err=True)
        sys.exit(1)
    except RuntimeError as error:
        from closedloop.core.distributed import RankFailedError
        from closedloop.link.client import RigLinkError  # here, not above: the link is zmq, loaded on demand

        if not isinstance(error, (RigLinkError, RankFailedError)):
            raise
        click.echo("error: " + " ".join(str(error).split()), err=True)
        sys.exit(2)
