"""Before a day's first stage: every input the day will need, checked in seconds, not hours in.

A paper-size day runs for hours; a bad site map used to surface after synthesize, and a model
that cannot be built or an image pool too small only when its stage came. :func:`check_experiment`
opens each input the way its stage will: the site map (as the day store will), the image pool
(as plan will: big enough for a day, its first image readable), the base backbone cut at its layer
(as synthesize will build it on day 0 and the simulated rig every day), the previous day's model
(day N > 0), and for a real rig with CURVE security the key files. The config itself was
validated when it was read (:mod:`closedloop.config`). The day runner calls it before it writes
anything, so a fixed ``experiment.toml`` is never refused as a change to a begun day.
"""

from __future__ import annotations

from pathlib import Path

from closedloop.config import ExperimentConfig
from closedloop.day.context import make_site_table
from closedloop.images import ImageSet, read_image_source
from closedloop.link.keys import load_key_pair, load_public_key
from models import load_backbone, read_it_model

__all__ = ["check_experiment"]


def check_experiment(config: ExperimentConfig, *, images: ImageSet | None = None,
                     previous_model: Path | None = None) -> None:
    """Check every input a day of ``config`` needs; raise at the first problem.

    ``images``: the image pool when the caller has it already (else it is read from the config);
    ``previous_model``: day N−1's fitted model, for day N > 0. Raises ``ValueError`` (or
    ``FileNotFoundError``) whose message starts with the config key at fault and names the file.
    """
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"'config' must be an ExperimentConfig (from read_config), but got {type(config).__name__}.")
    _check_sites(config)
    _check_images(config, images)
    _check_backbone(config)
    if previous_model is not None:
        _check(lambda: read_it_model(previous_model), f"day N−1's model {str(previous_model)!r}")
    _check_rig_keys(config)


def _check(action, where: str) -> None:
    """Run ``action``; a ValueError or FileNotFoundError it raises gets ``where`` in front."""
    try:
        action()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{where}: {error}") from None
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _check_sites(config: ExperimentConfig) -> None:
    if config.sites.site_map:
        _check(lambda: make_site_table(config), "[sites] site_map")


def _check_images(config: ExperimentConfig, images: ImageSet | None) -> None:
    section = config.images
    if images is None:
        images = _read_images(config)
    for key in ("n_clean_day0", "n_clean_per_day"):
        needed = getattr(section, key)
        if needed > len(images):
            raise ValueError(
                f"[images] {key} = {needed}: the image pool ({images.origin}) holds {len(images)} images; "
                f"give a larger source (or, for the embedded one, more embedded_per_photo), or {key} <= {len(images)}."
            )
    _check(lambda: images.read([0]), f"[images] source = {section.source!r}")


def _read_images(config: ExperimentConfig) -> ImageSet:
    section = config.images
    try:
        return read_image_source(section.source, per_photo=section.embedded_per_photo, seed=config.experiment.seed)
    except ValueError as error:
        raise ValueError(f"[images] source = {section.source!r}: {error}") from None


def _check_backbone(config: ExperimentConfig) -> None:
    model = config.model
    _check(lambda: load_backbone(model.backbone, model.layer, trust=model.trust_checkpoint),
           f"[model] backbone = {model.backbone!r}, layer = {model.layer!r}")


def _check_rig_keys(config: ExperimentConfig) -> None:
    rig = config.rig
    if rig.kind != "zmq" or rig.security != "curve":
        return  # the simulated rig makes its own keys; plain needs none

    def load() -> None:
        load_key_pair(rig.keys_dir, "control")
        load_public_key(Path(rig.keys_dir) / "rig.key")

    _check(load, f"[rig] keys_dir = {rig.keys_dir!r} (security = 'curve'; make keys with `closedloop keys DIR`)")
