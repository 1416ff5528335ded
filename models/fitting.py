"""Fitting the IT model to recorded spike counts, end to end, with early stopping.

Targets are per-stimulus mean counts (spikes per response window). Stimuli, not presentations,
are split into training and held-out sets, so no held-out image is ever trained on. The
backbone's batch-norm statistics stay frozen (the model runs in eval mode): small batches of
RSVP images should not rewrite ImageNet statistics. Every fit is deterministic given ``seed``
(on the CPU; CUDA kernels may differ in the last bits).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from closedloop.core.logs import logger, progress
from closedloop.core.validation import check_indices, check_integer, check_number, check_option
from closedloop.images import to_tensor
from models.devices import resolve_device
from models.it_model import ITModel
from models.predictivity import compute_pearson, compute_split_half_reliability

__all__ = ["FitResult", "fit_it_model", "LOSSES"]

LOSSES = ("poisson", "mse")
_FEATURE_CACHE_BYTES = 2 * 1024**3  # frozen-backbone features kept in memory up to this size


@dataclass(frozen=True)
class FitResult:
    """What a fit achieved, on the held-out stimuli.

    ``held_out_r``: (n_sites,) Pearson r between predicted and mean observed counts on the
    held-out stimuli, with the best state. ``reliability``: (n_sites,) split-half reliability ρ of
    the held-out stimuli's mean counts (Spearman-Brown corrected); a perfect model reaches
    ``held_out_r`` ≈ √ρ, so ``held_out_r / sqrt(reliability)`` is the noise-corrected
    predictivity. NaN where no held-out stimulus has >= 2 presentations. ``n_epochs``: epochs run;
    ``best_epoch``: the epoch whose state was kept (0 = the model before training).
    ``train_loss``: (n_epochs,) mean training loss per epoch (without the L1 term);
    ``held_out_loss``: (n_epochs + 1,) held-out loss before training and after each epoch.
    ``held_out_stimuli``: indices into ``images`` of the held-out stimuli.
    """

    held_out_r: np.ndarray
    reliability: np.ndarray
    n_epochs: int
    best_epoch: int
    train_loss: tuple[float, ...]
    held_out_loss: tuple[float, ...]
    held_out_stimuli: np.ndarray

    def summary(self) -> dict:
        """JSON-able summary (NaN written as None)."""
        return {
            "n_epochs": self.n_epochs,
            "best_epoch": self.best_epoch,
            "best_held_out_loss": self.held_out_loss[self.best_epoch],
            "median_held_out_r": _json_float(np.nanmedian(self.held_out_r)) if np.isfinite(self.held_out_r).any() else None,
            "held_out_r": [_json_float(r) for r in self.held_out_r],
            "reliability": [_json_float(r) for r in self.reliability],
            "train_loss": list(self.train_loss),
            "held_out_loss": list(self.held_out_loss),
        }


def fit_it_model(
    model: ITModel,
    images: np.ndarray,
    counts: np.ndarray,
    stimulus: np.ndarray,
    *,
    loss: str = "poisson",
    epochs: int = 30,
    learning_rate: float = 1e-3,
    backbone_learning_rate: float = 1e-5,
    batch_size: int = 32,
    held_out_fraction: float = 0.1,
    patience: int = 5,
    freeze_backbone: bool = False,
    l1: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    calibrate_bias: bool = True,
) -> FitResult:
    """Train ``model`` in place on recorded counts; keep the state with the best held-out loss.

    ``images``: uint8 (n_stimuli, H, W, 3), channels last (224 × 224 by the pixel contract).
    ``counts``: (n_presentations, n_sites) spikes per response window. ``stimulus``:
    (n_presentations,) index into ``images`` of each presentation; stimuli never presented are
    ignored. ``loss``: ``"poisson"`` (negative log likelihood of the mean counts) or ``"mse"``.
    Adam with ``learning_rate`` for the readout and ``backbone_learning_rate`` for the backbone
    (trained too unless ``freeze_backbone`` or the rate is 0). ``l1`` weighs the readout's
    :meth:`~models.FactorizedReadout.l1_penalty`. ``held_out_fraction`` of the stimuli (at least
    2) are held out, chosen with ``seed``; training stops after ``patience`` epochs without a
    lower held-out loss. ``calibrate_bias``: first shift each site's readout bias so that its
    mean prediction over the training stimuli equals its mean count (a random day-0 readout
    predicts counts of about 1; harmless for a fitted model).

    The model ends on the device it started on, in eval mode; a summary is appended to
    ``model.metadata["history"]``.
    """
    counts, stimulus = _check_fit_inputs(model, images, counts, stimulus)
    targets, presented = _mean_counts(counts, stimulus, images.shape[0])
    check_option("loss", loss, LOSSES)
    check_integer("epochs", epochs, minimum=1)
    check_number("learning_rate", learning_rate, minimum=0.0, inclusive=False)
    check_number("backbone_learning_rate", backbone_learning_rate, minimum=0.0)
    check_integer("batch_size", batch_size, minimum=1)
    check_number("held_out_fraction", held_out_fraction, minimum=0.0, maximum=1.0, inclusive=False)
    check_integer("patience", patience, minimum=1)
    check_number("l1", l1, minimum=0.0)
    check_integer("seed", seed, minimum=0)
    train, held_out = _split_stimuli(presented, held_out_fraction, seed)
    train_backbone = not freeze_backbone and backbone_learning_rate > 0
    held_out_presentations = np.isin(stimulus, held_out)
    reliability = compute_split_half_reliability(
        counts[held_out_presentations], stimulus[held_out_presentations], seed=seed
    )
    home = next(model.parameters()).device
    model.to(resolve_device(device)).eval()
    try:
        result = _train(
            model, images, targets, train, held_out, reliability,
            loss_function=_LOSS_FUNCTIONS[loss], epochs=epochs, learning_rate=learning_rate,
            backbone_learning_rate=backbone_learning_rate if train_backbone else None,
            batch_size=batch_size, patience=patience, l1=l1, seed=seed, calibrate_bias=calibrate_bias,
        )
    finally:
        model.requires_grad_(True)
        model.to(home).eval()
    model.metadata["history"].append(
        {
            "fitted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "n_stimuli": int(presented.size),
            "n_presentations": int(stimulus.size),
            "n_train_stimuli": int(train.size),
            "n_held_out_stimuli": int(held_out.size),
            "settings": {
                "loss": loss, "epochs": epochs, "learning_rate": learning_rate,
                "backbone_learning_rate": backbone_learning_rate, "batch_size": batch_size,
                "held_out_fraction": held_out_fraction, "patience": patience,
                "freeze_backbone": not train_backbone, "l1": l1, "seed": seed, "calibrate_bias": calibrate_bias,
            },
        }
        | result.summary()
    )
    logger.info(
        "fitted IT model: %d epochs, best epoch %d, held-out loss %.4g, median held-out r %s",
        result.n_epochs, result.best_epoch, result.held_out_loss[result.best_epoch],
        model.metadata["history"][-1]["median_held_out_r"],
    )
    return result


def _poisson_loss(predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    return F.poisson_nll_loss(predicted, observed, log_input=False, full=False, eps=1e-8)


_LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "poisson": _poisson_loss,
    "mse": F.mse_loss,
}


def _check_fit_inputs(model, images, counts, stimulus) -> tuple[np.ndarray, np.ndarray]:
    """``counts`` and ``stimulus`` as checked arrays."""
    if not isinstance(model, ITModel):
        raise TypeError(f"'model' must be a models.ITModel, but got {type(model).__name__}.")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        shown = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"'images' must be a uint8 array (n_stimuli, 224, 224, 3), channels last, but got {shown}.")
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != model.n_sites:
        raise ValueError(
            f"'counts' must have shape (n_presentations, n_sites) with n_sites = {model.n_sites}, but got {counts.shape}."
        )
    if not np.issubdtype(counts.dtype, np.number) or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("'counts' must hold finite spike counts >= 0; drop or fix invalid presentations first.")
    stimulus = np.asarray(stimulus)
    if stimulus.shape != (counts.shape[0],):
        raise ValueError(
            f"'stimulus' must have shape (n_presentations,) = ({counts.shape[0]},) to match 'counts', but got {stimulus.shape}."
        )
    return counts, check_indices("stimulus", stimulus, images.shape[0])


def _mean_counts(counts: np.ndarray, stimulus: np.ndarray, n_stimuli: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-stimulus mean counts (n_stimuli, n_sites) float32 and the indices of presented stimuli."""
    totals = np.zeros((n_stimuli, counts.shape[1]))
    np.add.at(totals, stimulus, counts)
    repeats = np.bincount(stimulus, minlength=n_stimuli)
    targets = (totals / np.maximum(repeats, 1)[:, None]).astype(np.float32)
    return targets, np.flatnonzero(repeats)


