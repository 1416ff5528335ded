"""Network architectures by name and the :class:`Backbone` module (normalise, then run to a layer).

A backbone is a torchvision ResNet cut at one layer: ImageNet mean/std normalisation, then the
network's own modules up to ``layer`` and nothing past it (torchvision's
``create_feature_extractor`` traces the forward pass and drops every later operation).

Architectures (all torchvision ``ResNet``, same module names, so ``"layer4.0"`` means the same
block everywhere):

- ``resnet50``, ``wide_resnet50_2``: torchvision's builders.
- ``wide_resnet50_4``: ResNet-50 with 4x wider bottlenecks (the robustness library's
  AT-WRN-50-4), built from torchvision's ``ResNet`` and ``Bottleneck``.
- ``resnet_tiny``: :class:`ResNetTiny`, BasicBlock stages of widths 16, 32, 64, 128 with one
  block each; CPU-friendly, for tests and the demo.

Random weights are drawn with torchvision's initialisation from a private ``torch.Generator``
seeded by the caller; the global random state is never used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet50, wide_resnet50_2
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ARCHITECTURES",
    "ResNetTiny",
    "Backbone",
    "make_network",
    "make_backbone",
    "layer_names",
    "prepare_images",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OUTPUT = "features"
_FLATTENED_LAYERS = ("avgpool",)


class ResNetTiny(ResNet):
    """A small torchvision ResNet: BasicBlock stages of ``widths`` channels, one block each.

    Built from torchvision's ``BasicBlock`` and ``ResNet._make_layer``; the module names match
    ResNet-50 (``conv1``, ``bn1``, ``layer1`` … ``layer4``, ``avgpool``, ``fc``), so
    ``"layer4.0"`` works. At 224 px, ``layer4.0`` gives (N, 128, 7, 7).
    """

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128), num_classes: int = 1000) -> None:
        nn.Module.__init__(self)
        # The attributes ResNet._make_layer reads, as ResNet.__init__ sets them.
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)


def _wide_resnet50_4(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width_per_group=64 * 4)


ARCHITECTURES: dict[str, Callable[..., ResNet]] = {
    "resnet50": resnet50,
    "wide_resnet50_2": wide_resnet50_2,
    "wide_resnet50_4": _wide_resnet50_4,
    "resnet_tiny": ResNetTiny,
}


def _initialise(network: nn.Module, generator: torch.Generator) -> None:
    """torchvision's ResNet initialisation, drawn from ``generator``."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(module.in_features)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def make_network(architecture: str, *, num_classes: int = 1000, seed: int | None = 0) -> ResNet:
    """A whole network of ``architecture``.

    ``seed``: random weights drawn from a generator seeded with it (deterministic);
    ``None``: parameters left on the meta device (no memory, no values) for loading weights into
    with ``load_state_dict(..., assign=True)``.
    """
    with torch.device("meta"):
        network = ARCHITECTURES[architecture](num_classes=num_classes)
    if seed is None:
        return network
    network = network.to_empty(device="cpu")
    _initialise(network, torch.Generator().manual_seed(seed))
    return network


def layer_names(network: nn.Module) -> list[str]:
    """Every name ``create_feature_extractor`` accepts for ``network``: modules and graph nodes."""
    nodes, _ = get_graph_node_names(network)
    modules = [name for name, _ in network.named_modules() if name]
    return list(dict.fromkeys(modules + nodes))


def prepare_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, input_size: int = 0) -> torch.Tensor:
    """A network's input: images (N, 3, H, W) in [0, 1], area-downsampled to ``input_size`` px when
    > 0, then normalised by ``mean``/``std`` (per RGB channel, shaped (1, 3, 1, 1))."""
    if input_size:
        images = F.adaptive_avg_pool2d(images, input_size)
    return (images - mean) / std


class Backbone(nn.Module):
    """Images in [0, 1], (N, 3, H, W) → the feature map at ``layer``.

    For ResNet-50 at 224 px and ``layer="layer4.0"`` the output is (N, 2048, 7, 7);
    ``layer="avgpool"`` gives the penultimate layer flattened to (N, C). Normalisation by
    ``mean``/``std`` (buffers, per RGB channel) happens inside, after area downsampling to
    ``input_size`` × ``input_size`` px when ``input_size`` > 0 (a network trained on small images).

    Attributes: ``source`` (registered name or checkpoint path it came from), ``architecture``,
    ``layer``, ``num_classes`` (size of the network's ``fc``, kept so a saved backbone can be
    rebuilt), ``input_size``, ``out_channels``.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        source: str,
        architecture: str,
        layer: str,
        num_classes: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        input_size: int = 0,
    ) -> None:
        super().__init__()
        self.network = network
        self.input_size = input_size
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1).clone())
        self.source, self.architecture, self.layer, self.num_classes = source, architecture, layer, num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.network(prepare_images(images, self.mean, self.std, self.input_size))[_OUTPUT]
        return features.flatten(1) if self.layer in _FLATTENED_LAYERS else features

    def out_shape(self, size: int = 224) -> tuple[int, ...]:
        """Shape of one image's features at ``size`` × ``size`` px: (C, H, W), or (C,) if flattened.

        Computed on the meta device (no arithmetic, no memory).
        """
        tensors = dict(self.network.named_parameters()) | dict(self.network.named_buffers())
        meta = {name: torch.empty_like(tensor, device="meta") for name, tensor in tensors.items()}
        side = self.input_size or size
        images = torch.empty(1, 3, side, side, device="meta")
        features = torch.func.functional_call(self.network, meta, (images,))[_OUTPUT]
        features = features.flatten(1) if self.layer in _FLATTENED_LAYERS else features
        return tuple(features.shape[1:])

    @property
    def out_channels(self) -> int:
        """Channels of the feature map (features per image if flattened)."""
        return self.out_shape(64)[0]

    def describe(self) -> dict:
        """JSON-able facts that, with the weights, rebuild this backbone (see :func:`make_backbone`)."""
        return {
            "source": self.source,
            "architecture": self.architecture,
            "layer": self.layer,
            "num_classes": self.num_classes,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "input_size": self.input_size,
        }


def make_backbone(
    network: nn.Module,
    *,
    source: str,
    architecture: str,
    layer: str,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    input_size: int = 0,
) -> Backbone:
    """Cut ``network`` at ``layer`` (nothing past it is kept) and wrap it with normalisation
    (and area downsampling to ``input_size`` px when > 0).

    ``layer`` must already be one of :func:`layer_names` (checked by the callers).
    """
    extractor = create_feature_extractor(network, return_nodes={layer: _OUTPUT})
    return Backbone(
        extractor,
        source=source,
        architecture=architecture,
        layer=layer,
        num_classes=network.fc.out_features,
        mean=mean,
        std=std,
        input_size=input_size,
    )
