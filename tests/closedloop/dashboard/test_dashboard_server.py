"""`closedloop dashboard` as the operator runs it (a real process, real HTTP): what it serves, what
it refuses, ten browsers at once, and that running it changes nothing in the experiment."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from closedloop.core.files import write_json
from closedloop.data import layout
from tests.tiny_experiment import TINY

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """An experiment with a day begun (a marker, a log, a live file)."""
    folder = tmp_path_factory.mktemp("dash") / "exp"
    folder.mkdir()
    (folder / "experiment.toml").write_text(TINY.format(time_scale=0.0))
    day = layout.day_folder(folder, 0)
    write_json(layout.marker_path(day, "plan"), {"stage": "plan", "seconds": 1.0, "summary": {}})
    (day / layout.LOG).write_text(json.dumps({"time_utc": "2026-12-05T10:00:00Z", "day": 0, "stage": "plan", "event": "start"}) + "\n")
    return folder


@contextmanager
def dashboard(experiment: Path, *arguments: str):
    """Run `closedloop dashboard` on a free port; yield (host, port, token or None)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "closedloop", "dashboard", "--experiment", str(experiment), "--port", "0", *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = process.stdout.readline()
        found = re.search(r"(http://\S+)", line)
        assert found, f"no URL in {line!r}; stderr: {process.stderr.read()[-2000:] if process.poll() is not None else ''}"
        url = urlsplit(found[1])
        token = re.search(r"token=(\S+)", url.query)
        yield url.hostname, url.port, token[1] if token else None
    finally:
        process.terminate()
        process.wait(timeout=20)


