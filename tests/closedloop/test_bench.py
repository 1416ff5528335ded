"""compute_bench on a small model: every figure present, positive and consistent."""

import json

import pytest
import torch
from torch import nn

from closedloop.bench import PAPER_DAY, compute_bench


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))


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
