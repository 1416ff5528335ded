"""The local web task server (``closedloop behavior serve``): serves ``site/`` and saves results.

``GET`` serves the static pages of a built task folder (``OUT/site``; nothing outside it).
``GET /start`` (``/start?kind=detection``) redirects to the session of that kind with the fewest
saved results. ``POST /results`` takes a finished session's JSON from the page, checks it against
the session file, keeps only the task fields listed in :data:`RESULT_TRIAL_FIELDS` and writes
``OUT/results/<session>-<anonymous id>.json`` atomically. The anonymous id is 16 random hex
digits made by the server; nothing else about the participant (address, browser, platform ids)
is stored.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from closedloop.behavior.sessions import read_behavior_build
from closedloop.core.files import DiskFullError, describe_disk_full, read_json, write_json
from closedloop.core.logs import logger
from closedloop.core.validation import check_integer

__all__ = ["RESULT_FORMAT", "RESULT_TRIAL_FIELDS", "make_behavior_server", "read_behavior_results", "write_behavior_result"]

RESULT_FORMAT = "closedloop.behavior_result"
RESULT_TRIAL_FIELDS = (
    "index", "role", "stimulus", "first", "second", "order", "response", "button", "buttons", "rt_ms", "image_ms",
    "blank_ms", "image2_ms", "feedback_shown",
)
_MAX_BODY = 4_000_000


def _results_folder(out: Path) -> Path:
    return out / "results"


def write_behavior_result(out: str | Path, payload: dict) -> Path:
    """Check a session's results as the page sends them and save them with a fresh anonymous id.

    ``payload``: ``format`` (``"closedloop.behavior_result"``), ``session`` (an id of the
    build), ``trials`` (one dict per trial of the session, in order). Returns the file written.
    Raises ``ValueError`` when the payload does not match the session.
    """
    out = Path(out)
    if not isinstance(payload, dict) or payload.get("format") != RESULT_FORMAT:
        raise ValueError(f"'payload' must be a dict with format {RESULT_FORMAT!r}, but got {str(payload)[:80]!r}.")
    session_id = str(payload.get("session", ""))
    path = out / "site" / "sessions" / f"{session_id}.json"
    if not session_id.replace("-", "").replace("_", "").isalnum() or not path.is_file():
        raise ValueError(f"'session' {session_id!r} is not a session of this build; the page must send its own session id.")
    session = read_json(path)
    trials = payload.get("trials")
    if not isinstance(trials, list) or len(trials) != len(session["trials"]):
        got = len(trials) if isinstance(trials, list) else type(trials).__name__
        raise ValueError(f"'trials' must list the session's {len(session['trials'])} trials, but got {got}.")
    for expected, trial in zip(session["trials"], trials):
        matches = isinstance(trial, dict) and trial.get("index") == expected["index"]
        if not matches or trial.get("response") not in expected["buttons"]:
            raise ValueError(f"'trials' entry {expected['index']} does not match the session (index, or a response that is "
                             f"not one of its buttons): {str(trial)[:120]!r}")
    anonymous_id = secrets.token_hex(8)
    record = {
        "format": RESULT_FORMAT, "format_version": 1, "anonymous_id": anonymous_id, "session": session_id,
        "kind": session["kind"],
        "trials": [{key: trial[key] for key in RESULT_TRIAL_FIELDS if key in trial} for trial in trials],
    }
    return write_json(_results_folder(out) / f"{session_id}-{anonymous_id}.json", record)


def read_behavior_results(out: str | Path) -> list[dict]:
    """Every saved result of a built task folder (``OUT/results/*.json``), sorted by file name."""
    folder = _results_folder(Path(out).expanduser())
    return [read_json(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []


class _Handler(SimpleHTTPRequestHandler):
    """Static files from ``site/``; ``/start`` picks a session; ``POST /results`` saves one."""

    def __init__(self, *args, out: Path, sessions: list[dict], **kwargs):
        self.out, self.sessions = out, sessions
        super().__init__(*args, directory=str(out / "site"), **kwargs)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        logger.debug("serve: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        if url.path != "/start":
            super().do_GET()
            return
        kind = parse_qs(url.query).get("kind", ["categorization"])[0]
        sessions = [s for s in self.sessions if s["kind"] == kind]
        if not sessions:
            self.send_error(HTTPStatus.NOT_FOUND, f"no {kind} sessions in this build")
            return
        done = Counter(path.name.split("-")[0] for path in _results_folder(self.out).glob("*.json"))
        chosen = min(sessions, key=lambda s: done[s["session"]])
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", "/" + chosen["url"])
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if urlparse(self.path).path != "/results":
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= _MAX_BODY:
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length else HTTPStatus.LENGTH_REQUIRED)
            return
        try:
            path = write_behavior_result(self.out, json.loads(self.rfile.read(length)))
        except (ValueError, KeyError) as error:
            logger.warning("refused a result: %s", error)
            self.send_error(HTTPStatus.BAD_REQUEST, str(error)[:200])
            return
        except DiskFullError as error:  # nothing was written; the page offers the participant a download
            logger.error("could not save a result: %s", describe_disk_full(error))
            self.send_error(HTTPStatus.INSUFFICIENT_STORAGE, "the server's disk is full")
            return
        logger.info("saved %s", path.name)
        body = json.dumps({"saved": path.stem.split("-", 1)[1]}).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_behavior_server(out: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for the built task folder ``out`` (not yet serving: call ``serve_forever()``).

    ``port`` 0 picks a free port (read it from ``server.server_address``). Raises
    ``FileNotFoundError`` when ``out`` holds no build.
    """

    out = Path(out).expanduser().resolve()
    sessions = read_behavior_build(out)["sessions"]
    check_integer("port", port, minimum=0, maximum=65535)
    _results_folder(out).mkdir(exist_ok=True)
    return ThreadingHTTPServer((host, port), partial(_Handler, out=out, sessions=sessions))
