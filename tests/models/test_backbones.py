import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

from models import Backbone, load_backbone, registered_backbones
from models.networks import ARCHITECTURES, ResNetTiny, make_network

ROOT = Path(__file__).resolve().parents[2]


def test_registered_names_are_the_buildable_architectures():
    assert set(registered_backbones()) == set(ARCHITECTURES)
    assert {"resnet50", "wide_resnet50_2", "resnet_tiny"} <= set(registered_backbones())


def test_validating_backbone_names_does_not_import_torch():
    code = (
        "import sys, closedloop.config, models; from models.backbones import registered_backbones; "
        "registered_backbones(); sys.exit('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode == 0


def test_resnet50_layer4_0_gives_2048x7x7_at_224_and_nothing_past_it():
    backbone = load_backbone("resnet50", "layer4.0")
    assert isinstance(backbone, Backbone) and not backbone.training
    assert (backbone.source, backbone.layer, backbone.out_channels) == ("resnet50", "layer4.0", 2048)
    assert backbone.out_shape(224) == (2048, 7, 7)
    with torch.no_grad():
        assert backbone(torch.rand(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    modules = dict(backbone.network.named_modules())
    assert "layer4.0" in modules and "layer4.1" not in modules and "fc" not in modules and "avgpool" not in modules


def test_resnet_tiny_is_a_torchvision_resnet_of_basic_blocks():
    network = make_network("resnet_tiny", seed=0)
    assert isinstance(network, (ResNetTiny, ResNet))
    assert all(isinstance(stage[0], BasicBlock) and len(stage) == 1 for stage in (network.layer1, network.layer4))
    backbone = load_backbone("resnet_tiny")
    assert backbone.out_shape() == (128, 7, 7)
    with torch.no_grad():
        assert backbone(torch.rand(2, 3, 64, 64)).shape == (2, *backbone.out_shape(64)) == (2, 128, 2, 2)


def test_avgpool_layer_is_flattened_penultimate_features():
    backbone = load_backbone("resnet_tiny", "avgpool")
    assert backbone.out_shape() == (128,)
    with torch.no_grad():
        assert backbone(torch.rand(3, 3, 64, 64)).shape == (3, 128)


def test_random_weights_are_deterministic_in_the_seed_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    first, again, other = (load_backbone("resnet_tiny", seed=s).state_dict() for s in (3, 3, 4))
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["network.conv1.weight"], other["network.conv1.weight"])


def test_normalisation_is_imagenet_inside_the_backbone():
    backbone = load_backbone("resnet_tiny", "conv1")
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    network = make_network("resnet_tiny", seed=0)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), network.conv1((images - mean) / std))


def test_unknown_layer_is_refused_with_examples():
    with pytest.raises(ValueError, match=r"Invalid value for 'layer': 'layer5' is not a layer of resnet_tiny.*'layer4\.0'"):
        load_backbone("resnet_tiny", "layer5")


def test_unknown_source_is_refused():
    with pytest.raises(FileNotFoundError, match=r"'source' = 'resnet51' is neither a registered backbone \(resnet50"):
        load_backbone("resnet51")
    with pytest.raises(TypeError, match=r"'source' must be a backbone name or a checkpoint path, but got int"):
        load_backbone(50)
    with pytest.raises(TypeError, match=r"'layer' must be a layer name"):
        load_backbone("resnet_tiny", 4)
    with pytest.raises(ValueError, match=r"'seed' must lie in \[0, inf\], but got -1"):
        load_backbone("resnet_tiny", seed=-1)
