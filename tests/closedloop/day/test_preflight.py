"""The day's preflight: every input of a day is checked before the first stage, in seconds."""

from pathlib import Path

import pytest

from closedloop.config import build_config, read_config
from closedloop.day.preflight import check_experiment
from closedloop.day.runner import run_day

SMALL = {
    "images": {"n_clean_day0": 6, "n_clean_per_day": 2, "embedded_per_photo": 2},
    "model": {"backbone": "resnet_tiny"},
    "sites": {"n_sites": 2},
    "rig": {"kind": "sim"},
}


def _config(**changes):
    data = {section: dict(values) for section, values in SMALL.items()}
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return build_config(data)


def test_a_good_experiment_passes():
    check_experiment(_config())


def _site_map(tmp_path: Path, text: str) -> str:
    path = tmp_path / "map.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("site,array,electrode,unit,label\n0,0,1,-1,a\n1,0,1,-1,b\n", r"\(electrode, unit\) pairs \[\(1, -1\)\] appear more than once"),
        ("site,array,electrode,label\n0,0,1,a\n1,0,2,b\n", r"the header must be site,array,electrode,unit,label"),
        ("site,array,electrode,unit,label\n0,0,1,-1,a\n", r"defines 1 sites but n_sites = 2"),
    ],
)
def test_site_map_errors(tmp_path, text, message):
    config = _config(sites={"n_sites": 2, "site_map": _site_map(tmp_path, text)})
    with pytest.raises(ValueError, match=r"\[sites\] site_map: .*" + message):
        check_experiment(config)


def test_the_image_pool_must_hold_a_day_of_clean_images():
    with pytest.raises(ValueError, match=r"\[images\] n_clean_day0 = 40: the image pool .* holds 28 images"):
        check_experiment(_config(images={"n_clean_day0": 40}))
    with pytest.raises(ValueError, match=r"\[images\] n_clean_per_day = 30: the image pool .* holds 28 images"):
        check_experiment(_config(images={"n_clean_day0": 6, "n_clean_per_day": 30}))


def test_the_backbone_must_load_and_have_the_layer(tmp_path):
    with pytest.raises(ValueError, match=r"\[model\] backbone = 'resnet_tiny', layer = 'layer9.0': .*not a layer"):
        check_experiment(_config(model={"layer": "layer9.0"}))
    (tmp_path / "base.pt").write_text("a text file\n")
    with pytest.raises(ValueError, match=r"\[model\] backbone = .*base.pt.*not a PyTorch checkpoint"):
        check_experiment(_config(model={"backbone": str(tmp_path / "base.pt")}))


def test_a_real_rig_needs_its_curve_keys(tmp_path):
    config = _config(rig={"kind": "zmq", "security": "curve", "keys_dir": str(tmp_path / "keys")})
    with pytest.raises(FileNotFoundError, match=r"\[rig\] keys_dir = .*keys.*closedloop keys"):
        check_experiment(config)
    check_experiment(_config(rig={"kind": "zmq", "security": "plain"}))


def test_run_day_checks_before_it_writes_anything(tmp_path):
    (tmp_path / "experiment.toml").write_text(
        "[images]\nn_clean_day0 = 40\nembedded_per_photo = 2\n[model]\nbackbone = 'resnet_tiny'\n[rig]\nkind = 'sim'\n"
    )
    with pytest.raises(ValueError, match=r"\[images\] n_clean_day0 = 40"):
        run_day(tmp_path, 0)
    assert not (tmp_path / "day_000").exists()  # the day was not begun: a fixed config is not refused later
    assert read_config(tmp_path).images.n_clean_day0 == 40
