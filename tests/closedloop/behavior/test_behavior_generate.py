"""closedloop behavior generate: every mode, budgets held on the PNGs, attack effects versus noise, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from closedloop.attacks.engine import compute_predictions
from closedloop.behavior.config import build_behavior_config, read_behavior_config
from closedloop.behavior.generate import write_behavior_stimuli
from closedloop.behavior.manifest import read_manifest
from closedloop.behavior.models import EMBEDDED_CATEGORIES, make_embedded_training_set
from models.classifiers import load_classifier, make_classifier
from models.training import CHECKPOINT_NAME, fit_classifier

ROOT = Path(__file__).resolve().parents[3]
BUDGET = 20.0
pytestmark = pytest.mark.slow  # every test shares a fixture that trains two classifiers and makes a set (> 10 s)


@pytest.fixture(scope="module")
def stimulus_set(tmp_path_factory):
    """A small stimulus set from two quickly trained 9-category classifiers (guide g, surrogate s)."""
    root = tmp_path_factory.mktemp("behavior")
    pixels, labels = make_embedded_training_set(per_photo=10, seed=0)
    for name, seed in (("g", 0), ("s", 1)):
        classifier = make_classifier("resnet_tiny", EMBEDDED_CATEGORIES, input_size=56, seed=seed)
        fit_classifier(classifier, pixels, labels, root / name, epochs=8, learning_rate=0.05, seed=seed, device="cpu")
    text = f"""
