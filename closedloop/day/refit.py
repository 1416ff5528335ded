"""Stage 7 of a day: refit the IT model end to end on every day recorded so far."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from closedloop.config import ExperimentConfig
from closedloop.data import layout
from closedloop.data.store import open_store
from closedloop.sensitivity.responses import read_day_responses
from models import fit_it_model, write_it_model

__all__ = ["read_training_data", "fit_day_model", "run_stage"]


def read_training_data(day_folders) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every stimulus and valid presentation of the given day folders.

    Returns ``images`` uint8 (n_stimuli, 224, 224, 3) (all days concatenated), ``counts``
    (n_valid_presentations, n_sites) spikes per window and ``stimulus`` (n_valid_presentations,)
    indices into ``images``.
    """
    images, counts, stimulus, offset = [], [], [], 0
    for folder in day_folders:
        store_path = Path(folder) / layout.STORE
        responses = read_day_responses(store_path)
        images.append(open_store(store_path).read_stimuli(pixels=True)["pixels"])
        counts.append(responses.counts[responses.valid])
        stimulus.append(responses.stimulus[responses.valid] + offset)
        offset += len(images[-1])
    return np.concatenate(images), np.concatenate(counts), np.concatenate(stimulus)


def fit_day_model(config: ExperimentConfig, experiment: Path, day: int, model, *, seed: int, device, path: Path) -> dict:
    """Fit ``model`` (day N−1's, warm start) on days 0..``day`` and write it to ``path``.

    Returns the fit summary (held-out r per site, reliability, epochs) plus the data sizes.
    """
    folders = [layout.day_folder(experiment, d) for d in range(day + 1)]
    images, counts, stimulus = read_training_data(folders)
    fit = config.fit
    result = fit_it_model(
        model, images, counts, stimulus, loss=fit.loss, epochs=fit.epochs, learning_rate=fit.learning_rate,
        backbone_learning_rate=fit.backbone_learning_rate, batch_size=fit.batch_size,
        held_out_fraction=fit.held_out_fraction, patience=fit.patience, freeze_backbone=fit.freeze_backbone,
        l1=config.model.readout_l1, seed=seed, device=device,
    )
    sizes = {"n_days": day + 1, "n_stimuli": int(len(images)), "n_presentations": int(len(stimulus))}
    write_it_model(model.cpu(), path, metadata={"experiment": config.experiment.name, "day": day, **sizes})
    return {**sizes, **result.summary()}


def run_stage(day) -> dict:
    """The refit stage: fit day N−1's model on days 0..N, write ``model.safetensors``."""
    return fit_day_model(day.config, day.experiment, day.number, day.generating_model(), seed=day.seed("refit"),
                         device=day.device, path=day.path(layout.MODEL))
