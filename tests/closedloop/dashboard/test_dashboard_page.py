"""The dashboard in a real browser while a simulated day runs: Chromium (through Playwright) watches
`closedloop fit-day 0` on the simulated rig, with fixation breaks and a site that goes silent part-way.

``CLOSEDLOOP_DASHBOARD_SCREENSHOTS=docs/images`` also saves the page during the session (with the
alarm) and at the end there, as ``dashboard_live.png`` and ``dashboard_finished.png`` (docs/dashboard.md).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from closedloop.behavior.observers import CHROMIUM_FLAGS, find_chromium
from tests.closedloop.dashboard.test_dashboard_server import ROOT, dashboard
from tests.tiny_experiment import TINY

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make browser)")]

# 4 sites; a presentation every 0.4 s (time_scale 2), about 60 of them; site 1 dies at the 15th.
EXPERIMENT = TINY.format(time_scale=2.0).replace("n_sites = 2", "n_sites = 4").replace(
    "fixation_break_rate = 0.2", "fixation_break_rate = 0.2\nsilent_sites = [1]\nsilent_after = 15",
) + "[dashboard]\nsilent_presentations = 10\n"


def _number(page, selector: str) -> int:
    text = page.text_content(selector).strip()
    return int(text) if text.isdigit() else 0


def _wait_until(page, condition, timeout_s: float = 30.0):
    """Poll ``condition()`` from here (the page's CSP forbids the eval behind wait_for_function)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "the page did not get there in time"
        page.wait_for_timeout(250)
    return value


def test_the_page_follows_a_simulated_day_from_its_stages_to_its_curve(tmp_path):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "experiment.toml").write_text(EXPERIMENT)
    errors = []
    with dashboard(experiment) as (_, port, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), headless=True, args=list(CHROMIUM_FLAGS))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.text_content("#history-days").strip() == "no finished day yet"
        day = subprocess.Popen([sys.executable, "-m", "closedloop", "-q", "fit-day", "0", "--experiment", str(experiment)],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            page.wait_for_selector("#stages [data-stage='present'][data-state='running']", timeout=120_000)
            assert page.get_attribute("#stages [data-stage='plan']", "data-state") == "done"
            assert page.get_attribute("#stages [data-stage='estimate']", "data-state") == "pending"
            first = _wait_until(page, lambda: _number(page, "#presentations") > 0 and _number(page, "#presentations"))
            _wait_until(page, lambda: _number(page, "#presentations") > first + 5)
            alarm = page.wait_for_selector("#alarms .alarm[data-kind='silent_site']", timeout=60_000)
            assert "site 1 (e2) silent" in alarm.text_content()
            assert "alarmed" in page.get_attribute("#sites tr[data-site='1']", "class")
            assert page.text_content("#fixation-breaks").strip().endswith("%")
            assert page.text_content("#present-state").strip() == "live"
            _shoot(page, tmp_path, "dashboard_live.png")
            assert day.wait(timeout=300) == 0, day.stderr.read().decode()[-3000:]
        finally:
            if day.poll() is None:
                day.kill()
        page.wait_for_selector("#stages [data-stage='report'][data-state='done']", timeout=30_000)
        _wait_until(page, lambda: page.text_content("#history-days").strip() == "day 0")
        assert page.query_selector("#history-chart canvas") is not None
        assert page.query_selector("#alarms .alarm") is None, "the session's alarms end with it"
        _shoot(page, tmp_path, "dashboard_finished.png")
        browser.close()
    assert errors == []
    assert all((tmp_path / name).stat().st_size > 20_000 for name in ("dashboard_live.png", "dashboard_finished.png"))


def _shoot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / name), full_page=True)
    if os.environ.get("CLOSEDLOOP_DASHBOARD_SCREENSHOTS"):
        shutil.copy(folder / name, Path(os.environ["CLOSEDLOOP_DASHBOARD_SCREENSHOTS"]) / name)
