"""Web task sessions (``closedloop behavior build``): static jsPsych pages for a behavioural stimulus set.

From a stimulus set (``closedloop behavior generate``) this writes a folder::

    site/index.html          the task page (open as index.html?session=ID); upload site/ as is
    site/task.js, *.css      the jsPsych task, bundled from web/ by `make web` (no CDN at run time)
    site/sessions/ID.json    one session: its trials in the order shown, every random choice made
    site/stimuli/sNNNN.png   the images under opaque names (file names do not reveal targets)
    build.json               sessions, parameters, stimulus name -> manifest item, detection trial ->
                             perturbed image (``probes``); kept off the site
    manifest.json            a copy of the stimulus set's manifest (for the analysis)
    results/                 one JSON per finished session (written by ``closedloop behavior serve``)

**Categorisation sessions** (Gaziv et al.; DESIGN.md §6): ``n_warmup`` clean images with
feedback, then ``n_test`` perturbed images, ``n_reference`` clean images and ``n_catch`` catch
trials (a circle or a triangle; two of the nine buttons become "circle" and "triangle"),
shuffled. Each trial: a central Start button, the image for 200 ms, 200 ms blank, nine labelled
buttons on a circle in random order; a red "✗" for 1 s after a wrong answer on an unperturbed
image (warm-up, reference, catch). Perturbed images are spread over sessions so that each is
seen by at least ``n_subjects_per_image`` sessions, never twice in one.

**Detection sessions** (same/different; Guo et al. appendix): each perturbed image of the chosen
budgets in four trials, p-c, c-p, c-c and p-p (p perturbed, c its clean start image), two
100 ms images 100 ms apart, then "same" / "different"; every 10th trial is a catch trial with
two different clean images. ``n_detection_items`` images (so 4× as many trials) per session.
"""

from __future__ import annotations

import html
import io
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from closedloop.behavior.manifest import MANIFEST_NAME, read_manifest
from closedloop.core.files import read_json, write_bytes, write_json, write_text
from closedloop.core.logs import logger
from closedloop.core.provenance import compute_provenance, derive_seed
from closedloop.core.validation import check_dir, check_integer, check_number

__all__ = [
    "BUILD_NAME",
    "CATCH_SHAPES",
    "DETECTION_ORDERS",
    "read_behavior_build",
    "read_task_bundle",
    "write_behavior_sessions",
]

BUILD_NAME = "build.json"
CATCH_SHAPES = ("circle", "triangle")
DETECTION_ORDERS = ("p-c", "c-p", "c-c", "p-p")
DETECTION_BUTTONS = ("same", "different")
BUNDLE_FILES = ("task.js", "jspsych.css", "task.css")
_BUNDLE = Path(__file__).parent / "_web"
_CATCH_EVERY = 10

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="jspsych.css"><link rel="stylesheet" href="task.css">
</head><body><div id="jspsych-target"></div><script src="task.js"></script></body></html>
"""


def read_task_bundle() -> dict[str, bytes]:
    """The built jsPsych task: file name -> bytes of ``task.js``, ``jspsych.css``, ``task.css``.

    Raises ``FileNotFoundError`` naming the ``make web`` target when the bundle was not built.
    """
    missing = [name for name in BUNDLE_FILES if not (_BUNDLE / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the web task bundle is missing ({', '.join(str(_BUNDLE / name) for name in missing)}); build it with "
            "`make web` in the closedloop checkout (runs `npm ci` and esbuild in web/; needs node 20 and npm)."
        )
    return {name: (_BUNDLE / name).read_bytes() for name in BUNDLE_FILES}


def _make_catch_image(shape: str, size: int = 224) -> bytes:
    """A black circle or triangle on mid-grey, PNG bytes (size × size px)."""


    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    margin = size // 5
    if shape == "circle":
        draw.ellipse([margin, margin, size - margin, size - margin], fill=(0, 0, 0))
    else:
        draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)], fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _assign(n_items: int, n_per_session: int, n_repeats: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Spread items over sessions: each item in >= ``n_repeats`` sessions, never twice in one.

    One random order of the items, repeated ``n_repeats`` times, cut into sessions of
    ``n_per_session`` (≤ ``n_items``, so two copies of an item, ``n_items`` apart, never share a
    session); the last session is topped up with the least-seen items it lacks.
    """
    order = np.tile(rng.permutation(n_items), n_repeats)
    sessions = [order[start:start + n_per_session].tolist() for start in range(0, len(order), n_per_session)]
    counts = np.bincount(order, minlength=n_items)
    last = sessions[-1]
    while len(last) < n_per_session:
        options = np.setdiff1d(np.arange(n_items), last)
        item = int(rng.choice(options[counts[options] == counts[options].min()]))
        last.append(item)
        counts[item] += 1
    return [rng.permutation(np.array(members)) for members in sessions]


