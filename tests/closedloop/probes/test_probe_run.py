"""The probe commands on an experiment: outputs in EXPERIMENT/probes, report sections, CLI errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from analysis.report import NetworkOptions, write_report
from closedloop.cli import main
from models import make_it_model, write_it_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def probed_experiment(planted_experiment, tmp_path_factory):
    """A copy of the planted experiment whose last day has a fitted (random-readout) model."""
    experiment = tmp_path_factory.mktemp("probes") / "planted"
    shutil.copytree(planted_experiment, experiment)
    write_it_model(make_it_model("resnet_tiny", "layer4.0", 3, seed=0), experiment / "day_003" / "model.safetensors")
    return experiment


def _run(capsys, *arguments) -> dict:
    main([*arguments, "--json"])
    return json.loads(capsys.readouterr().out)


def test_probe_commands_write_their_outputs_and_report_sections(probed_experiment, tmp_path, capsys):
    experiment = str(probed_experiment)
    evolved = _run(capsys, "evolve", "--experiment", experiment, "--generations", "3", "--children", "4", "--sites", "0,2")
    assert evolved["objectives"] == ["site 0", "site 2"] and len(evolved["last_elite"]) == 2
    run = probed_experiment / "probes" / "evolve" / "silico_cppn"
    assert {p.name for p in run.iterdir()} >= {"settings.json", "history.json", "elites.npz", "elites.png", "summary.json"}
    assert len(list((run / "generations").glob("gen_*.npz"))) == 3
    patterns = _run(capsys, "patterns", "--experiment", experiment, "--sites", "1", "--eps", "1", "--n-images", "8",
                    "--n-aai", "2", "--n-noise", "2", "--n-steps", "2")
    assert {r["pattern"] for r in patterns["similarity"]} == {"zero_feed", "noise_feed", "aai", "predicted_pnc"}
    with np.load(probed_experiment / "probes" / "patterns" / "patterns.npz") as arrays:
        assert arrays["site_1_zero_feed"].shape == (3, 224, 224)
        assert np.sqrt((arrays["site_1_zero_feed"].astype(float) ** 2).sum()) <= 1.0 + 1e-4
    geometry = _run(capsys, "geometry", "--experiment", experiment, "--sites", "0,1", "--n-grid", "3", "--n-steps", "2",
                    "--second", "random")
    assert geometry["correlation"]["n"] == 4
    assert (probed_experiment / "probes" / "geometry" / "contours.png").exists()
    write_report(probed_experiment, out=tmp_path / "report.html", networks=NetworkOptions(networks=[]))
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for heading in ("9. Evolved images", "10. Adversarial patterns", "11. Response geometry"):
        body = page.split(f">{heading}</h2>")[1].split("<h2")[0]
        assert "data:image/png;base64," in body and "Not run" not in body, heading


def test_evolve_for_network_units_and_classifier_classes(probed_experiment, capsys):
    experiment = str(probed_experiment)
    fooled = _run(capsys, "evolve", "--experiment", experiment, "--classifier", "resnet_tiny", "--units", "0,4",
                  "--generations", "2", "--children", "3")
    assert fooled["objectives"] == ["dog", "bird"] and all(0 <= p <= 1 for p in fooled["last_elite"])
    assert (probed_experiment / "probes" / "evolve" / "resnet_tiny_cppn" / "elites.png").exists()
    units = _run(capsys, "evolve", "--experiment", experiment, "--network", "resnet_tiny", "--units", "1,3",
                 "--encoding", "direct", "--genome-size", "8", "--generations", "3", "--children", "4", "--name", "units",
                 "--optimizer", "cma")
    assert units["objectives"] == ["unit 1", "unit 3"] and units["out"].endswith("units")


def test_report_notes_probes_not_run(planted_experiment, tmp_path):
    write_report(planted_experiment, out=tmp_path / "report.html", networks=NetworkOptions(networks=[]))
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("Not run for this experiment. <code>closedloop evolve") == 1
    assert "closedloop patterns --experiment" in page and "closedloop geometry --experiment" in page


@pytest.mark.parametrize(("arguments", "message"), [
    (["evolve", "--sites", "0,9"], "'sites' must be site indices in \\[0, 2\\], but got \\[0, 9\\]"),
    (["evolve", "--sites", "a,b"], "'--sites' must be comma-separated indices"),
    (["evolve", "--network", "resnet_tiny"], "'units' must name the units of 'resnet_tiny'"),
    (["evolve", "--classifier", "resnet_tiny", "--units", "12"], "class indices in \\[0, 8\\]"),
    (["evolve", "--network", "resnet_tiny", "--classifier", "resnet_tiny"], "at most one of 'network' and 'classifier'"),
    (["evolve", "--network", "resnet_tiny", "--mode", "loop"], "scored in silico"),
    (["evolve", "--encoding", "pixels"], "Invalid value for '--encoding'"),
    (["patterns", "--day", "7"], "day 7 .* is not finished"),
    (["geometry", "--day", "0"], "has no fitted model model.safetensors"),
])
def test_bad_input_is_one_line_and_exit_2(probed_experiment, capsys, arguments, message):
    with pytest.raises(SystemExit) as done:
        main([*arguments, "--experiment", str(probed_experiment)])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert re.search(message, error), error
