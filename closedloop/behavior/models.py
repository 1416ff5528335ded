"""The guides and surrogates of a behavioural stimulus set, and the embedded default classifiers.

The embedded default (no download, CPU): nine of the fourteen scikit-image photographs are nine
categories (:data:`EMBEDDED_CATEGORIES`; the other five are left out: four are grey textures or
another grey photograph that crop to near-identical images, and ``ihc`` is kept back as the new
class of feature-centroid targets). Small ResNets (``resnet_tiny``, area-downsampling the 224 px
image to 56 px inside) are trained on random crops with :func:`models.training.fit_classifier`:
vanilla (ε = 0) and robust (ε = 3, PGD (7, 0.5) as published), each from seed 0 (guides) and
seed 1 (surrogates). Each is trained once and cached in ``cache/embedded-<name>-<settings
digest>/``; a change of recipe trains a fresh one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from closedloop.core.files import compute_file_digest, read_json, write_json
from closedloop.core.logs import logger
from closedloop.core.validation import check_option
from closedloop.images import make_embedded_image_set, select_categories
from models.classifiers import Classifier, load_classifier, make_classifier
from models.training import CHECKPOINT_NAME, compute_accuracy, fit_classifier

__all__ = [
    "EMBEDDED_CATEGORIES",
    "EMBEDDED_NEW_CLASS",
    "EMBEDDED_CLASSIFIERS",
    "EMBEDDED_RECIPE",
    "BehaviorModel",
    "make_embedded_classifier",
    "make_embedded_training_set",
    "load_behavior_models",
]

EMBEDDED_CATEGORIES = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "motorcycle_left", "retina", "rocket",
)
EMBEDDED_NEW_CLASS = "ihc"
# name → (training ε, seed)
EMBEDDED_CLASSIFIERS: dict[str, tuple[float, int]] = {
    "vanilla": (0.0, 0),
    "robust": (3.0, 0),
    "vanilla-seed1": (0.0, 1),
    "robust-seed1": (3.0, 1),
}
# how every embedded classifier is trained (with its ε and seed from EMBEDDED_CLASSIFIERS)
EMBEDDED_RECIPE = {
    "architecture": "resnet_tiny", "input_size": 56, "per_photo": 40, "crop_seed": 0,
    "epochs": 12, "batch_size": 32, "learning_rate": 0.05,
}
_EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class BehaviorModel:
    """One guide or surrogate: ``role`` ("guide" or "surrogate"), its classifier, and where it came from.

    ``digest``: sha256 of its weights file, recorded with every stimulus set.
    """

    name: str
    role: str
    classifier: Classifier
    source: str
    digest: str


def make_embedded_training_set(per_photo: int = 40, seed: int = 0):
    """(uint8 pixels (9 × per_photo, 224, 224, 3), labels (9 × per_photo,)) of the embedded categories."""


    images = select_categories(make_embedded_image_set(per_photo=per_photo, seed=seed), EMBEDDED_CATEGORIES)
    return images.read(np.arange(len(images))), images.categories.copy()


def make_embedded_classifier(name: str, cache: str | Path, *, device="auto") -> Path:
    """The checkpoint of embedded classifier ``name`` (see :data:`EMBEDDED_CLASSIFIERS`), trained if not cached.

    Returns the path of its ``classifier.safetensors`` under ``cache``. Training resumes an
    interrupted run. The held-out accuracy (clean, and under 20-step PGD at ε = 3 for ε_train 3)
    on crops of seed 1 is logged and stored in ``held_out.json`` beside the checkpoint.
    """

    check_option("name", name, EMBEDDED_CLASSIFIERS)
    eps, seed = EMBEDDED_CLASSIFIERS[name]
    recipe = EMBEDDED_RECIPE | {"eps": eps, "seed": seed}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache).expanduser() / f"embedded-{name}-{digest}"
    path, held_out_path = folder / CHECKPOINT_NAME, folder / "held_out.json"
    if path.is_file() and held_out_path.is_file() and read_json(held_out_path).get("complete"):
        return path
    logger.info("training the embedded classifier %r (once; cached in %s)", name, folder)
    pixels, labels = make_embedded_training_set(recipe["per_photo"], recipe["crop_seed"])
    classifier = make_classifier(recipe["architecture"], EMBEDDED_CATEGORIES, input_size=recipe["input_size"], seed=seed,
                                 source=f"embedded:{name}")
    fit_classifier(classifier, pixels, labels, folder, eps=eps, epochs=recipe["epochs"], batch_size=recipe["batch_size"],
                   learning_rate=recipe["learning_rate"], seed=seed, device=device)
    classifier = load_classifier(path)
    test_pixels, test_labels = make_embedded_training_set(10, 1)
    held_out = {"clean": compute_accuracy(classifier, test_pixels, test_labels), "pgd_eps": 3.0}
    held_out["pgd"] = compute_accuracy(classifier, test_pixels, test_labels, eps=3.0, n_steps=20)
    logger.info("embedded classifier %r: held-out accuracy %.2f clean, %.2f under PGD at eps 3",
                name, held_out["clean"], held_out["pgd"])
    write_json(held_out_path, held_out | {"complete": True})
    return path


def load_behavior_models(models, *, device="auto") -> dict[str, BehaviorModel]:
    """Every guide and surrogate of a ``[models]`` section (:class:`~closedloop.behavior.config.ModelsSection`).

    Embedded sources are trained into ``models.cache`` first if needed. All models must share
    their category names (in order); they are returned on the CPU in eval mode, guides first.
    """

    loaded = {}
    for role, entries in (("guide", models.guides), ("surrogate", models.surrogates)):
        for name, source in entries.items():
            if source.startswith(_EMBEDDED_PREFIX):
                embedded = source.removeprefix(_EMBEDDED_PREFIX)
                if embedded not in EMBEDDED_CLASSIFIERS:
                    check_option(f"[models] {role}s.{name}", source, [f"{_EMBEDDED_PREFIX}{n}" for n in EMBEDDED_CLASSIFIERS])
                path = make_embedded_classifier(embedded, models.cache, device=device)
            else:
                path = Path(source)
            classifier = load_classifier(path, trust=models.trust_checkpoints)
            loaded[name] = BehaviorModel(name, role, classifier, source, compute_file_digest(path))
    first = next(iter(loaded.values()))
    for model in loaded.values():
        if model.classifier.category_names != first.classifier.category_names:
            raise ValueError(
                f"[models]: every guide and surrogate must have the same categories in the same order, but "
                f"{first.name!r} has {list(first.classifier.category_names)} and {model.name!r} has "
                f"{list(model.classifier.category_names)}."
            )
    return loaded
