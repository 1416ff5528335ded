import math

import pytest
import torch

from models import FactorizedReadout


def test_output_shape_and_the_factorized_formula():
    readout = FactorizedReadout(5, (8, 3, 4), seed=1)
    with torch.no_grad():
        readout.bias.copy_(torch.arange(5.0))
    features = torch.randn(6, 8, 3, 4, generator=torch.Generator().manual_seed(2))
    full = torch.einsum("shw,sc->schw", readout.spatial, readout.channel)  # (n_sites, C, H, W)
    expected = torch.einsum("nchw,schw->ns", features, full) / math.sqrt(8 * 3 * 4) + readout.bias
    with torch.no_grad():
        output = readout(features)
    assert output.shape == (6, 5) and readout.n_sites == 5
    torch.testing.assert_close(output, expected)


def test_day0_initialisation_is_standard_normal_and_seeded():
    readout = FactorizedReadout(64, (256, 7, 7), seed=0)
    for weights, n in ((readout.channel.detach(), 64 * 256), (readout.spatial.detach(), 64 * 49)):
        tolerance = 4 / math.sqrt(n)
        assert abs(float(weights.mean())) < tolerance
        assert abs(float(weights.std()) - 1.0) < 2 * tolerance
    assert torch.count_nonzero(readout.bias) == 0
    assert torch.equal(readout.channel, FactorizedReadout(64, (256, 7, 7), seed=0).channel)
    assert not torch.equal(readout.channel, FactorizedReadout(64, (256, 7, 7), seed=1).channel)


def test_random_readout_keeps_unit_variance_features_at_unit_scale():
    readout = FactorizedReadout(200, (64, 5, 5), seed=3)
    features = torch.randn(50, 64, 5, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert 0.8 < float(readout(features).std()) < 1.2


def test_positive_readout_uses_nonnegative_weights():
    readout = FactorizedReadout(4, (6, 2, 2), positive=True, seed=0)
    spatial, channel = readout.weights()
    assert (spatial >= 0).all() and (channel >= 0).all()
    assert (readout.spatial < 0).any()  # raw parameters keep the N(0, 1) draw
    with torch.no_grad():
        assert (readout(torch.rand(3, 6, 2, 2)) >= 0).all()


def test_l1_penalty_is_the_product_of_mask_and_channel_l1_norms():
    readout = FactorizedReadout(3, (5, 2, 2), seed=0)
    expected = torch.stack(
        [readout.spatial[s].abs().sum() * readout.channel[s].abs().sum() for s in range(3)]
    ).mean() / math.sqrt(5 * 2 * 2)
    torch.testing.assert_close(readout.l1_penalty(), expected)
    readout.l1_penalty().backward()
    assert readout.channel.grad is not None and readout.spatial.grad is not None


def test_flattened_features():
    readout = FactorizedReadout(2, (10,), seed=0)
    with torch.no_grad():
        assert readout(torch.rand(4, 10)).shape == (4, 2)
    assert readout.describe() == {"n_sites": 2, "in_shape": [10], "positive": False}


def test_bad_arguments_and_inputs_are_refused():
    with pytest.raises(ValueError, match=r"'n_sites' must lie in \[1, inf\], but got 0"):
        FactorizedReadout(0, (8, 2, 2))
    with pytest.raises(ValueError, match=r"'in_shape' must be \(C, H, W\) or \(C,\) with positive integers, but got \(8, 2\)"):
        FactorizedReadout(3, (8, 2))
    readout = FactorizedReadout(3, (8, 2, 2))
    with pytest.raises(ValueError, match=r"'features' must have shape \(n_images, 8, 2, 2\) to match the readout, but got \(1, 8, 7, 7\)"):
        readout(torch.rand(1, 8, 7, 7))
