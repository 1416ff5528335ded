import json

import pytest
import torch

from models import FactorizedReadout, ITModel, load_backbone, make_it_model, read_it_model, write_it_model

SIZE = 64


@pytest.fixture
def model() -> ITModel:
    return make_it_model("resnet_tiny", "layer4.0", 3, seed=2, image_size=SIZE)


def _predict(model, images):
    with torch.no_grad():
        return model(images)


def test_day0_model_predicts_nonnegative_counts_per_site(model):
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    counts = _predict(model, images)
    assert counts.shape == (4, 3) and model.n_sites == 3 and (counts >= 0).all()
    assert model.readout.in_shape == (128, 2, 2)
    assert model.metadata["backbone"]["source"] == "resnet_tiny"
    assert model.metadata["backbone"]["layer"] == "layer4.0"
    assert model.metadata["n_sites"] == 3 and model.metadata["history"] == []


def test_default_image_size_is_224():
    assert make_it_model("resnet_tiny", "layer4.0", 2).readout.in_shape == (128, 7, 7)


def test_write_read_round_trip_gives_identical_outputs(tmp_path, model):
    model.metadata["history"].append({"day": 1, "note": "fitted"})
    path = write_it_model(model, tmp_path / "day1" / "model.safetensors", metadata={"day": 1})
    assert path == tmp_path / "day1" / "model.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]
    document = json.loads(path.with_suffix(".json").read_text())
    assert document["format"] == "closedloop.it_model" and len(document["weights_sha256"]) == 64
    assert document["backbone"]["architecture"] == "resnet_tiny" and document["day"] == 1
    again = read_it_model(path)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_predict(model, images), _predict(again, images))
    assert again.metadata["history"] == [{"day": 1, "note": "fitted"}]
    assert again.metadata["day"] == 1 and "weights_sha256" not in again.metadata
    assert not again.training


def test_a_refitted_model_is_written_with_the_new_days_entries(tmp_path, model):
    # Day N's refit reads day N-1's model (whose metadata holds day N-1's entries) and writes it
    # with day N's: the new day, not the old one, must reach model.json.
    first = write_it_model(model, tmp_path / "day0" / "model.safetensors", metadata={"day": 0, "n_stimuli": 10})
    refitted = read_it_model(first)
    refitted.metadata["history"].append({"day": 1})
    second = write_it_model(refitted, tmp_path / "day1" / "model.safetensors", metadata={"day": 1, "n_stimuli": 20})
    document = json.loads(second.with_suffix(".json").read_text())
    assert (document["day"], document["n_stimuli"], document["history"]) == (1, 20, [{"day": 1}])
    with_own_key = write_it_model(refitted, tmp_path / "day2" / "model.safetensors", metadata={"n_sites": 99})
    assert json.loads(with_own_key.with_suffix(".json").read_text())["n_sites"] == refitted.readout.n_sites


def test_written_model_rebuilds_its_backbone_without_the_original_checkpoint(tmp_path, model):
    path = write_it_model(model, tmp_path / "model.safetensors")
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(path)(images), model.backbone(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"does not hold the resnet_tiny weights needed up to layer 'layer4\.0'"):
        load_backbone(write_it_model(make_it_model("resnet_tiny", "layer3", 1), tmp_path / "short.safetensors"))


def test_mismatched_or_partial_files_are_refused(tmp_path, model):
    path = write_it_model(model, tmp_path / "model.safetensors")
    with torch.no_grad():
        model.readout.bias += 1
    write_it_model(model, tmp_path / "other.safetensors")
    path.with_suffix(".json").write_text((tmp_path / "other.json").read_text())
    with pytest.raises(ValueError, match=r"does not match the sha256 recorded in .*model\.json' \(an interrupted or partial write"):
        read_it_model(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no metadata file .*model\.json'; write models with write_it_model"):
        read_it_model(path)
    (tmp_path / "plain.json").write_text('{"architecture": "resnet_tiny"}')
    (tmp_path / "plain.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=r"is not closedloop IT-model metadata"):
        read_it_model(tmp_path / "plain.safetensors")


def test_write_refuses_bad_arguments(tmp_path, model):
    with pytest.raises(ValueError, match=r"'path' must end in '\.safetensors', but got .*model\.pt'"):
        write_it_model(model, tmp_path / "model.pt")
    with pytest.raises(TypeError, match=r"'metadata' must hold JSON-able values"):
        write_it_model(model, tmp_path / "model.safetensors", metadata={"when": object()})
    with pytest.raises(TypeError, match=r"'model' must be a models\.ITModel, but got Linear"):
        write_it_model(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_readout_must_fit_the_backbone():
    backbone = load_backbone("resnet_tiny")
    with pytest.raises(ValueError, match=r"'readout' expects 64 channels but the backbone gives 128 at layer 'layer4\.0'"):
        ITModel(backbone, FactorizedReadout(2, (64, 7, 7)))
    with pytest.raises(TypeError, match=r"'backbone' must be a models\.Backbone"):
        ITModel(torch.nn.Identity(), FactorizedReadout(2, (64, 7, 7)))