def _split_stimuli(presented: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_held_out = max(2, int(round(fraction * presented.size)))
    if presented.size - n_held_out < 1:
        raise ValueError(
            f"'stimulus' names only {presented.size} distinct stimuli; fitting needs at least {n_held_out + 1} "
            f"(2 held out with held_out_fraction = {fraction:g}, 1 to train on); record more stimuli."
        )
    shuffled = np.random.default_rng(seed).permutation(presented)
    return np.sort(shuffled[n_held_out:]), np.sort(shuffled[:n_held_out])


def _train(
    model: ITModel, images, targets, train, held_out, reliability, *, loss_function, epochs, learning_rate,
    backbone_learning_rate, batch_size, patience, l1, seed, calibrate_bias,
) -> FitResult:
    device = next(model.parameters()).device
    model.backbone.requires_grad_(backbone_learning_rate is not None)
    features = _make_feature_reader(model, images, np.concatenate([train, held_out]), batch_size,
                                    frozen=backbone_learning_rate is None)
    if calibrate_bias:
        _calibrate_bias(model, features, targets, train, batch_size)
    groups = [{"params": model.readout.parameters(), "lr": learning_rate}]
    if backbone_learning_rate is not None:
        groups.append({"params": model.backbone.parameters(), "lr": backbone_learning_rate})
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(seed)
    observed_held_out = torch.from_numpy(targets[held_out])
    predicted = _predict(model, features, held_out, batch_size)
    held_out_loss = [float(loss_function(predicted, observed_held_out))]
    best_epoch, best_predicted = 0, predicted
    best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    train_loss: list[float] = []
    for epoch in progress(range(1, epochs + 1), description="fitting IT model"):
        total = 0.0
        for batch in torch.randperm(train.size, generator=generator).split(batch_size):
            chosen = train[batch.numpy()]
            predicted = model.counts_from_features(features(chosen))
            fit_loss = loss_function(predicted, torch.from_numpy(targets[chosen]).to(device))
            optimizer.zero_grad(set_to_none=True)
            (fit_loss + l1 * model.readout.l1_penalty()).backward()
            optimizer.step()
            total += float(fit_loss.detach()) * chosen.size
        train_loss.append(total / train.size)
        predicted = _predict(model, features, held_out, batch_size)
        held_out_loss.append(float(loss_function(predicted, observed_held_out)))
        logger.debug("epoch %d: train loss %.4g, held-out loss %.4g", epoch, train_loss[-1], held_out_loss[-1])
        if held_out_loss[-1] < held_out_loss[best_epoch]:
            best_epoch, best_predicted = epoch, predicted
            best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return FitResult(
        held_out_r=compute_pearson(best_predicted, observed_held_out),
        reliability=reliability,
        n_epochs=len(train_loss),
        best_epoch=best_epoch,
        train_loss=tuple(train_loss),
        held_out_loss=tuple(held_out_loss),
        held_out_stimuli=held_out,
    )


def _make_feature_reader(
    model: ITModel, images: np.ndarray, stimuli: np.ndarray, batch_size: int, *, frozen: bool
) -> Callable[[np.ndarray], torch.Tensor]:
    """A function: stimulus indices → backbone features on the model's device.

    A frozen backbone is run once per stimulus and its features kept (if they fit in
    ``_FEATURE_CACHE_BYTES``), so later epochs only run the readout.
    """
    device = next(model.parameters()).device
    n_bytes = stimuli.size * int(np.prod(model.readout.in_shape)) * 4
    if not frozen or n_bytes > _FEATURE_CACHE_BYTES:
        return lambda chosen: model.backbone(to_tensor(images[chosen], device))
    with torch.no_grad():
        cache = torch.cat([model.backbone(to_tensor(images[part], device)) for part in _batches(stimuli, batch_size)])
    rows = np.zeros(images.shape[0], dtype=np.int64)
    rows[stimuli] = np.arange(stimuli.size)
    return lambda chosen: cache[torch.from_numpy(rows[chosen]).to(device)]


def _batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return np.array_split(indices, max(1, -(-indices.size // batch_size)))


@torch.no_grad()
def _predict(model: ITModel, features, chosen: np.ndarray, batch_size: int, *, raw: bool = False) -> torch.Tensor:
    """Predicted counts (len(chosen), n_sites) on the CPU; ``raw``: readout values before the softplus."""
    head = model.readout if raw else model.counts_from_features
    return torch.cat([head(features(part)).cpu() for part in _batches(chosen, batch_size)])


@torch.no_grad()
def _calibrate_bias(model: ITModel, features, targets, train, batch_size) -> None:
    """Shift each site's bias so its mean predicted count over ``train`` equals its mean count (bisection)."""
    raw = _predict(model, features, train, batch_size, raw=True)
    wanted = torch.from_numpy(targets[train].mean(axis=0)).clamp(min=1e-3)
    reach = float(wanted.max() + raw.abs().max()) + 50.0
    low, high = torch.full_like(wanted, -reach), torch.full_like(wanted, reach)
    for _ in range(60):
        middle = (low + high) / 2
        too_high = F.softplus(raw + middle).mean(dim=0) > wanted
        high, low = torch.where(too_high, middle, high), torch.where(too_high, low, middle)
    model.readout.bias += ((low + high) / 2).to(model.readout.bias.device)


def _json_float(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None
