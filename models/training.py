"""Training classifiers, vanilla or adversarially (L2 PGD inside every step), on one or many devices.

Adversarial training (Madry et al.; the robustness library's recipe as used by Gaziv et al.):
every training step first attacks its batch with L2 PGD at the training budget ε (the one engine,
:func:`closedloop.attacks.engine.compute_pgd`: model in eval mode, no random start, best iterate kept)
and then takes an SGD step on the attacked images. ε = 0 is vanilla training. The published
(steps, step size) per training ε are in :data:`TRAINING_ATTACKS`.

One process or many: run the same code under ``torchrun`` and every process trains on its own
shard (``DistributedSampler``) of a DistributedDataParallel model (gloo on CPU, nccl on GPU);
only rank 0 writes. ``batch_size`` is the global batch, split evenly over the processes.

Checkpoints (folder ``out``): ``classifier.safetensors`` + ``classifier.json`` (the network, its
categories, and ``training``: the settings, the epochs done, a history per epoch) and
``optimizer.safetensors`` (SGD momentum buffers by parameter name, with the epoch in its
metadata), written after every epoch. A rerun with the same settings resumes after the last
finished epoch and gives the same result as an uninterrupted run (shuffling and flips are
derived from ``seed`` and the epoch; the learning-rate schedule from the epoch).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from closedloop.attacks.classifiers import make_classifier_attacks
from closedloop.attacks.engine import compute_pgd, compute_predictions
from closedloop.core.files import atomic_path
from closedloop.core.logs import logger, progress
from closedloop.core.provenance import derive_seed
from closedloop.core.validation import check_indices, check_integer, check_number
from closedloop.images import ImageSet
from models.classifiers import Classifier, load_classifier, write_classifier
from models.devices import resolve_device

__all__ = ["TRAINING_ATTACKS", "compute_training_attack", "fit_classifier", "compute_accuracy", "CHECKPOINT_NAME"]

# Training ε (L2, [0, 1] pixel units at 224 px) → (PGD steps, step size), Gaziv et al.
TRAINING_ATTACKS: dict[float, tuple[int, float]] = {1.0: (7, 0.3), 3.0: (7, 0.5), 10.0: (10, 1.5)}
CHECKPOINT_NAME = "classifier.safetensors"
_OPTIMIZER_NAME = "optimizer.safetensors"
_DEFAULT_STEPS = 7
_SETTING_KEYS = (
    "eps", "attack_steps", "attack_step", "epochs", "batch_size", "learning_rate", "momentum", "weight_decay",
    "seed", "data_sha256", "n_images", "architecture", "category_names", "input_size",
)


def compute_training_attack(eps: float, n_steps: int | None = None, step_size: float | None = None) -> tuple[int, float]:
    """(PGD steps, step size) for adversarial training at L2 budget ``eps`` ([0, 1] pixel units).

    Given values win; otherwise the published pair for ε = 1, 3, 10 (:data:`TRAINING_ATTACKS`),
    and for other ε the robustness library's rule: 7 steps of 2.5 ε / 7. ε = 0 → (0, 0.0): vanilla.
    """
    eps = check_number("eps", eps, minimum=0.0)
    if eps == 0:
        return 0, 0.0
    steps, step = TRAINING_ATTACKS.get(eps, (_DEFAULT_STEPS, 2.5 * eps / _DEFAULT_STEPS))
    steps = steps if n_steps is None else check_integer("n_attack_steps", n_steps, minimum=1)
    step = step if step_size is None else check_number("attack_step", step_size, minimum=0.0, inclusive=False)
    return steps, step


class _Pixels(torch.utils.data.Dataset):
    """(uint8 (H, W, 3) tensor, label) per image, from an array or an :class:`ImageSet` (read lazily)."""

    def __init__(self, images, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        pixels = self.images.read([index])[0] if isinstance(self.images, ImageSet) else self.images[index]
        return torch.from_numpy(np.ascontiguousarray(pixels)), int(self.labels[index])


@contextmanager
def _process_group(device: str | torch.device) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) of this process; joins the torchrun process group if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world == 1:
        yield 0, 1, device
        return

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if created:
            dist.destroy_process_group()


def _data_digest(images, labels: np.ndarray) -> str:
    digest = hashlib.sha256(labels.astype(np.int64).tobytes())
    digest.update(images.digest().encode() if isinstance(images, ImageSet) else np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def _check_training_inputs(classifier, images, labels) -> np.ndarray:
    if not isinstance(classifier, Classifier):
        raise TypeError(f"'classifier' must be a models.Classifier, but got {type(classifier).__name__}.")
    if classifier.restricted:
        raise ValueError(
            "'classifier' gives Restricted-ImageNet logits (max over class ranges); train its 1000-way network "
            "instead: load it with restricted=False."
        )
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"'images' must be uint8 (n_images, H, W, 3), but got {images.dtype} {images.shape}.")
    elif not isinstance(images, ImageSet):
        raise TypeError(f"'images' must be a uint8 numpy array or a closedloop ImageSet, but got {type(images).__name__}.")
    labels = check_indices("labels", labels, classifier.n_categories)
    if labels.shape != (len(images),):
        raise ValueError(f"'labels' must have shape ({len(images)},), one category per image, but got {labels.shape}.")
    return labels


def _to_images(pixels: torch.Tensor, flips: torch.Generator, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [0, 1] on ``device``, half of them mirrored left-right."""
    images = pixels.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mirror = (torch.rand(len(images), generator=flips) < 0.5).to(device).view(-1, 1, 1, 1)
    return torch.where(mirror, images.flip(3), images)


