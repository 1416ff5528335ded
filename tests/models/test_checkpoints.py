"""Every checkpoint layout, made here from seeded torchvision networks (nothing downloaded)."""

import argparse
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import resnet50

from models import load_backbone
from models.checkpoints import SIDECAR_KEYS, _detect_architecture, read_sidecar_metadata, write_checkpoint
from models.networks import IMAGENET_MEAN, IMAGENET_STD, make_network

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _randomise_batch_norm(network: nn.Module, seed: int) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine weights, so a mix-up shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return network.eval()


def _robustness_layout(network: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """A robustness-library checkpoint dict: model weights twice, plus the normaliser buffers."""
    state = network.state_dict()
    model = {f"module.model.{k}": v for k, v in state.items()} | {f"module.attacker.model.{k}": v for k, v in state.items()}
    for owner in ("module.normalizer", "module.attacker.normalizer"):
        model[f"{owner}.new_mean"] = torch.tensor(mean).view(3, 1, 1)
        model[f"{owner}.new_std"] = torch.tensor(std).view(3, 1, 1)
    return {"model": model, "optimizer": {"state": {}, "param_groups": []}, "schedule": None, "epoch": 90}


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return _randomise_batch_norm(make_network("resnet_tiny", seed=11), seed=12)


def _features(backbone, images):
    with torch.no_grad():
        return backbone(images)


def test_robustness_resnet50_checkpoint_matches_torchvision_by_hand(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        network = _randomise_batch_norm(resnet50(), seed=6)
    path = tmp_path / "imagenet_l2_2_0.pt"
    torch.save(_robustness_layout(network), path)
    backbone = load_backbone(path, "layer4.0")
    assert (backbone.architecture, backbone.layer, backbone.source) == ("resnet50", "layer4.0", str(path))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = (images - MEAN) / STD
        x = network.maxpool(network.relu(network.bn1(network.conv1(x))))
        x = network.layer3(network.layer2(network.layer1(x)))
        expected = network.layer4[0](x)
    torch.testing.assert_close(_features(backbone, images), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "layout",
    ["robustness", "robustness-single-gpu", "plain", "under-state_dict", "under-model", "data-parallel", "module"],
)
def test_every_pt_layout_loads_the_same_weights(tmp_path, tiny, layout):
    state = tiny.state_dict()
    content = {
        "robustness": _robustness_layout(tiny),
        "robustness-single-gpu": {"model": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
        "plain": state,
        "under-state_dict": {"state_dict": state, "epoch": 1},
        "under-model": {"model": state},
        "data-parallel": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "module": tiny,
    }[layout]
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    trust = layout == "module"  # a whole pickled module needs full unpickling
    backbone = load_backbone(path, "layer4", trust=trust)
    assert backbone.architecture == "resnet_tiny"
    with torch.no_grad():
        expected = tiny.layer4(tiny.layer3(tiny.layer2(tiny.layer1(tiny.maxpool(tiny.relu(tiny.bn1(tiny.conv1((images - MEAN) / STD))))))))
    torch.testing.assert_close(_features(backbone, images), expected)


def test_old_checkpoint_without_batch_norm_counters_loads(tmp_path, tiny):
    state = {k: v for k, v in tiny.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(
        _features(load_backbone(tmp_path / "old.pt"), images), _features(load_backbone(_saved(tmp_path, tiny)), images)
    )


def _saved(tmp_path, network) -> str:
    path = tmp_path / "reference.pt"
    torch.save(network.state_dict(), path)
    return str(path)


def test_safetensors_with_sidecar_json(tmp_path, tiny):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
    path.with_suffix(".json").write_text('{"architecture": "resnet_tiny"}')
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(_features(load_backbone(path), images), _features(load_backbone(_saved(tmp_path, tiny)), images))


def test_safetensors_without_sidecar_or_with_unknown_architecture_is_refused(tmp_path, tiny):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
    with pytest.raises(FileNotFoundError, match=r"has no metadata file .*tiny\.json' naming its architecture"):
        load_backbone(path)
    path.with_suffix(".json").write_text('{"architecture": "vgg16"}')
    with pytest.raises(ValueError, match=r"'architecture' must be one of resnet50, .*, but got 'vgg16'"):
        load_backbone(path)


def test_write_checkpoint_writes_weights_and_a_sidecar_that_reads_back_checked(tmp_path, tiny):
    path = write_checkpoint(tiny.state_dict(), tmp_path / "sub" / "w.safetensors", {"architecture": "resnet_tiny", "day": 2},
                            format_name="closedloop.test", format_version=3)
    assert path == tmp_path / "sub" / "w.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.json", "w.safetensors"]
    document = json.loads(path.with_suffix(".json").read_text())
    assert list(document) == ["architecture", "day", *SIDECAR_KEYS]
    assert document["format"] == "closedloop.test" and document["format_version"] == 3
    assert document["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    read = read_sidecar_metadata(path, format_name="closedloop.test", format_version=3, what="test", noun="test", fix="-")
    assert read == document
    weights = load_file(path)
    assert weights.keys() == tiny.state_dict().keys()
    assert all(torch.equal(weights[key], value) for key, value in tiny.state_dict().items())
    with pytest.raises(ValueError, match=r"is not closedloop other metadata \(format 'closedloop.other' version 3\)"):
        read_sidecar_metadata(path, format_name="closedloop.other", format_version=3, what="other", noun="-", fix="-")


def test_write_checkpoint_refuses_a_bad_path_or_document_and_leaves_nothing(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"'path' must end in '\.safetensors', but got .*w\.pt'; e\.g\. w\.safetensors"):
        write_checkpoint(tiny.state_dict(), tmp_path / "w.pt", {}, format_name="f", format_version=1)
    with pytest.raises(TypeError, match=r"'extra' must hold JSON-able values \(str, numbers, lists, dicts\): "):
        write_checkpoint(tiny.state_dict(), tmp_path / "w.safetensors", {"when": object()}, format_name="f",
                         format_version=1, document_name="extra")
    assert list(tmp_path.iterdir()) == []


def test_different_normaliser_is_used_and_logged(tmp_path, tiny, log_messages):
    path = tmp_path / "other_normaliser.pt"
    torch.save(_robustness_layout(tiny, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), path)
    backbone = load_backbone(path)
    assert backbone.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert backbone.std.flatten().tolist() == [0.25, 0.25, 0.25]
    assert any("differs from ImageNet's; using the checkpoint's" in m for m in log_messages)


def test_pickled_objects_are_refused_unless_trusted(tmp_path, tiny, log_messages):
    path = tmp_path / "with_args.pt"
    torch.save({"model": tiny.state_dict(), "args": argparse.Namespace(arch="resnet_tiny")}, path)
    with pytest.raises(ValueError, match=r"cannot be loaded safely.*argparse\.Namespace.*pass trust=True \(in experiment\.toml: \[model\] trust_checkpoint = true\)"):
        load_backbone(path)
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(_features(load_backbone(path, trust=True), images), _features(load_backbone(_saved(tmp_path, tiny)), images))
    assert any("full unpickling" in m for m in log_messages)


def test_missing_keys_are_listed(tmp_path, tiny):
    state = {k: v for k, v in tiny.state_dict().items() if not k.startswith("layer4.0.conv2")}
    torch.save(state, tmp_path / "holed.pt")
    with pytest.raises(ValueError, match=r"does not hold the resnet_tiny weights needed up to layer 'layer4\.0': 1 expected keys missing \(e\.g\. layer4\.0\.conv2\.weight\).*Expected \d+ keys like"):
        load_backbone(tmp_path / "holed.pt")
    assert load_backbone(tmp_path / "holed.pt", "layer3").out_shape() == (64, 14, 14)  # not needed there


def test_wrong_shapes_are_listed(tmp_path, tiny):
    state = dict(tiny.state_dict())
    state["layer1.0.conv1.weight"] = torch.zeros(17, 16, 3, 3)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"fit none of the known architectures.*Closest is resnet_tiny: 1 keys with the wrong shape \(e\.g\. layer1\.0\.conv1\.weight: expected \(16, 16, 3, 3\), found \(17, 16, 3, 3\)\)"):
        load_backbone(tmp_path / "wrong.pt")


def test_files_without_resnet_weights_are_refused(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds no ResNet weights: expected one of the keys 'module\.model\.conv1\.weight'.*found \['encoder\.weight'\] \(1 keys\)"):
        load_backbone(tmp_path / "other.pt")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match=r"holds no state dict: expected a dict of tensors.*found \['epoch', 'note'\]"):
        load_backbone(tmp_path / "empty.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match=r"checkpoint .*text\.pt' is not a PyTorch checkpoint"):
        load_backbone(tmp_path / "text.pt")


@pytest.mark.parametrize("architecture", ["resnet50", "wide_resnet50_2", "wide_resnet50_4", "resnet_tiny"])
def test_architecture_is_recognised_from_weight_shapes(architecture, tmp_path):
    state = make_network(architecture, seed=None).state_dict()  # meta tensors: shapes only
    assert _detect_architecture(state, 1000, tmp_path) == architecture