def request(port: int, method: str, path: str, *, headers=None, host: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """One raw HTTP request (the path is sent exactly as given: no client-side normalisation)."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in {"Host": f"127.0.0.1:{port}", **(headers or {})}.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def read_events(port: int, n: int, *, headers=None, timeout_s: float = 20.0) -> list[dict]:
    """The first ``n`` states pushed on /events."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    connection.request("GET", "/events", headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    states = []
    while len(states) < n:
        line = response.fp.readline().decode()
        if line.startswith("data: "):
            states.append(json.loads(line[len("data: "):]))
    connection.close()
    return states


def test_on_loopback_it_serves_the_page_its_assets_and_the_state(experiment):
    with dashboard(experiment) as (host, port, token):
        assert host == "127.0.0.1" and token is None
        status, headers, body = request(port, "GET", "/")
        assert status == 200 and b'id="alarms"' in body
        assert "default-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
        status, headers, body = request(port, "GET", "/assets/dashboard.js")
        assert status == 200 and headers["content-type"].startswith("text/javascript") and len(body) > 10_000
        time.sleep(1.5)
        state = json.loads(request(port, "GET", "/api/state")[2])
        assert state["format"] == "closedloop.dashboard_state" and state["current"]["day"] == 0
        assert {"name": "plan", "state": "done", "seconds": 1.0} in state["current"]["stages"]


@pytest.mark.parametrize("path", [
    "/assets/../../pyproject.toml", "/assets/..%2f..%2fpyproject.toml", "/assets/%2e%2e/%2e%2e/pyproject.toml",
    "/../../../etc/passwd", "//etc/passwd", "/assets/", "/assets/page.html/..", "/day_000/log.jsonl", "/experiment.toml",
    "/assets/dashboard.js/../../../experiment.toml", "/events/", "/api/state/",
])
def test_nothing_outside_its_own_assets_is_served(experiment, path, dashboard_on_loopback):
    status, _, body = request(dashboard_on_loopback, "GET", path)
    assert status == 404, (path, status, body[:200])
    assert b"[project]" not in body and b"root:" not in body and b"[experiment]" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_nothing_can_be_written(method, dashboard_on_loopback):
    for path in ("/", "/api/state", "/events", "/assets/dashboard.js"):
        assert request(dashboard_on_loopback, method, path)[0] == 405


@pytest.mark.parametrize("host", ["attacker.example:80", "attacker.example", "127.0.0.1.attacker.example:8050",
                                  "127.0.0.2:8050", "localhost.:8050", "[::1].evil:80"])
def test_on_loopback_a_request_for_another_host_name_is_refused(dashboard_on_loopback, host):
    """A web page that rebinds its own name to 127.0.0.1 cannot read the dashboard."""
    status, _, body = request(dashboard_on_loopback, "GET", "/api/state", headers={"Host": host})
    assert status == 421 and host.encode() in body


@pytest.mark.parametrize("host", ["localhost:9999", "127.0.0.1", "LOCALHOST:80", "[::1]:8050"])
def test_on_loopback_its_names_are_accepted_on_any_port(dashboard_on_loopback, host):
    """An SSH tunnel may forward another local port; a browser leaves out port 80."""
    assert request(dashboard_on_loopback, "GET", "/api/state", headers={"Host": host})[0] == 200


@pytest.fixture(scope="module")
def dashboard_on_loopback(experiment):
    with dashboard(experiment) as (_, port, _):
        yield port


def test_beyond_loopback_every_request_needs_the_token_printed_at_start(experiment):
    with dashboard(experiment, "--host", "0.0.0.0") as (host, port, token):
        assert host == "0.0.0.0" and token and len(token) >= 24
        for path in ("/", "/api/state", "/events", "/assets/dashboard.js"):
            assert request(port, "GET", path)[0] == 401, path  # from loopback too
            assert request(port, "GET", path + "?token=wrong" + token[5:])[0] == 401, path
            assert request(port, "GET", path, headers={"Cookie": f"closedloop_dashboard_token_{port}=nope"})[0] == 401
        status, headers, body = request(port, "GET", f"/?token={token}")
        assert status == 200 and b'id="alarms"' in body
        cookie = headers["set-cookie"].split(";")[0]
        assert cookie == f"closedloop_dashboard_token_{port}={token}", "named after the port: two dashboards keep their own"
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
        assert request(port, "GET", "/assets/dashboard.js", headers={"Cookie": cookie})[0] == 200
        # another web application's malformed cookies on this host hide nothing
        odd = f'prefs={{"a":1}}; session[id]=3; a=b c; {cookie}; closedloop_dashboard_token_1=other'
        assert request(port, "GET", "/assets/dashboard.js", headers={"Cookie": odd})[0] == 200
        for scheme in ("Bearer", "bearer"):
            assert request(port, "GET", "/api/state", headers={"Authorization": f"{scheme} {token}"})[0] == 200
        assert read_events(port, 1, headers={"Cookie": cookie})[0]["format"] == "closedloop.dashboard_state"
        assert request(port, "POST", f"/api/state?token={token}")[0] == 405


def test_ten_browsers_at_once_each_receive_the_state_as_it_changes(experiment, dashboard_on_loopback):
    results, errors = [], []

    def follow() -> None:
        try:
            results.append(read_events(dashboard_on_loopback, 3))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=follow) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(results) == 10
    for states in results:
        times = [state["now_utc"] for state in states]
        assert len(states) == 3 and all(state["current"]["day"] == 0 for state in states)
        assert times == sorted(times)
    assert request(dashboard_on_loopback, "GET", "/api/state")[0] == 200


def test_a_busy_port_is_a_clear_error(experiment, dashboard_on_loopback):
    done = subprocess.run([sys.executable, "-m", "closedloop", "dashboard", "--experiment", str(experiment), "--port",
                           str(dashboard_on_loopback)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode != 0
    assert f"cannot serve the dashboard on 127.0.0.1:{dashboard_on_loopback}" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr


def test_starting_serving_and_stopping_it_changes_nothing_in_the_experiment(experiment):
    def listing() -> dict:
        return {str(p.relative_to(experiment.parent)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in experiment.parent.rglob("*")}

    before = listing()
    with dashboard(experiment) as (_, port, _):
        read_events(port, 2)
        request(port, "GET", "/")
    assert listing() == before


def test_ctrl_c_stops_it_promptly_with_pages_still_open(experiment):
    process = subprocess.Popen([sys.executable, "-m", "closedloop", "dashboard", "--experiment", str(experiment), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    port = int(re.search(r":(\d+)/", process.stdout.readline())[1])
    streams = []
    for _ in range(3):  # open pages: their event streams never end by themselves
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/events", headers={"Host": f"127.0.0.1:{port}"})
        streams.append(connection.getresponse())
    streams[0].fp.readline()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0 and "dashboard stopped" in out
    assert "Traceback" not in err and "ERROR" not in err
