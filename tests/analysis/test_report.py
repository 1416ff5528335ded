"""The experiment report and the select-base page end to end, through the library and the CLI."""

import csv
import json
import shutil

import pytest

from analysis.report import NetworkOptions, write_report
from closedloop.cli import main
from tests.planted import GAIN

SECTIONS = ["Overview", "1. Sensitivity curves", "2. Image-specific curves", "3. Day-over-day progress",
            "4. Category preference and super-stimuli", "5. Network-unit comparison", "6. Model quality",
            "7. Base-model selection", "8. Ground truth (simulated rig)", "9. Evolved images", "10. Adversarial patterns",
            "11. Response geometry"]


def _rows(path):
    with open(path, encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.slow
def test_report_has_every_section_figure_and_table(planted_experiment, tmp_path):
    networks = NetworkOptions(networks=["resnet_tiny"], n_units=1, n_images=1, n_starts=1, n_steps=2, n_sigma_images=8)
    result = write_report(planted_experiment, out=tmp_path / "out" / "week.html", networks=networks)
    page = (tmp_path / "out" / "week.html").read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert f">{heading}</h2>" in page
    assert page.count('src="data:image/png;base64,') == 7  # sections 1-6 and 8 each draw one figure
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    tables = tmp_path / "out" / "week_tables"
    assert {p.name for p in tables.iterdir()} >= {"1_sensitivity_mean.csv", "3_progress_fold_change.csv",
                                                  "4_categories_crossing.csv", "5_networks_mean.csv", "8_truth_sites.csv",
                                                  "summary.json"}
    assert 'href="week_tables/3_progress_fold_change.csv"' in page
    fold = _rows(tables / "3_progress_fold_change.csv")[0]
    assert float(fold["eps"]) == 2.0 and float(fold["fold_change"]) == pytest.approx(GAIN[3] / GAIN[1])
    summary = json.loads((tables / "summary.json").read_text())
    assert summary["truth"]["n_within_2se"] == summary["truth"]["n"] == 36
    assert summary["progress"]["fold_change"][0]["fold_change"] == pytest.approx(3.0)
    assert result["html"] == str(tmp_path / "out" / "week.html") and result["pdf"] is None


def test_day_option_limits_the_report(planted_experiment, tmp_path):
    result = write_report(planted_experiment, day=2, out=tmp_path / "r.html", networks=NetworkOptions(networks=[]))
    assert result["summary"]["sensitivity"]["day"] == 2
    assert result["summary"]["progress"]["fold_change"][0]["fold_change"] == pytest.approx(GAIN[2] / GAIN[1])
    assert "Skipped (no networks named" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_out_must_be_html(planted_experiment, tmp_path):
    with pytest.raises(ValueError, match=r"'out' must be an .html path, but got .*report.pdf"):
        write_report(planted_experiment, out=tmp_path / "report.pdf")


@pytest.mark.slow
def test_cli_report_select_base_and_errors(planted_experiment, tmp_path, capsys):
    experiment = shutil.copytree(planted_experiment, tmp_path / "exp")
    with pytest.raises(SystemExit) as done:
        main(["report", "--experiment", str(experiment), "--day", "9"])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Invalid value for 'day': day 9") and error.count("\n") == 1

    main(["-q", "select-base", "--experiment", str(experiment), "--candidates", "resnet_tiny", "--layers", "layer4.0,avgpool",
          "--n-images", "12", "--n-pairs", "12", "--json"])
    selection = json.loads(capsys.readouterr().out)
    assert [(r["candidate"], r["layer"]) for r in selection["scores"]] == [("resnet_tiny", "layer4.0"), ("resnet_tiny", "avgpool")]
    assert (experiment / "report" / "select_base.html").exists()
    assert [r["criterion"] for r in selection["best"]] == ["cka", "predictivity", "transfer"]

    main(["-q", "report", "--experiment", str(experiment), "--networks", "none", "--json"])
    result = json.loads(capsys.readouterr().out)
    page = (experiment / "report" / "report.html").read_text(encoding="utf-8")
    assert result["html"] == str(experiment / "report" / "report.html")
    assert 'href="select_base.html"' in page  # section 7 links the select-base page and shows its best cells
    assert selection["best"][0]["layer"] in page.split("7. Base-model selection")[1].split("<h2")[0]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
@pytest.mark.slow
def test_pdf(planted_experiment, tmp_path):
    result = write_report(planted_experiment, out=tmp_path / "r.html", networks=NetworkOptions(networks=[]), pdf=True)
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF") and result["pdf"] == str(tmp_path / "r.pdf")
