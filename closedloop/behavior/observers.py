"""Simulated observers: subjects with known choice probabilities who do the web task in a real browser.

A simulated subject answers every trial by clicking the real buttons of the jsPsych page in
headless Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright; no browser download),
so the whole chain (pages, timing, server, results files, analysis) is exercised end to end
against a known truth. The presentations keep their jsPsych timing (200 ms image, 200 ms
blank, 1 s feedback); only the subject answers at once.

Categorisation: with probability ``1 - lapse_rate`` the subject reports a category drawn from
``softmax(logits / temperature)`` of ``model``'s 9 logits on the image (from the manifest; catch
shapes are always seen correctly); with probability ``lapse_rate`` it clicks one of the nine
buttons at random. So its catch accuracy is ``1 - lapse_rate * 8/9`` and the lapse correction
of :func:`analysis.behavior.lapse_correct` recovers the softmax probabilities exactly.

Detection: the subject sees a difference between a perturbed image and its clean start with
probability ``1 - exp(-realised_eps / detection_scale)`` (two different images: always), says
"different" when it does and guesses otherwise; lapses click either button at random.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from playwright.async_api import async_playwright

from closedloop.behavior.manifest import read_manifest
from closedloop.behavior.server import make_behavior_server
from closedloop.behavior.sessions import read_behavior_build
from closedloop.core.files import read_json
from closedloop.core.logs import logger
from closedloop.core.provenance import derive_seed
from closedloop.core.validation import check_integer, check_number, check_option

__all__ = ["CHROMIUM_FLAGS", "ObserverModel", "compute_observer_probabilities", "write_simulated_results", "find_chromium"]

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)
_CHROMIUM_NAMES = ("chromium", "chromium-browser")


@dataclass(frozen=True)
class ObserverModel:
    """How simulated subjects answer.

    ``model``: name of a guide or surrogate in the manifest whose logits drive the choices.
    ``temperature``: softmax temperature (> 0; larger is noisier). ``lapse_rate``: probability
    in [0, 1) of a random click. ``detection_scale``: ε (L2, [0,1] pixel units) at which a
    perturbation is seen with probability 1 - 1/e.
    """

    model: str
    temperature: float = 1.0
    lapse_rate: float = 0.1
    detection_scale: float = 10.0

    def __post_init__(self) -> None:
        check_number("temperature", self.temperature, minimum=0.0, inclusive=False)
        check_number("lapse_rate", self.lapse_rate, minimum=0.0, maximum=0.99)
        check_number("detection_scale", self.detection_scale, minimum=0.0, inclusive=False)


def find_chromium() -> str:
    """Path of the system Chromium; ``FileNotFoundError`` naming the install command when absent."""
    found = next((path for name in _CHROMIUM_NAMES if (path := shutil.which(name))), None)
    if found is None:
        raise FileNotFoundError(
            "simulated observers need Debian's Chromium (chromium on PATH), but none was found; install it with "
            "`apt-get install -y chromium chromium-driver` (or `make browser`)."
        )
    return found


def compute_observer_probabilities(logits, temperature: float) -> np.ndarray:
    """Choice probabilities softmax(logits / temperature), shape like ``logits`` ``(..., n_categories)``."""
    scaled = np.asarray(logits, dtype=np.float64) / check_number("temperature", temperature, minimum=0.0, inclusive=False)
    scaled -= scaled.max(axis=-1, keepdims=True)
    weights = np.exp(scaled)
    return weights / weights.sum(axis=-1, keepdims=True)


def _choose(trial: dict, kind: str, observer: ObserverModel, items: dict, category_names: list, rng) -> str:
    """The label a simulated subject clicks on one trial."""
    buttons = trial["buttons"]
    if rng.random() < observer.lapse_rate:
        return buttons[rng.integers(len(buttons))]
    if kind == "detection":
        if trial["order"] == "catch":
            return "different"
        first, second = trial["order"].split("-")
        eps = items[trial["first"] if first == "p" else trial["second"]]["realised_eps"] if first != second else 0.0
        seen = first != second and rng.random() < 1.0 - np.exp(-eps / observer.detection_scale)
        return "different" if seen else buttons[rng.integers(len(buttons))]
    if trial["role"] == "catch":
        return trial["answer"]
    logits = items[trial["stimulus"]]["logits"][observer.model]
    return category_names[rng.choice(len(category_names), p=compute_observer_probabilities(logits, observer.temperature))]


async def _click(page, selector: str) -> None:
    """Click ``selector`` as soon as it is on the page (checked every animation frame, not Playwright's 100-500 ms polls)."""
    await page.wait_for_function("s => document.querySelector(s) !== null", arg=selector, polling="raf", timeout=20_000)
    await page.click(selector, timeout=20_000)


async def _run_session(browser, base_url: str, session: dict, observer, items, category_names, seed: int) -> None:
    """One subject does one whole session in a fresh browser context."""
    rng = np.random.default_rng(derive_seed(seed, "observer", session["session"]))
    context = await browser.new_context(viewport={"width": 1000, "height": 800})
    page = await context.new_page()
    try:
        await page.goto(f"{base_url}/index.html?session={session['session']}")
        await page.click("#jspsych-html-button-response-btngroup button", timeout=60_000)  # Begin
        for trial in session["trials"]:
            await _click(page, ".start-btn")
            label = _choose(trial, session["kind"], observer, items, category_names, rng)
            await _click(page, f'.choice-btn[data-trial="{trial["index"]}"][data-label={json.dumps(label)}]')
        await page.wait_for_selector('body[data-state="saved"]', timeout=30_000)
    finally:
        await context.close()


async def _run_all(base_url: str, sessions: list[dict], observer, items, category_names, n_parallel: int, seed: int,
                   chromium: str) -> None:

    async with async_playwright() as playwright:
        # Playwright gives every launch a fresh temporary profile (--user-data-dir) of its own.
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS))
        limit = asyncio.Semaphore(n_parallel)

        async def one(session: dict) -> None:
            async with limit:
                await _run_session(browser, base_url, session, observer, items, category_names, seed)
                logger.info("simulated subject finished session %s", session["session"])

        try:
            await asyncio.gather(*(one(session) for session in sessions))
        finally:
            await browser.close()


