"""The behaviour configuration: one ``behavior.toml`` per behavioural stimulus set, validated on load.

Same rules as the experiment config (closedloop/config.py): every key has a documented default,
unknown keys, wrong types and out-of-range values are refused with a message naming the key, and
relative paths are relative to the folder holding the file. Model sources are
``"embedded:NAME"`` (a small classifier of the embedded default, trained on first use and cached,
see :mod:`closedloop.behavior.models`) or a checkpoint path.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from closedloop.attacks.classifiers import CLASSIFIER_MODES
from closedloop.config import ConfigSection, read_toml_config, render_config, validate_config, write_preset_config
from closedloop.core.validation import check_option

__all__ = [
    "BEHAVIOR_CONFIG_NAME",
    "BEHAVIOR_MODES",
    "BEHAVIOR_PRESETS",
    "BehaviorConfig",
    "build_behavior_config",
    "make_preset_config",
    "render_behavior_config",
    "read_behavior_config",
    "write_default_behavior_config",
]

BEHAVIOR_CONFIG_NAME = "behavior.toml"
BEHAVIOR_MODES = (*CLASSIFIER_MODES, "interpolation", "gaussian", "control")
EMBEDDED = "embedded"
EMBEDDED_PREFIX = "embedded:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StimuliSection(ConfigSection):
    """[stimuli]: start images and the new class of feature-centroid targets."""

    start_images: str = Field(
        EMBEDDED,
        description='"embedded" (crops of 9 scikit-image photographs, the embedded classifiers\' categories) or a '
        "folder in ImageFolder layout whose sub-folder names are the guides' category names (e.g. dog, cat, ...).",
    )
    n_per_category: int = Field(1, ge=1, description="Start images per category (chosen at random from the folder).")
    embedded_per_photo: int = Field(
        8, ge=1, le=500, description="Embedded start images only: crops made per photograph to choose from."
    )
    new_class: str = Field(
        EMBEDDED,
        description='Images of a new class for feature-centroid targets: a folder of images, "embedded" (crops of the '
        'immunohistochemistry photograph, in no guide\'s categories), or "" for none.',
    )
    n_new_class: int = Field(64, ge=1, description="New-class images averaged into the centroid (at most; paper: 60-100).")
    seed: int = Field(0, ge=0, description="Seed of every random choice (start images, composite targets, noise).")


class ModelsSection(ConfigSection):
    """[models]: guides (make the perturbations) and surrogates (only score them)."""

    guides: dict[str, str] = Field(
        {"vanilla": "embedded:vanilla", "robust": "embedded:robust"},
        description='Name -> source: "embedded:vanilla", "embedded:robust" (training eps 3), "embedded:vanilla-seed1", '
        '"embedded:robust-seed1", or a checkpoint (closedloop classifier .safetensors, robustness-library .pt, '
        "torchvision state dict; 1000-way ImageNet networks give the 9 Restricted-ImageNet categories).",
    )
    surrogates: dict[str, str] = Field(
        {"vanilla-seed1": "embedded:vanilla-seed1", "robust-seed1": "embedded:robust-seed1"},
        description="Name -> source, as for guides: the same recipes from another seed; every image is scored by each.",
    )
    trust_checkpoints: bool = Field(
        False, description="Allow full unpickling of .pt checkpoints (runs code from the file: only for files you trust)."
    )
    cache: str = Field("daily_runs/cache", description="Folder where the embedded classifiers are trained and kept.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description='"auto" uses CUDA when available.')

    @model_validator(mode="after")
    def _names(self) -> ModelsSection:
        if not self.guides:
            raise ValueError("[models] guides: give at least one guide, e.g. { robust = \"embedded:robust\" }")
        names = list(self.guides) + list(self.surrogates)
        bad = [name for name in names if not _NAME.match(name)]
        if bad:
            raise ValueError(f"model names {bad} are not allowed: use letters, digits, '_', '.' and '-' (they name folders)")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"model names {twice} are used twice; every guide and surrogate needs its own name")
        return self


class PerturbationsSection(ConfigSection):
    """[perturbations]: budgets and kinds of perturbation (Gaziv et al.)."""

    budgets: list[float] = Field(
        [0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0],
        min_length=1,
        description="L2 budgets eps in [0,1] pixel units over 3x224x224 values (one pixel black->white = 1.73).",
    )
    modes: list[Literal[BEHAVIOR_MODES]] = Field(
        list(BEHAVIOR_MODES),
        min_length=1,
        description="disrupt, target (each other category), composite (pairs and triples), centroid (new class), "
        "interpolation (toward an image of each other category), gaussian, control (unperturbed).",
    )
    composite_pairs: int = Field(2, ge=0, description="Composite target pairs per start image (drawn from the other categories).")
    composite_triples: int = Field(2, ge=0, description="Composite target triples per start image.")
    n_steps: int = Field(
        0, ge=0, description="PGD iterations per attack; 0 uses the published budget -> (step, iterations) schedule."
    )
    logit_push: float = Field(0.1, ge=0.0, description="Composite targets: weight of the push on the target logits.")
    batch_size: int = Field(0, ge=0, description="Images per attack batch; 0 sizes batches to the device (32 on CPU).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description='Arithmetic of the attack steps: "auto" = bf16 autocast where the device runs bf16 natively '
        '(CUDA GPUs from compute capability 8.0, CPUs with AVX-512 BF16/AMX), else fp32; "fp32" or "bf16" force it. '
        "Rounding, budgets and logits are fp32 either way.",
    )

    @field_validator("budgets")
    @classmethod
    def _positive_budgets(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if not (math.isfinite(b) and b > 0)]
        if bad:
            raise ValueError(f"every budget must be a finite number > 0; bad values: {bad}")
        return sorted(set(budgets))

    @field_validator("modes")
    @classmethod
    def _distinct_modes(cls, modes: list[str]) -> list[str]:
        return [mode for mode in BEHAVIOR_MODES if mode in modes]


class BehaviorConfig(ConfigSection):
    """The whole behaviour configuration (one TOML file)."""

    stimuli: StimuliSection = StimuliSection()
    models: ModelsSection = ModelsSection()
    perturbations: PerturbationsSection = PerturbationsSection()

    @model_validator(mode="after")
    def _centroid_needs_new_class(self) -> BehaviorConfig:
        if "centroid" in self.perturbations.modes and not self.stimuli.new_class:
            raise ValueError('[perturbations] modes has "centroid" but [stimuli] new_class is ""; give a folder or drop the mode')
        return self


BEHAVIOR_PRESETS: dict[str, dict] = {
    "paper": {},
    "embedded": {
        "perturbations": {"budgets": [5.0, 15.0, 30.0], "n_steps": 50, "composite_pairs": 1, "composite_triples": 1},
    },
    "demo": {  # closedloop behavior demo: one guide and its surrogate, 171 images
        "models": {"guides": {"robust": "embedded:robust"}, "surrogates": {"robust-seed1": "embedded:robust-seed1"}},
        "perturbations": {"budgets": [15.0, 30.0], "modes": ["disrupt", "target", "control"], "n_steps": 50},
    },
}


def build_behavior_config(data: dict, *, source: str = "behavior config") -> BehaviorConfig:
    """Validate a plain dict (as parsed from TOML) into a :class:`BehaviorConfig`."""
    return validate_config(BehaviorConfig, data, source=source)


def _resolve_paths(config: BehaviorConfig, base: Path) -> BehaviorConfig:
    """Resolve relative paths against ``base``; check that named folders and checkpoint files exist."""

    def resolve(text: str, key: str, *, folder: bool) -> str:
        path = (base / Path(text).expanduser()).resolve()
        if not (path.is_dir() if folder else path.is_file()):
            kind = "folder" if folder else "checkpoint file"
            raise FileNotFoundError(f"{key} = {text!r}: no such {kind} ({path}); give an existing one or \"embedded\"")
        return str(path)

    stimuli = {
        key: resolve(value, f"[stimuli] {key}", folder=True)
        for key, value in (("start_images", config.stimuli.start_images), ("new_class", config.stimuli.new_class))
        if value not in (EMBEDDED, "")
    }
    models = {"cache": str((base / Path(config.models.cache).expanduser()).resolve())}
    for role in ("guides", "surrogates"):
        models[role] = {
            name: source if source.startswith(EMBEDDED_PREFIX) else resolve(source, f"[models] {role}.{name}", folder=False)
            for name, source in getattr(config.models, role).items()
        }
    return config.model_copy(update={
        "stimuli": config.stimuli.model_copy(update=stimuli),
        "models": config.models.model_copy(update=models),
    })


def read_behavior_config(path: str | Path, *, check_paths: bool = True) -> BehaviorConfig:
    """Read and validate a ``behavior.toml`` (or the one inside a folder); relative paths resolved.

    Raises ``ValueError`` naming the key, the bad value and what is allowed; ``FileNotFoundError``
    when the file or a path it names does not exist.
    """
    data, path = read_toml_config(
        path, BEHAVIOR_CONFIG_NAME, missing="no behaviour config at {path}; create one with `closedloop behavior init FILE`"
    )
    config = build_behavior_config(data, source=str(path))
    return _resolve_paths(config, path.parent) if check_paths else config


def make_preset_config(preset: str, *, base: str | Path = ".") -> BehaviorConfig:
    """The configuration of ``preset`` ("paper" or "embedded"), paths resolved against ``base``."""
    check_option("preset", preset, BEHAVIOR_PRESETS)
    return _resolve_paths(build_behavior_config(BEHAVIOR_PRESETS[preset], source=f"preset {preset!r}"), Path(base))


def render_behavior_config(config: BehaviorConfig) -> str:
    """The configuration as a commented TOML document (every key with its description)."""
    return render_config(config, title="closedloop behaviour configuration (closedloop behavior generate).")


def write_default_behavior_config(path: str | Path, *, preset: str = "embedded", overwrite: bool = False) -> Path:
    """Write a commented ``behavior.toml`` with the defaults of ``preset`` to ``path`` (a file or a folder).

    Returns the path written. Refuses to overwrite an existing file unless ``overwrite``.
    """
    path = Path(path).expanduser()
    if path.is_dir() or not path.suffix:
        path = path / BEHAVIOR_CONFIG_NAME
    return write_preset_config(
        path, BehaviorConfig, BEHAVIOR_PRESETS, preset, render=render_behavior_config, overwrite=overwrite
    )
