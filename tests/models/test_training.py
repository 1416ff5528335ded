"""Adversarial training: the published recipes, robustness gained, exact resume, torchrun (gloo) on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from closedloop.images import make_embedded_image_set, select_categories
from models.classifiers import load_classifier, make_classifier
from models.training import CHECKPOINT_NAME, compute_accuracy, compute_training_attack, fit_classifier

ROOT = Path(__file__).resolve().parents[2]


def _blobs(n_per_class: int, size: int, seed: int, n_classes: int = 3):
    """uint8 (n, size, size, 3) images: a smooth class template plus strong pixel noise; labels (n,)."""
    rng = np.random.default_rng(seed)
    templates = torch.from_numpy(np.random.default_rng(99).random((n_classes, 3, 4, 4)).astype(np.float32))
    base = torch.nn.functional.interpolate(templates, size=(size, size), mode="bilinear").numpy().transpose(0, 2, 3, 1)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    images = 0.5 * base[labels] + 0.25 + rng.normal(0.0, 0.25, (len(labels), size, size, 3))
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels


def test_published_training_attacks():
    assert compute_training_attack(1.0) == (7, 0.3)
    assert compute_training_attack(3.0) == (7, 0.5)
    assert compute_training_attack(10.0) == (10, 1.5)
    assert compute_training_attack(0.0) == (0, 0.0)
    assert compute_training_attack(2.0) == (7, pytest.approx(2.5 * 2 / 7))
    assert compute_training_attack(3.0, 5, 0.2) == (5, 0.2)
    with pytest.raises(ValueError, match=r"'eps' must lie in \[0, inf\], but got -1"):
        compute_training_attack(-1.0)
    with pytest.raises(ValueError, match=r"'n_attack_steps' must lie in \[1, inf\], but got 0"):
        compute_training_attack(1.0, 0)


@pytest.mark.slow  # seconds with one OpenMP thread; minutes when busy cores make two threads spin
def test_robust_training_is_measurably_more_robust_than_vanilla(tmp_path):
    images, labels = _blobs(32, 32, seed=0)
    test_images, test_labels = _blobs(16, 32, seed=1)
    scores = {}
    for eps in (0.0, 0.5):
        classifier = make_classifier("resnet_tiny", ["a", "b", "c"], seed=0)
        training = fit_classifier(classifier, images, labels, tmp_path / f"eps{eps}", eps=eps, epochs=5,
                                  learning_rate=0.05, device="cpu")
        assert training["attack_steps"] == (0 if eps == 0 else 7) and len(training["history"]) == 5
        clean = compute_accuracy(classifier, test_images, test_labels)
        attacked = compute_accuracy(classifier, test_images, test_labels, eps=0.5, n_steps=10, step_size=0.125)
        scores[eps] = (clean, attacked)
    assert scores[0.0][0] > 0.9 and scores[0.5][0] > 0.9  # both learn the task
    assert scores[0.5][1] >= scores[0.0][1] + 0.25, scores  # the robust one keeps far more under PGD


def _failing_image_set(n_reads_before_failure: int):
    """The 2-category embedded subset whose reader fails after some reads (an interrupted run)."""
    pool = select_categories(make_embedded_image_set(per_photo=4, seed=3), ["chelsea", "coffee"])
    reads = {"n": 0}
    original = pool._reader

    def reader(position):
        reads["n"] += 1
        if reads["n"] > n_reads_before_failure:
            raise RuntimeError("simulated crash")
        return original(position)

    return type(pool)(pool.ids, pool.categories, pool.category_names, pool.origin, reader)


@pytest.mark.slow  # seconds with one OpenMP thread; minutes when busy cores make two threads spin
def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    settings = dict(eps=1.0, n_attack_steps=2, attack_step=0.5, epochs=3, batch_size=4, learning_rate=0.05, seed=2,
                    device="cpu")
    pool = select_categories(make_embedded_image_set(per_photo=4, seed=3), ["chelsea", "coffee"])
    whole = make_classifier("resnet_tiny", pool.category_names, input_size=16, seed=0)
    fit_classifier(whole, pool, pool.categories, tmp_path / "whole", **settings)

    interrupted = make_classifier("resnet_tiny", pool.category_names, input_size=16, seed=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_classifier(interrupted, _failing_image_set(len(pool) + 2), pool.categories, tmp_path / "resumed", **settings)
    saved = json.loads((tmp_path / "resumed" / "classifier.json").read_text())
    assert len(saved["training"]["history"]) == 1  # the first epoch was checkpointed

    resumed = make_classifier("resnet_tiny", pool.category_names, input_size=16, seed=0)
    training = fit_classifier(resumed, pool, pool.categories, tmp_path / "resumed", **settings)
    assert [h["epoch"] for h in training["history"]] == [1, 2, 3]
    for key, value in whole.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value, msg=key)
    reread = load_classifier(tmp_path / "resumed" / CHECKPOINT_NAME)
    torch.testing.assert_close(reread.network.fc.weight, whole.network.fc.weight)

    with pytest.raises(ValueError, match=r"holds a checkpoint trained with other settings \(eps: 1\.0 there, 3\.0 now"):
        fit_classifier(make_classifier("resnet_tiny", pool.category_names, input_size=16), pool, pool.categories,
                       tmp_path / "resumed", **(settings | {"eps": 3.0}))


def test_fit_classifier_bad_input(tmp_path):
    images, labels = _blobs(2, 8, seed=0)
    classifier = make_classifier("resnet_tiny", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"'labels' must lie in \[0, 2\], but got \[5\]"):
        fit_classifier(classifier, images, np.r_[labels[:-1], 5], tmp_path)
    with pytest.raises(ValueError, match=r"'labels' must have shape \(6,\), one category per image"):
        fit_classifier(classifier, images, labels[:3], tmp_path)
    with pytest.raises(ValueError, match=r"'images' must be uint8 \(n_images, H, W, 3\)"):
        fit_classifier(classifier, images.astype(np.float32), labels, tmp_path)
    with pytest.raises(TypeError, match=r"'images' must be a uint8 numpy array or a closedloop ImageSet"):
        fit_classifier(classifier, list(images), labels, tmp_path)
    with pytest.raises(TypeError, match=r"'classifier' must be a models.Classifier"):
        fit_classifier(classifier.network, images, labels, tmp_path)
    with pytest.raises(ValueError, match=r"gives Restricted-ImageNet logits"):
        fit_classifier(load_classifier("resnet_tiny"), images, labels % 3, tmp_path)
    with pytest.raises(ValueError, match=r"'epochs' must lie in \[1, inf\], but got 0"):
        fit_classifier(classifier, images, labels, tmp_path, epochs=0)


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for category in ("cat", "dog"):
        (root / category).mkdir(parents=True)
        for index in range(4):
            pixels = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / category / f"{index}.png")
    return root


def _train_robust(*prefix, out: Path, data: Path):
    arguments = ["train-robust", str(out), "--data", str(data), "--eps", "1", "--attack-steps", "2",
                 "--architecture", "resnet_tiny", "--input-size", "16", "--epochs", "2", "--batch-size", "4",
                 "--device", "cpu", "--json"]
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *prefix, "-m", "closedloop", *arguments], capture_output=True, text=True,
                          cwd=ROOT, env=environment, timeout=300)


@pytest.mark.slow
def test_train_robust_under_torchrun_writes_the_same_kind_of_checkpoint(tmp_path):
    data = _image_folder(tmp_path / "data")
    single = _train_robust(out=tmp_path / "single", data=data)
    assert single.returncode == 0, single.stderr
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    distributed = _train_robust(*launcher, out=tmp_path / "ddp", data=data)
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == sorted(p.name for p in (tmp_path / "ddp").iterdir())
    documents = [json.loads((tmp_path / name / "classifier.json").read_text()) for name in ("single", "ddp")]
    assert documents[0].keys() == documents[1].keys()
    assert [d["training"]["world_size"] for d in documents] == [1, 2]
    for key in ("format", "architecture", "category_names", "input_size"):
        assert documents[0][key] == documents[1][key]
    assert documents[1]["training"]["eps"] == 1.0 and len(documents[1]["training"]["history"]) == 2
    single_weights = load_classifier(tmp_path / "single" / CHECKPOINT_NAME).network.state_dict()
    ddp_weights = load_classifier(tmp_path / "ddp" / CHECKPOINT_NAME).network.state_dict()
    assert single_weights.keys() == ddp_weights.keys()
    assert all(single_weights[k].shape == ddp_weights[k].shape for k in single_weights)
    printed = [json.loads(text[text.index("{"):]) for text in (single.stdout, distributed.stdout)]
    assert printed[1]["world_size"] == 2 and printed[0]["checkpoint"].endswith(CHECKPOINT_NAME)
