"""RestrictedImageNet: 9 category logits as the max over inclusive ImageNet index ranges."""

import pytest
import torch
from torch import nn

from models.classifiers import RESTRICTED_IMAGENET_RANGES, RestrictedImageNet


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
