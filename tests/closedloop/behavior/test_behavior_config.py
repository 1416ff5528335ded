"""The behaviour configuration: defaults, presets, round trip through TOML, and every refusal."""

import tomllib

import pytest

from closedloop.behavior.config import (
    BEHAVIOR_MODES,
    build_behavior_config,
    make_preset_config,
    read_behavior_config,
    render_behavior_config,
    write_default_behavior_config,
)


def test_defaults_and_presets_round_trip(tmp_path):
    default = build_behavior_config({})
    assert default.perturbations.modes == list(BEHAVIOR_MODES) and default.perturbations.n_steps == 0
    assert default.models.guides == {"vanilla": "embedded:vanilla", "robust": "embedded:robust"}
    path = write_default_behavior_config(tmp_path, preset="embedded")
    assert path.name == "behavior.toml"
    text = path.read_text()
    assert render_behavior_config(build_behavior_config(tomllib.loads(text))) == text
    embedded = read_behavior_config(tmp_path)
    assert embedded.perturbations.budgets == [5.0, 15.0, 30.0] and embedded.perturbations.n_steps == 50
    assert embedded.models.cache == str((tmp_path / "daily_runs" / "cache").resolve())
    assert make_preset_config("paper", base=tmp_path).perturbations.budgets[-1] == 30.0
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        write_default_behavior_config(path)
    assert write_default_behavior_config(path, preset="demo", overwrite=True) == path
    assert read_behavior_config(path).perturbations.budgets == [15.0, 30.0]
    assert write_default_behavior_config(tmp_path / "new").read_text() == text  # no suffix: a folder
    assert (tmp_path / "new" / "behavior.toml").is_file()


def test_paths_are_resolved_against_the_file_and_checked(tmp_path):
    (tmp_path / "starts" / "dog").mkdir(parents=True)
    (tmp_path / "guide.safetensors").write_bytes(b"")
    (tmp_path / "behavior.toml").write_text(
        '[stimuli]\nstart_images = "starts"\nnew_class = ""\n'
        '[models]\nguides = { g = "guide.safetensors" }\nsurrogates = {}\n'
        '[perturbations]\nmodes = ["disrupt", "control"]\nbudgets = [3, 1, 3]\n'
    )
    config = read_behavior_config(tmp_path / "behavior.toml")
    assert config.stimuli.start_images == str((tmp_path / "starts").resolve())
    assert config.models.guides == {"g": str((tmp_path / "guide.safetensors").resolve())}
    assert config.perturbations.budgets == [1.0, 3.0]
    (tmp_path / "behavior.toml").write_text('[models]\nguides = { g = "missing.pt" }\n')
    with pytest.raises(FileNotFoundError, match=r"\[models\] guides.g = 'missing.pt': no such checkpoint file"):
        read_behavior_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no behaviour config at .*closedloop behavior init"):
        read_behavior_config(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stimuli": {"colour": 1}}, r"unknown key 'stimuli.colour'; allowed keys here are: start_images, n_per_category"),
        ({"stimuli": {"n_per_category": 0}}, r"'stimuli.n_per_category' = 0: Input should be greater than or equal to 1"),
        ({"perturbations": {"budgets": [0.0]}}, r"every budget must be a finite number > 0; bad values: \[0.0\]"),
        ({"perturbations": {"modes": ["dance"]}}, r"'perturbations.modes.0' = 'dance': Input should be 'disrupt'"),
        ({"models": {"guides": {}}}, r"give at least one guide"),
        ({"models": {"guides": {"a/b": "embedded:robust"}}}, r"model names \['a/b'\] are not allowed"),
        ({"models": {"guides": {"x": "embedded:robust"}, "surrogates": {"x": "embedded:vanilla"}}},
         r"model names \['x'\] are used twice"),
        ({"stimuli": {"new_class": ""}}, r'modes has "centroid" but \[stimuli\] new_class is ""'),
        ({"models": {"device": "tpu"}}, r"'models.device' = 'tpu': Input should be 'auto', 'cpu' or 'cuda'"),
        ({"perturbations": {"precision": "fp16"}}, r"'perturbations.precision' = 'fp16': Input should be 'auto', 'fp32' or 'bf16'"),
    ],
)
def test_bad_values_are_refused_with_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        build_behavior_config(data, source="behavior.toml")


def test_bad_preset_and_bad_toml(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid value for 'preset': allowed values are 'paper', 'embedded', 'demo', but got 'x'"):
        make_preset_config("x")
    with pytest.raises(ValueError, match=r"Invalid value for 'preset': allowed values are 'paper', 'embedded', 'demo', but got 'x'"):
        write_default_behavior_config(tmp_path, preset="x")
    (tmp_path / "behavior.toml").write_text("[stimuli\n")
    with pytest.raises(ValueError, match=r"not valid TOML"):
        read_behavior_config(tmp_path)
