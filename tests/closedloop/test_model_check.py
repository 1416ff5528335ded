import json

import pytest
import torch

from closedloop.cli import main
from closedloop.config import build_config
from closedloop.model_check import compute_model_check


def _config(**model):
    return build_config(
        {
            "model": {"backbone": "resnet_tiny", "device": "cpu"} | model,
            "sites": {"n_sites": 3},
            "images": {"embedded_per_photo": 1},
        }
    )


def test_model_check_reports_the_configured_model():
    result = compute_model_check(_config(), n_images=2)
    assert result["backbone"] == "resnet_tiny" and result["layer"] == "layer4.0" and result["device"] == "cpu"
    assert result["feature_shape"] == [128, 7, 7]
    assert result["n_sites"] == 3 and result["n_images"] == 2
    assert result["prediction_mean"] > 0 and result["prediction_std"] >= 0 and result["seconds_per_image"] > 0
    json.dumps(result)


def test_model_check_at_the_penultimate_layer():
    assert compute_model_check(_config(layer="avgpool"), n_images=1)["feature_shape"] == [128]


def test_model_check_refuses_bad_arguments():
    with pytest.raises(TypeError, match=r"'config' must be an ExperimentConfig \(from read_config\), but got dict"):
        compute_model_check({}, n_images=1)
    with pytest.raises(ValueError, match=r"'n_images' must lie in \[1, inf\], but got 0"):
        compute_model_check(_config(), n_images=0)
    with pytest.raises(ValueError, match=r"Invalid value for 'layer': 'layer9'"):
        compute_model_check(_config(layer="layer9"), n_images=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_model_check_refuses_cuda_without_cuda():
    with pytest.raises(ValueError, match=r"CUDA is not available"):
        compute_model_check(_config(device="cuda"), n_images=1)


def test_check_model_command_prints_json(tmp_path, capsys):
    main(["init", str(tmp_path / "exp"), "--preset", "demo"])
    capsys.readouterr()
    main(["check-model", "--experiment", str(tmp_path / "exp"), "--n-images", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["backbone"] == "resnet_tiny" and result["n_sites"] == 8 and result["feature_shape"] == [128, 7, 7]


def test_check_model_command_turns_a_bad_layer_into_one_line(tmp_path, capsys):
    main(["init", str(tmp_path / "exp"), "--preset", "demo"])
    config = tmp_path / "exp" / "experiment.toml"
    config.write_text(config.read_text().replace('layer = "layer4.0"', 'layer = "layer9"'))
    with pytest.raises(SystemExit) as done:
        main(["check-model", "--experiment", str(tmp_path / "exp")])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Invalid value for 'layer': 'layer9'") and error.count("\n") == 1