[stimuli]
n_per_category = 1
embedded_per_photo = 2
n_new_class = 6
[models]
guides = {{ g = "g/{CHECKPOINT_NAME}" }}
surrogates = {{ s = "s/{CHECKPOINT_NAME}" }}
device = "cpu"
[perturbations]
budgets = [{BUDGET}]
composite_pairs = 1
composite_triples = 1
n_steps = 20
"""
    (root / "behavior.toml").write_text(text)
    config = read_behavior_config(root / "behavior.toml")
    summary = write_behavior_stimuli(config, root / "out")
    return root, config, summary


def _by_mode(records, mode):
    return [r for r in records if r["mode"] == mode]


def _probabilities(record, model="g"):
    logits = np.array(record["logits"][model])
    return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


def test_every_mode_is_made_and_every_norm_is_within_its_budget(stimulus_set):
    root, _, summary = stimulus_set
    manifest = read_manifest(root / "out")
    records, names = manifest["records"], manifest["category_names"]
    assert names == list(EMBEDDED_CATEGORIES) and summary["n_items"] == len(records)
    counts = {mode: len(_by_mode(records, mode)) for mode in
              ("control", "gaussian", "interpolation", "disrupt", "target", "composite", "centroid")}
    assert counts == {"control": 9, "gaussian": 9, "interpolation": 72, "disrupt": 9, "target": 72, "composite": 18,
                      "centroid": 9}
    assert manifest["models"]["g"]["role"] == "guide" and manifest["models"]["s"]["role"] == "surrogate"
    for record in records:
        assert record["realised_eps"] <= record["budget"], record
        assert record["category"] not in record["targets"]
        assert set(record["logits"]) == {"g", "s"} and len(record["logits"]["g"]) == 9
    assert all(r["realised_eps"] == 0 and r["budget"] == 0 for r in _by_mode(records, "control"))
    assert np.median([r["realised_eps"] for r in _by_mode(records, "gaussian")]) > 0.8 * BUDGET  # clipping shortens some
    assert all(len(r["targets"]) in (2, 3) for r in _by_mode(records, "composite"))
    assert all(r["targets"] == ["new:ihc"] for r in _by_mode(records, "centroid"))
    assert all(r["target_image"].split("/")[0] == r["targets"][0] for r in _by_mode(records, "interpolation"))
    csv_lines = (root / "out" / "manifest.csv").read_text().splitlines()
    assert len(csv_lines) == len(records) + 1 and csv_lines[0].startswith("item,file,start_image,category,guide,mode")


def test_logits_are_those_of_the_saved_pngs(stimulus_set):
    root, _, _ = stimulus_set
    records = read_manifest(root / "out")["records"][::17]
    pngs = np.stack([np.asarray(Image.open(root / "out" / r["file"])) for r in records])
    assert pngs.dtype == np.uint8 and pngs.shape[1:] == (224, 224, 3)
    surrogate = load_classifier(root / "s" / CHECKPOINT_NAME)
    expected = compute_predictions(surrogate, pngs)
    np.testing.assert_allclose(np.array([r["logits"]["s"] for r in records]), expected, rtol=1e-4, atol=1e-4)


def test_attacks_beat_gaussian_noise_of_the_same_norm(stimulus_set):
    root, _, _ = stimulus_set
    records = read_manifest(root / "out")["records"]
    names = read_manifest(root / "out")["category_names"]
    noise = {r["start_image"]: _probabilities(r) for r in _by_mode(records, "gaussian")}

    def error_rate(mode):
        return np.mean([names[int(np.argmax(r["logits"]["g"]))] != r["category"] for r in _by_mode(records, mode)])

    assert error_rate("disrupt") > error_rate("gaussian") + 0.3

    def target_gain(mode, position):
        gains = [
            _probabilities(r)[names.index(r["targets"][position])] - noise[r["start_image"]][names.index(r["targets"][position])]
            for r in _by_mode(records, mode)
        ]
        return np.mean(gains)

    assert target_gain("target", 0) > 0.2
    assert target_gain("composite", 0) > 0.05 and target_gain("composite", 1) > 0.05  # both targets rise


def test_an_interrupted_run_resumes_and_a_changed_config_is_refused(stimulus_set):
    root, config, summary = stimulus_set
    before = read_manifest(root / "out")["records"]
    part = sorted((root / "out" / "parts").iterdir())[0]
    part.unlink()
    again = write_behavior_stimuli(config, root / "out")
    assert again["n_units_done_before"] == summary["n_units"] - 1
    assert read_manifest(root / "out")["records"] == before
    changed = build_behavior_config(json.loads(json.dumps(config.to_dict())) | {"perturbations": {"budgets": [2.0]}})
    with pytest.raises(ValueError, match=r"holds a stimulus set made with other config; give another folder, or pass --restart"):
        write_behavior_stimuli(changed, root / "out")
    with pytest.raises(TypeError, match=r"'config' must be a BehaviorConfig"):
        write_behavior_stimuli({}, root / "out")


def test_cli_finishes_a_finished_set_at_once_and_reports_bad_input_in_one_line(stimulus_set):
    root, _, summary = stimulus_set
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "closedloop", "behavior", "generate"]
    done = subprocess.run([*command, str(root / "out"), "--config", str(root / "behavior.toml"), "--json"],
                          capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n_units_done_before"] == result["n_units"] == summary["n_units"]
    bad = subprocess.run([*command, str(root / "other"), "--config", str(root / "missing.toml")],
                         capture_output=True, text=True, env=environment, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no behaviour config at") and bad.stderr.count("\n") == 1


def test_the_precision_option_reaches_the_config(stimulus_set, capsys):
    """--precision overrides [perturbations] precision ("auto" in the set): another value is another config."""
    from closedloop.cli import main

    root, _, _ = stimulus_set
    with pytest.raises(SystemExit) as exit_info:
        main(["behavior", "generate", str(root / "out"), "--config", str(root / "behavior.toml"), "--precision", "bf16"])
    assert exit_info.value.code == 2 and "holds a stimulus set made with other config" in capsys.readouterr().err


def test_models_must_exist_and_share_their_categories(stimulus_set, tmp_path):
    from closedloop.behavior.config import ModelsSection
    from closedloop.behavior.models import load_behavior_models
    from models.classifiers import write_classifier

    root, _, _ = stimulus_set
    with pytest.raises(ValueError, match=r"Invalid value for '\[models\] guides.g': allowed values are 'embedded:vanilla'"):
        load_behavior_models(ModelsSection(guides={"g": "embedded:huge"}, surrogates={}, cache=str(tmp_path)))
    other = write_classifier(make_classifier("resnet_tiny", ["x", "y"]), tmp_path / "other.safetensors")
    models = ModelsSection(guides={"g": str(root / "g" / CHECKPOINT_NAME)}, surrogates={"o": str(other)})
    with pytest.raises(ValueError, match=r"must have the same categories in the same order, but 'g' has \['astronaut'"):
        load_behavior_models(models)


def test_start_images_must_be_in_the_guides_categories(stimulus_set, tmp_path):
    root, config, _ = stimulus_set
    (tmp_path / "starts" / "dog").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "starts" / "dog" / "a.png")
    stimuli = config.stimuli.model_copy(update={"start_images": str(tmp_path / "starts")})
    with pytest.raises(ValueError, match=r"start_images: categories \['dog'\] are not categories of the guides \(astronaut"):
        write_behavior_stimuli(config.model_copy(update={"stimuli": stimuli}), tmp_path / "out")
