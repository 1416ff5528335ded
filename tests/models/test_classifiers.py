"""Classifiers: 9 Restricted-ImageNet logits (max over inclusive ranges), building, writing, reading."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from models import load_backbone, make_it_model, read_it_model, write_it_model
from models.classifiers import (
    RESTRICTED_IMAGENET_NAMES,
    RESTRICTED_IMAGENET_RANGES,
    Classifier,
    RestrictedImageNet,
    compute_restricted_logits,
    load_classifier,
    make_classifier,
    write_classifier,
)
from models.networks import IMAGENET_MEAN, IMAGENET_STD, make_network


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits.expand(len(images), -1)


def test_restricted_imagenet_takes_the_max_over_inclusive_ranges():
    assert RestrictedImageNet.category_names == ("dog", "cat", "frog", "turtle", "bird", "primate", "fish", "crab", "insect")
    inside = {i for _, first, last in RESTRICTED_IMAGENET_RANGES for i in range(first, last + 1)}
    logits = torch.tensor([[0.0 if i in inside else 100.0 for i in range(1000)]])  # outside never counts
    for k, (_, _, last) in enumerate(RESTRICTED_IMAGENET_RANGES):
        logits[0, last] = 10.0 + k  # the last index of each range counts (inclusive)
    out = RestrictedImageNet(_Fixed(logits))(torch.rand(2, 3, 8, 8))
    assert out.shape == (2, 9)
    torch.testing.assert_close(out[0], 10.0 + torch.arange(9, dtype=torch.float32))


def test_restricted_imagenet_bad_input():
    with pytest.raises(TypeError, match="'network' must be a torch.nn.Module"):
        RestrictedImageNet(lambda x: x)
    with pytest.raises(ValueError, match=r"needs \(N, 1000\) ImageNet logits"):
        RestrictedImageNet(_Fixed(torch.zeros(1, 10)))(torch.rand(1, 3, 8, 8))


# --- Classifier: building, writing, reading -----------------------------------------------------

def _randomise_batch_norm(network: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return network.eval()


def test_compute_restricted_logits_matches_the_wrapper():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    wrapped = RestrictedImageNet(_Fixed(logits[:1]))(torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(wrapped, compute_restricted_logits(logits[:1]))
    for k, (_, first, last) in enumerate(RESTRICTED_IMAGENET_RANGES):
        torch.testing.assert_close(compute_restricted_logits(logits)[:, k], logits[:, first : last + 1].max(1).values)


def test_imagenet_state_dict_becomes_a_9_way_classifier_by_hand(tmp_path):
    network = _randomise_batch_norm(make_network("resnet_tiny", seed=3), seed=4)
    path = tmp_path / "tiny_imagenet.pth"
    torch.save(network.state_dict(), path)
    classifier = load_classifier(path)
    assert classifier.restricted and classifier.category_names == RESTRICTED_IMAGENET_NAMES
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = compute_restricted_logits(network((images - mean) / std))
        torch.testing.assert_close(classifier(images), expected)
        features = classifier.features()(images)
    assert features.shape == (2, 128)
    with pytest.raises(ValueError, match=r"is a 1000-way network without category names"):
        load_classifier(path, restricted=False)


def test_written_classifier_reads_back_identically_and_as_a_backbone(tmp_path):
    classifier = _randomise_batch_norm(make_classifier("resnet_tiny", ["a", "b", "c"], seed=1), seed=2)
    classifier = Classifier(classifier.network, architecture="resnet_tiny", category_names=("a", "b", "c"))
    classifier.metadata["training"] = {"eps": 3.0}
    path = write_classifier(classifier, tmp_path / "c.safetensors")
    again = load_classifier(path)
    assert (again.category_names, again.restricted, again.metadata["training"]) == (("a", "b", "c"), False, {"eps": 3.0})
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(images), classifier.eval()(images))
        backbone = load_backbone(path, "avgpool")
        torch.testing.assert_close(backbone(images), classifier.features()(images))


def test_input_size_downsamples_inside_the_classifier():
    small = make_classifier("resnet_tiny", ["a", "b"], input_size=16, seed=0)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pooled = torch.nn.functional.avg_pool2d(images, 4)
    plain = Classifier(small.network, architecture="resnet_tiny", category_names=("a", "b")).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(images), plain(pooled))


def test_a_small_input_classifier_is_a_backbone_that_downsamples_the_same_way(tmp_path):
    small = _randomise_batch_norm(make_classifier("resnet_tiny", ["a", "b"], input_size=64, seed=0), seed=1)
    path = write_classifier(small, tmp_path / "small.safetensors")
    backbone = load_backbone(path, "layer4.0")
    assert backbone.input_size == 64 and backbone.describe()["input_size"] == 64
    assert backbone.out_shape(224) == backbone.out_shape(64) == (backbone.out_channels, 2, 2)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(path, "avgpool")(images), small.eval().features()(images))
        torch.testing.assert_close(backbone(images), backbone(torch.nn.functional.avg_pool2d(images, 2)))
    model = make_it_model(path, "layer4.0", 3)
    again = read_it_model(write_it_model(model, tmp_path / "it.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images), rtol=0, atol=0)


def test_classifier_bad_input(tmp_path):
    network = make_network("resnet_tiny", num_classes=3, seed=0)
    with pytest.raises(ValueError, match=r"'restricted' needs a 1000-way ImageNet network, but this resnet_tiny has 3 outputs"):
        Classifier(network, architecture="resnet_tiny", category_names=RESTRICTED_IMAGENET_NAMES, restricted=True)
    with pytest.raises(ValueError, match=r"'category_names' must name each of the 3 outputs, but got 2 names"):
        Classifier(network, architecture="resnet_tiny", category_names=("a", "b"))
    with pytest.raises(ValueError, match=r"'category_names' must hold at least 2 distinct names, but got \['a', 'a'\]"):
        make_classifier("resnet_tiny", ["a", "a"])
    with pytest.raises(ValueError, match=r"Invalid value for 'architecture'"):
        make_classifier("resnet_huge", ["a", "b"])
    torch.save(network.state_dict(), tmp_path / "three.pt")
    with pytest.raises(ValueError, match=r"is a 3-way network without category names"):
        load_classifier(tmp_path / "three.pt")
    classifier = make_classifier("resnet_tiny", ["a", "b"])
    with pytest.raises(ValueError, match=r"'path' must end in '.safetensors'"):
        write_classifier(classifier, tmp_path / "c.pt")
    with pytest.raises(TypeError, match=r"'classifier' must be a models.Classifier"):
        write_classifier(network, tmp_path / "c.safetensors")
    classifier.metadata["training"] = {"when": object()}
    with pytest.raises(TypeError, match=r"'classifier\.metadata' must hold JSON-able values"):
        write_classifier(classifier, tmp_path / "c.safetensors")
    assert list(tmp_path.glob("c.*")) == []
    classifier.metadata.clear()
    path = write_classifier(classifier, tmp_path / "c.safetensors")
    document = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps(document | {"weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match=r"does not match the sha256 recorded"):
        load_classifier(path)
    path.with_suffix(".json").write_text(json.dumps(document | {"format": "other"}))
    with pytest.raises(ValueError, match=r"is not closedloop classifier metadata"):
        load_classifier(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no metadata file"):
        load_classifier(path)
    with pytest.raises(FileNotFoundError, match=r"'source': the file .* does not exist"):
        load_classifier(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match=r"'source' must be a checkpoint path or an architecture name"):
        load_classifier(3)
    assert np.isfinite(load_classifier("resnet_tiny")(torch.rand(1, 3, 32, 32)).detach().numpy()).all()