def write_simulated_results(
    out: str | Path,
    observer: ObserverModel,
    *,
    sessions: list[str] | None = None,
    kind: str | None = None,
    n_parallel: int = 2,
    seed: int = 0,
) -> list[Path]:
    """Let one simulated subject do each session of the built task ``out`` in headless Chromium.

    Serves ``out`` on a free loopback port for the duration (the real server, which writes the
    results files). ``sessions``: ids to run (default: every session, or every one of ``kind``,
    ``"categorization"`` or ``"detection"``). ``n_parallel``: browser pages at once. Returns the
    results files written.
    """

    out = Path(out).expanduser()
    build = read_behavior_build(out)
    manifest = read_manifest(out)
    if observer.model not in manifest["models"]:
        raise ValueError(f"'model' {observer.model!r} is not a model of the stimulus set; allowed: {sorted(manifest['models'])}.")
    check_integer("n_parallel", n_parallel, minimum=1, maximum=16)
    if kind is not None:
        check_option("kind", kind, ("categorization", "detection"))
    known = [s["session"] for s in build["sessions"] if kind is None or s["kind"] == kind]
    unknown = sorted(set(sessions or []) - set(known))
    if unknown:
        raise ValueError(f"'sessions' {unknown} are not sessions of this build; allowed: {known}.")
    chosen = [read_json(out / "site" / "sessions" / f"{name}.json") for name in (sessions or known)]
    by_item = {record["item"]: record for record in manifest["records"]}
    items = {name: by_item[item] for name, item in build["stimuli"].items() if item in by_item}
    chromium = find_chromium()
    before = set((out / "results").glob("*.json"))
    server = make_behavior_server(out, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        asyncio.run(_run_all(base_url, chosen, observer, items, manifest["category_names"], n_parallel, seed, chromium))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    return sorted(set((out / "results").glob("*.json")) - before)