def _write_checkpoint(classifier: Classifier, optimizer, out: Path, epoch: int) -> None:


    names = {id(parameter): name for name, parameter in classifier.named_parameters()}
    state = {
        f"momentum_buffer.{names[id(parameter)]}": values["momentum_buffer"].detach().cpu().contiguous()
        for parameter, values in optimizer.state.items()
        if values.get("momentum_buffer") is not None
    }
    with atomic_path(out / _OPTIMIZER_NAME) as temporary:
        save_file(state, temporary, metadata={"epoch": str(epoch)})
    write_classifier(classifier, out / CHECKPOINT_NAME)


def _resume(classifier: Classifier, optimizer, out: Path, settings: dict) -> list[dict]:
    """Load the checkpoint in ``out`` if it was made with ``settings``; return its history (epochs done)."""

    path = out / CHECKPOINT_NAME
    if not path.is_file():
        return []
    saved = load_classifier(path, restricted=False)
    training = saved.metadata.get("training", {})
    differ = [key for key in _SETTING_KEYS if training.get(key) != settings[key]]
    if differ:
        shown = ", ".join(f"{key}: {training.get(key)!r} there, {settings[key]!r} now" for key in differ)
        raise ValueError(
            f"'out' {str(out)!r} holds a checkpoint trained with other settings ({shown}); give another folder, "
            "or restart=True (closedloop train-robust --restart) to train from scratch there."
        )
    history = list(training.get("history", []))
    with safe_open(out / _OPTIMIZER_NAME, framework="pt") as handle:
        if int(handle.metadata()["epoch"]) != len(history):
            raise ValueError(
                f"'out' {str(out)!r}: the optimizer state and the classifier are from different epochs (an interrupted "
                "write); restart=True (closedloop train-robust --restart) trains from scratch."
            )
        buffers = {key: handle.get_tensor(key) for key in handle.keys()}
    classifier.network.load_state_dict(saved.network.state_dict())
    device = next(classifier.parameters()).device
    for name, parameter in classifier.named_parameters():
        if f"momentum_buffer.{name}" in buffers:
            optimizer.state[parameter]["momentum_buffer"] = buffers[f"momentum_buffer.{name}"].to(device)
    logger.info("resuming %s after epoch %d", out, len(history))
    return history


