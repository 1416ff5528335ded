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


# --- attacks: closedloop bench -------------------------------------------------------------


@cli.command()
@click.option("--backbone", default="resnet_tiny", show_default=True,
              help="Registered backbone name (resnet_tiny, resnet50, ...) or a checkpoint path.")
@click.option("--layer", default="layer4.0", show_default=True, help="Backbone layer feeding the readout.")
@click.option("--n-sites", type=click.IntRange(1), default=21, show_default=True, help="Sites of the IT model.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Images per batch.")
@click.option("--n-steps", type=click.IntRange(1), default=20, show_default=True, help="PGD steps per timed run.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed runs (median reported).")
@click.option("--image-size", type=click.IntRange(32), default=224, show_default=True, help="Image side, px.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--bf16", is_flag=True, help="bf16 autocast in the attack steps (GPU).")
@click.option("--channels-last", is_flag=True, help="Channels-last memory format (GPU).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench(backbone: str, layer: str, n_sites: int, batch_size: int, n_steps: int, repeats: int, image_size: int,
          device: str, bf16: bool, channels_last: bool, compile_model: bool, as_json: bool) -> None:
    """Measure attack speed here: bare fwd+bwd, the engine, batching, a paper-size day."""
    from closedloop.bench import compute_bench
    from models import make_it_model

    model = make_it_model(backbone, layer, n_sites, image_size=image_size)
    result = {"backbone": backbone, "layer": layer}
    result |= compute_bench(model, batch_size=batch_size, n_steps=n_steps, n_repeats=repeats, image_size=image_size,
                            device=device, autocast=bf16, channels_last=channels_last, compile_model=compile_model)
    text = "\n".join(f"{key:>34}: {value:.4g}" if isinstance(value, float) else f"{key:>34}: {value}"
                     for key, value in result.items())
    _emit(result, as_json, text)


# --- end attacks ------------------------------------------------------------------------------


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
