"""The ``closedloop`` command line: thin wrappers that check input, call the library, print.

Every subcommand has ``--help``; bad input ends with a one-line ``error:`` message and exit
status 2; commands that print results accept ``--json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from closedloop.logs import set_log_level

__all__ = ["main", "cli"]

EXPERIMENT_HELP = "Experiment folder holding experiment.toml."


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
    from closedloop.smoke import compute_model_check

    result = compute_model_check(read_config(experiment), n_images=n_images)
    text = "\n".join(f"{key:>16}: {value}" for key, value in result.items())
    _emit(result, as_json, text)


# ----- rig link (keys, simulated rig) ------------------------------------------------------------


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace existing key pairs (every peer then needs the new public keys).")
@click.option("--json", "as_json", is_flag=True, help="Print the paths written as JSON.")
def keys(folder: Path, force: bool, as_json: bool) -> None:
    """Make CURVE key pairs for the control PC and the rig in FOLDER, and allow the control key on the rig."""
    from closedloop.keys import make_keys

    written = {name: str(path) for name, path in make_keys(folder, overwrite=force).items()}
    text = "\n".join(f"{name:>8}: {path}" for name, path in written.items())
    _emit(written, as_json, text + "\ncopy rig.key_secret and allowed/ to the rig; keep control.key_secret here")


@cli.command("rig-sim")
@click.option("--experiment", "experiment", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help=EXPERIMENT_HELP + " Its [rig], [sites] and [rsvp] sections are used.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the rig's session state and .nev [default: EXPERIMENT/rig-sim].")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Seed of the hidden sites and spikes [default: the experiment seed + 1].")
@click.option("--time-scale", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Real seconds per recording-clock second (0.01 runs 100x faster).")
@click.option("--fixation-break-rate", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Probability that a presentation ends in a fixation break.")
@click.option("--drop", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fault injection: probability of dropping a stream message.")
@click.option("--duplicate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fault injection: probability of sending a stream message twice.")
@click.option("--reorder", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fault injection: probability of holding a stream message back behind the next.")
@click.option("--crash-after", type=click.IntRange(1), default=None,
              help="Fault injection: crash after this many presentations and restart once.")
def rig_sim(experiment: Path, state_dir: Path | None, seed: int | None, time_scale: float,
            fixation_break_rate: float, drop: float, duplicate: float, reorder: float,
            crash_after: int | None) -> None:
    """Run the simulated IT rig on the configured [rig] address until interrupted (Ctrl-C)."""
    import threading

    from closedloop.config import read_config
    from rigs.agent import StreamFaults
    from rigs.sim import run_sim_rig

    config = read_config(experiment)
    rig = config.rig
    stop = threading.Event()
    arguments = dict(
        address=rig.address, state_dir=state_dir or Path(experiment) / "rig-sim", n_sites=config.sites.n_sites,
        seed=config.experiment.seed + 1 if seed is None else seed, time_scale=time_scale,
        on_s=config.rsvp.on_s, off_s=config.rsvp.off_s, fixation_break_rate=fixation_break_rate,
        faults=StreamFaults(drop=drop, duplicate=duplicate, reorder=reorder, seed=config.experiment.seed),
        security=rig.security, keys_dir=rig.keys_dir, heartbeat_s=rig.heartbeat_s, timeout_s=rig.timeout_s,
    )
    try:
        run_sim_rig(stop, crash_after=crash_after, on_start=lambda agent: click.echo(f"serving on {agent.address}"),
                    **arguments)
    except KeyboardInterrupt:
        stop.set()


_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning bad input into a one-line error and exit status 2."""
    try:
        cli.main(args=argv, prog_name="closedloop", standalone_mode=False)
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
