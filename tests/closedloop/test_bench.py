"""compute_bench and compute_peer_bench on small models: every figure present, positive and consistent."""

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from closedloop.bench import PAPER_DAY, _SiteLogits, compute_bench, compute_peer_bench
from closedloop.images import to_tensor


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 5))


def test_bench_reports_every_figure():
    result = compute_bench(_model(), batch_size=4, n_steps=2, n_repeats=2, n_loop_repeats=1, n_loop_sites=2,
                           n_loop_images=2, image_size=32)
    json.dumps(result)  # JSON-ready
    for key in ("fwd_bwd_s_per_image", "attack_s_per_image_step", "attack_over_fwd_bwd", "batched_s",
                "per_site_loop_s", "batched_speedup_vs_per_site_loop", "paper_day_estimated_s"):
        assert result[key] > 0, key
    assert result["n_sites"] == 5 and result["loop_jobs"] == 4 and result["threads"] == torch.get_num_threads()
    assert result["paper_day_image_steps"] == 21 * 42 * 5 * 2 * 100 == PAPER_DAY["n_sites"] * 42 * 5 * 2 * 100
    assert result["paper_day_estimated_s"] == pytest.approx(result["paper_day_image_steps"] * result["attack_s_per_image_step"])
    assert result["attack_over_fwd_bwd"] == pytest.approx(result["attack_s_per_image_step"] / result["fwd_bwd_s_per_image"])


def test_bench_bad_input():
    with pytest.raises(ValueError, match=r"'batch_size' must lie in \[1, inf\]"):
        compute_bench(_model(), batch_size=0)
    with pytest.raises(ValueError, match="Invalid value for 'device'"):
        compute_bench(_model(), device="gpu0")


@pytest.mark.slow
def test_bench_command_prints_json_for_the_small_backbone(capsys):
    from closedloop.cli import main

    main(["-q", "bench", "--backbone", "resnet_tiny", "--image-size", "64", "--batch-size", "2", "--n-steps", "1",
          "--repeats", "1", "--n-sites", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["backbone"] == "resnet_tiny" and result["layer"] == "layer4.0" and result["n_sites"] == 3
    assert result["attack_over_fwd_bwd"] > 0 and result["batched_speedup_vs_per_site_loop"] > 0


def test_bench_command_bad_backbone_is_one_line_exit_2(capsys, tmp_path):
    from closedloop.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--backbone", str(tmp_path / "missing.pt")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ") and error.strip().count("\n") == 0


@pytest.mark.parametrize("peer", ["pgd", "apgd"])
def test_the_peers_push_each_site_the_way_its_direction_says(peer):
    """torchattacks' untargeted PGDL2 and APGD through the view [1000 + d·s, 0], label 1: d = +1 raises s,
    d = −1 lowers it, even where s is large (a view [s, −s] saturates the cross-entropy there)."""
    import torchattacks

    model = _model().eval()
    with torch.no_grad():  # large outputs: the regime in which a saturating view would give no gradient
        model[-1].bias.add_(50.0)
    images = to_tensor(np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    view = _SiteLogits(model)
    view.site, view.direction = torch.tensor([0, 0, 3, 3]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    labels = torch.ones(4, dtype=torch.long)
    torch.manual_seed(0)
    if peer == "pgd":
        adversarial = torchattacks.PGDL2(view, eps=1.0, alpha=0.3, steps=5, random_start=False)(images, labels)
    else:
        adversarial = torchattacks.APGD(view, norm="L2", eps=1.0, steps=5, loss="ce").perturb(images, labels, best_loss=True)[1]
    with torch.no_grad():
        change = (model(adversarial) - model(images))[torch.arange(4), view.site]
    assert change[0] > 0 and change[1] < 0 and change[2] > 0 and change[3] < 0


def test_peer_bench_reports_every_figure_and_leaves_the_model_as_it_was():
    model = _model().eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    result = compute_peer_bench(model, n_jobs=3, n_steps=3, n_repeats=3, batch_size=4, image_size=32)
    assert not model.training  # a BatchNorm left in train mode would change its statistics between contenders
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    json.dumps(result)
    assert result["peer"].startswith("torchattacks 3.") and result["precision"] in ("fp32", "bf16")
    assert result["n_images"] == 6 and result["step_size"] == pytest.approx(1 / 3)
    assert result["speedup_min"] <= result["speedup_vs_torchattacks"] <= result["speedup_max"]
    assert result["speedup_min"] <= result["speedup_quartiles"][0] <= result["speedup_quartiles"][1] <= result["speedup_max"]
    assert result["site_attack_over_fwd_bwd"] == pytest.approx(
        result["site_attack_s_per_image_step"] / result["fwd_bwd_fp32_s_per_image"])
    assert result["objective_site_attacks"] > 0 and result["objective_torchattacks"] > 0
    assert result["objective_ratio"] == pytest.approx(result["objective_site_attacks"] / result["objective_torchattacks"])
    assert result["realised_eps_max_site_attacks"] <= 1.0 and result["realised_eps_max_torchattacks"] <= 1.0
    for name, key in (("pgd", "time_to_objective_vs_torchattacks"), ("apgd", "time_to_objective_vs_apgd")):
        entry = result["time_to_objective"][name]
        assert entry["peer_objective"] > 0 and entry["peer_s"] > 0
        if entry["steps"] is None:  # not reached within 3 x n_steps: said so, no ratio
            assert result[key] is None and entry["objective"] < entry["peer_objective"]
        else:
            assert entry["objective"] >= entry["peer_objective"] and 5 <= entry["steps"] <= 9
            ratio = entry["ratio"]
            assert ratio["min"] <= ratio["quartiles"][0] <= ratio["median"] <= ratio["quartiles"][1] <= ratio["max"]
            assert result[key] == ratio["median"] == pytest.approx(ratio["median"])


def test_peer_bench_without_torchattacks_says_how_to_install_it(capsys, monkeypatch):
    from closedloop.cli import main

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # what `import torchattacks` meets when it is not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--peers", "--backbone", "resnet_tiny", "--image-size", "32"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.strip().count("\n") == 0
    assert "torchattacks, which is not installed" in error and "pip install --no-deps torchattacks==3.5.1" in error


@pytest.mark.slow
def test_bench_peers_command_prints_json_for_the_small_backbone(capsys):
    from closedloop.cli import main

    main(["-q", "bench", "--peers", "--backbone", "resnet_tiny", "--image-size", "64", "--batch-size", "4", "--n-steps", "2",
          "--repeats", "1", "--n-sites", "3", "--n-jobs", "2", "--precision", "fp32", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["backbone"] == "resnet_tiny" and result["n_jobs"] == 2 and result["precision"] == "fp32"
    assert result["speedup_vs_torchattacks"] > 0 and result["site_attack_over_fwd_bwd"] > 0