def _draw_clean(clean: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` clean stimuli, each used once before any is used again."""
    rounds = math.ceil(n / len(clean)) if n else 0
    return [clean[i] for _ in range(rounds) for i in rng.permutation(len(clean))][:n]


def _categorization_session(name, test, clean, answers, category_names, counts, rng) -> dict:
    """One categorisation session: warm-up, then test + reference + catch shuffled."""
    n_warmup, n_reference, n_catch = counts

    def trial(role: str, stimulus: str, answer: str | None) -> dict:
        buttons = [category_names[i] for i in rng.permutation(len(category_names))]
        if role == "catch":
            slots = rng.choice(len(buttons), size=len(CATCH_SHAPES), replace=False)
            for slot, shape in zip(slots, rng.permutation(CATCH_SHAPES)):
                buttons[slot] = str(shape)
        return {"role": role, "stimulus": stimulus, "buttons": buttons, "answer": answer, "feedback": role != "test"}

    warmup = [trial("warmup", s, answers[s]) for s in _draw_clean(clean, n_warmup, rng)]
    shapes = [CATCH_SHAPES[i % len(CATCH_SHAPES)] for i in rng.permutation(n_catch)]
    main = [trial("test", s, None) for s in test]
    main += [trial("reference", s, answers[s]) for s in _draw_clean(clean, n_reference, rng)]
    main += [trial("catch", f"stimuli/catch_{shape}.png", shape) for shape in shapes]
    trials = warmup + [main[i] for i in rng.permutation(len(main))]
    return {"session": name, "kind": "categorization", "trials": [{"index": i, **t} for i, t in enumerate(trials)]}


def _detection_session(name, items, perturbed, clean_of, clean, rng) -> dict:
    """One same/different session: four orders per item, shuffled; a catch trial every 10th."""
    pairs = {"p": perturbed, "c": clean_of}
    tests = [(item, order) for item in items for order in DETECTION_ORDERS]
    trials = []
    for k in rng.permutation(len(tests)):
        if len(trials) % _CATCH_EVERY == _CATCH_EVERY - 1:
            first, second = rng.choice(len(clean), size=2, replace=False)
            trials.append({"role": "catch", "order": "catch", "first": clean[first], "second": clean[second],
                           "answer": "different", "probe": None})
        item, order = tests[k]
        first, second = order.split("-")
        trials.append({"role": "test", "order": order, "first": pairs[first][item], "second": pairs[second][item],
                       "answer": "same" if first == second else "different", "probe": perturbed[item]})
    trials = [{"index": i, **t, "buttons": list(DETECTION_BUTTONS), "feedback": False} for i, t in enumerate(trials)]
    return {"session": name, "kind": "detection", "trials": trials}


def _check_counts(n_test_items: int, n_test: int, n_clean: int, n_subjects_per_image: int) -> None:
    if n_test_items == 0:
        raise ValueError("'stimuli' holds no perturbed images (every record is mode 'control'); generate a set with budgets.")
    if n_clean == 0:
        raise ValueError("'stimuli' holds no clean images (mode 'control'); warm-up and reference trials need them: "
                         "keep 'control' in [perturbations] modes.")
    if n_test > n_test_items:
        raise ValueError(f"'n_test' must be at most the {n_test_items} perturbed images of the set (a session shows an "
                         f"image once), but got {n_test}; lower n_test.")
    check_integer("n_subjects_per_image", n_subjects_per_image, minimum=1)


def _check_chosen(name: str, chosen, available: list, what: str) -> list:
    """``chosen`` (all of ``available`` when None), refused if it names something the set lacks."""
    if chosen is None:
        return available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"'{name}' {unknown} are not {what} of the set; allowed: {available} (or [] for none).")
    return chosen


def write_behavior_sessions(
    stimuli: str | Path,
    out: str | Path,
    *,
    n_warmup: int = 10,
    n_test: int = 100,
    n_reference: int = 10,
    n_catch: int = 10,
    n_subjects_per_image: int = 2,
    detection_budgets: list[float] | None = None,
    detection_modes: list[str] | None = None,
    n_detection_items: int = 20,
    image_degrees: float = 6.0,
    px_per_degree: float = 40.0,
    seed: int = 0,
) -> dict:
    """Build the web task for the stimulus set in folder ``stimuli`` into folder ``out`` (see the module docstring).

    ``n_*``: trials per categorisation session (paper: 10, 100, 10, 10). ``detection_budgets``:
    budgets ε whose perturbed images get same/different sessions (``None``: every budget; ``[]``:
    no detection task). ``image_degrees``: image side in degrees of visual angle, drawn as
    ``round(image_degrees * px_per_degree)`` px (40 px/° ≈ a 96 dpi screen at 57 cm). Returns
    ``out``, ``n_sessions`` per kind, ``sessions`` (id, kind, n_trials, url) and ``image_px``.
    """

    stimuli = check_dir("stimuli", stimuli)
    manifest = read_manifest(stimuli)
    for name, value, low in (("n_warmup", n_warmup, 0), ("n_test", n_test, 1), ("n_reference", n_reference, 0),
                             ("n_catch", n_catch, 1), ("n_detection_items", n_detection_items, 1), ("seed", seed, 0)):
        check_integer(name, value, minimum=low)
    image_px = round(check_number("image_degrees", image_degrees, minimum=0.5, maximum=40.0)
                     * check_number("px_per_degree", px_per_degree, minimum=5.0, maximum=500.0))
    bundle = read_task_bundle()
    records = manifest["records"]
    names = {record["item"]: f"stimuli/s{k:04d}.png" for k, record in enumerate(records)}
    clean = [names[r["item"]] for r in records if r["mode"] == "control"]
    test = [r for r in records if r["mode"] != "control"]
    _check_counts(len(test), n_test, len(clean), n_subjects_per_image)
    clean_of = {r["start_image"]: names[r["item"]] for r in records if r["mode"] == "control"}
    detection_budgets = _check_chosen("detection_budgets", detection_budgets, sorted({r["budget"] for r in test}), "budgets")
    detection_modes = _check_chosen("detection_modes", detection_modes, sorted({r["mode"] for r in test}), "perturbation modes")
    detection = [r for r in test if r["budget"] in detection_budgets and r["mode"] in detection_modes]
    orphans = sorted({r["start_image"] for r in detection} - set(clean_of))
    if orphans:
        raise ValueError(f"'stimuli': start images {orphans} have no clean (control) image for the detection task.")
    if detection and len(clean) < 2:
        raise ValueError("'stimuli': detection catch trials need at least 2 clean images; set detection_budgets=[].")

    out = Path(out).expanduser()
    site = out / "site"
    if site.exists():
        shutil.rmtree(site)
    for record in records:
        write_bytes(site / names[record["item"]], (stimuli / record["file"]).read_bytes())
    for shape in CATCH_SHAPES:
        write_bytes(site / f"stimuli/catch_{shape}.png", _make_catch_image(shape))
    for name, data in bundle.items():
        write_bytes(site / name, data)
    write_text(site / "index.html", _PAGE.format(title=html.escape("Image task")))

    rng = np.random.default_rng(derive_seed(seed, "behavior sessions"))
    answers = {names[r["item"]]: r["category"] for r in records if r["mode"] == "control"}
    sessions = []
    for k, members in enumerate(_assign(len(test), n_test, n_subjects_per_image, rng)):
        sessions.append(_categorization_session(
            f"c{k + 1:03d}", [names[test[i]["item"]] for i in members], clean, answers, manifest["category_names"],
            (n_warmup, n_reference, n_catch), rng))
    if detection:
        perturbed = [names[r["item"]] for r in detection]
        clean_for = [clean_of[r["start_image"]] for r in detection]
        per_session = min(n_detection_items, len(detection))
        for k, members in enumerate(_assign(len(detection), per_session, n_subjects_per_image, rng)):
            sessions.append(_detection_session(f"d{k + 1:03d}", members.tolist(), perturbed, clean_for, clean, rng))
    timing = {"categorization": {"image": 200, "blank": 200, "feedback": 1000}, "detection": {"image": 100, "gap": 100}}
    probes = {s["session"]: [t.pop("probe") for t in s["trials"]] for s in sessions if s["kind"] == "detection"}
    for session in sessions:
        write_json(site / "sessions" / f"{session['session']}.json", {
            "format": "closedloop.behavior_session", "format_version": 1, **session,
            "image_px": image_px, "image_degrees": image_degrees, "timing_ms": timing[session["kind"]],
        })
    listing = [{"session": s["session"], "kind": s["kind"], "n_trials": len(s["trials"]),
                "url": f"index.html?session={s['session']}"} for s in sessions]
    write_json(out / MANIFEST_NAME, manifest)
    write_json(out / BUILD_NAME, {
        "format": "closedloop.behavior_build", "format_version": 1, "stimulus_set": str(stimuli.resolve()),
        "parameters": {"n_warmup": n_warmup, "n_test": n_test, "n_reference": n_reference, "n_catch": n_catch,
                       "n_subjects_per_image": n_subjects_per_image, "detection_budgets": list(detection_budgets),
                       "detection_modes": list(detection_modes),
                       "n_detection_items": n_detection_items, "image_degrees": image_degrees,
                       "px_per_degree": px_per_degree, "image_px": image_px, "timing_ms": timing, "seed": seed},
        "stimuli": {name: item for item, name in names.items()} | {f"stimuli/catch_{s}.png": f"catch:{s}" for s in CATCH_SHAPES},
        "sessions": listing,
        "probes": probes,
        "provenance": compute_provenance(seeds={"sessions": seed}),
    })
    (out / "results").mkdir(parents=True, exist_ok=True)
    n_kind = {kind: sum(s["kind"] == kind for s in sessions) for kind in ("categorization", "detection")}
    logger.info("built %d categorisation and %d detection sessions in %s", n_kind["categorization"], n_kind["detection"], out)
    return {"out": str(out), "n_sessions": n_kind, "sessions": listing, "image_px": image_px}


def read_behavior_build(out: str | Path) -> dict:
    """The ``build.json`` of a built task folder (``closedloop behavior build``)."""
    path = Path(out).expanduser() / BUILD_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"'out': {str(path)!r} does not exist; build the task first with `closedloop behavior build SET OUT`."
        )
    return read_json(path)