def fit_classifier(
    classifier: Classifier,
    images,
    labels,
    out: str | Path,
    *,
    eps: float = 0.0,
    n_attack_steps: int | None = None,
    attack_step: float | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    restart: bool = False,
) -> dict:
    """Train ``classifier`` in place (vanilla if ``eps`` = 0, else adversarially) and checkpoint it in ``out``.

    ``images``: uint8 (n_images, H, W, 3), or an :class:`~closedloop.images.ImageSet` read lazily
    (224 × 224). ``labels``: (n_images,) category index of each image. ``eps``: training L2 budget
    in [0, 1] pixel units; ``n_attack_steps`` / ``attack_step``: PGD steps and step size (default
    :func:`compute_training_attack`). SGD with ``momentum`` and ``weight_decay``; the learning
    rate falls from ``learning_rate`` to 0 over ``epochs`` on a cosine. ``batch_size``: images per
    step over all processes. Images are reshuffled and half of them mirrored every epoch, from
    ``seed``. ``num_workers``: data-loading worker processes. An existing checkpoint in ``out``
    with the same settings is resumed (``restart`` trains from scratch instead).

    Returns the ``training`` metadata written with the checkpoint: the settings, ``history`` (per
    epoch: ``loss``, ``accuracy`` on the images trained on (attacked ones when ε > 0), ``seconds``)
    and ``world_size``. The classifier ends in eval mode on ``device``.
    """
    labels = _check_training_inputs(classifier, images, labels)
    attack_steps, attack_step = compute_training_attack(eps, n_attack_steps, attack_step)
    epochs = check_integer("epochs", epochs, minimum=1)
    batch_size = check_integer("batch_size", batch_size, minimum=1)
    num_workers = check_integer("num_workers", num_workers, minimum=0)
    settings = {
        "eps": float(eps), "attack_steps": attack_steps, "attack_step": attack_step, "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": check_number("learning_rate", learning_rate, minimum=0.0, inclusive=False),
        "momentum": check_number("momentum", momentum, minimum=0.0, maximum=1.0),
        "weight_decay": check_number("weight_decay", weight_decay, minimum=0.0),
        "seed": check_integer("seed", seed, minimum=0),
        "data_sha256": _data_digest(images, labels), "n_images": len(labels),
        "architecture": classifier.architecture, "category_names": list(classifier.category_names),
        "input_size": classifier.input_size,
    }
    out = Path(out).expanduser()
    with _process_group(device) as (rank, world, device):
        if batch_size % world:
            raise ValueError(f"'batch_size' = {batch_size} must be a multiple of the number of processes ({world}).")
        classifier.to(device)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
        history = [] if restart else _resume(classifier, optimizer, out, settings)
        dataset = _Pixels(images, labels)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size // world, sampler=sampler, num_workers=num_workers)
        model = classifier
        if world > 1:

            model = DistributedDataParallel(classifier, device_ids=[device] if device.type == "cuda" else None)
        for epoch in range(len(history), epochs):
            started = time.monotonic()
            sampler.set_epoch(epoch)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
            flips = torch.Generator().manual_seed(derive_seed(seed, "flip", epoch, rank))
            totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
            classifier.train()
            for pixels, target in progress(loader, description=f"epoch {epoch + 1}/{epochs}"):
                x, target = _to_images(pixels, flips, device), target.to(device)
                if attack_steps:
                    objective = lambda logits, target=target: -F.cross_entropy(logits, target, reduction="none")
                    x = compute_pgd(classifier, x, eps=eps, step_size=attack_step, n_steps=attack_steps, objective=objective).images
                logits = model(x)
                loss = F.cross_entropy(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                correct = (logits.detach().argmax(1) == target).sum()
                totals += torch.stack([loss.detach().double() * len(target), correct.double(), totals.new_tensor(len(target))])
            if world > 1:

                dist.all_reduce(totals)
            loss_sum, n_correct, n_seen = totals.tolist()
            history.append({"epoch": epoch + 1, "loss": loss_sum / n_seen, "accuracy": n_correct / n_seen,
                            "seconds": time.monotonic() - started})
            logger.info("epoch %d/%d: loss %.4f, accuracy %.3f", epoch + 1, epochs, loss_sum / n_seen, n_correct / n_seen)
            classifier.metadata["training"] = settings | {"history": history, "world_size": world}
            if rank == 0:
                _write_checkpoint(classifier, optimizer, out, epoch + 1)
            if world > 1:
                dist.barrier()
        classifier.metadata["training"] = settings | {"history": history, "world_size": world}
    return classifier.eval().metadata["training"]


def compute_accuracy(
    classifier: Classifier,
    pixels: np.ndarray,
    labels,
    *,
    eps: float = 0.0,
    n_steps: int | None = None,
    step_size: float | None = None,
    batch_size: int = 0,
    device="cpu",
) -> float:
    """Fraction of images whose top category is their label, on 8-bit images.

    ``pixels``: uint8 (n_images, H, W, 3); ``labels``: (n_images,). ``eps`` = 0: the clean
    images; ``eps`` > 0: L2 PGD disruption attacks at that budget ([0, 1] pixel units; steps from
    :func:`closedloop.attacks.engine.compute_step_schedule` unless ``n_steps`` / ``step_size`` are given),
    scored on the budget-safe 8-bit attack images.
    """
    labels = check_indices("labels", labels, classifier.n_categories)
    eps = check_number("eps", eps, minimum=0.0)
    if eps == 0:
        logits = compute_predictions(classifier.to(device), pixels, device=device)
    else:
        logits = make_classifier_attacks(
            classifier, pixels, mode="disrupt", eps=eps, labels=labels, n_steps=n_steps, step_size=step_size,
            batch_size=batch_size, device=device,
        ).logits
    if len(logits) != len(labels):
        raise ValueError(f"'labels' must have one entry per image ({len(logits)}), but got {len(labels)}.")
    return float(np.mean(logits.argmax(1) == labels))
