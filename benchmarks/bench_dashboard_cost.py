"""Benchmark (not a test): what `closedloop dashboard` costs the present stage it watches.

Plans and bundles one simulated day once (the tiny test experiment, 2 sites, each stimulus
``--repetitions`` times, fixation breaks on), then runs its present stage
(``fit-day 0 --until present``) on fresh copies of that day, alternately:

- ``alone``: nobody watching;
- ``watched``: ``closedloop dashboard`` serving the experiment, with ``--clients`` browsers'
  worth of server-sent-event streams (this script's threads) reading every state it pushes.

``[sim] time_scale`` is 0: the simulated rig presents as fast as the loop takes the outcomes, so
any CPU the dashboard takes from the present stage shows up as fewer presentations per second
(a real rig paces presentations itself, 200 ms each in the paper's RSVP, which hides it). Per run:
the present stage's seconds (its marker) and presentations per second; the dashboard's CPU
seconds (from /proc) over its wall time; and the median ratio watched / alone. Prints one JSON object.

    PYTHONPATH=. python benchmarks/bench_dashboard_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from closedloop.core.files import read_json  # noqa: E402
from closedloop.data import layout  # noqa: E402
from tests.tiny_experiment import TINY  # noqa: E402

_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _closedloop(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "closedloop", "-q", *arguments], check=True, cwd=ROOT, env=_ENV)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _follow(port: int, stop: threading.Event, received: list) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/events", headers={"Host": f"127.0.0.1:{port}"})
    response = connection.getresponse()
    while not stop.is_set():
        line = response.fp.readline()
        if line.startswith(b"data: "):
            received.append(len(line))
    connection.close()


def _present(template: Path, folder: Path, *, watched: bool, n_clients: int) -> dict:
    shutil.copytree(template, folder)
    dashboard = None
    stop, received, threads = threading.Event(), [], []
    if watched:
        dashboard = subprocess.Popen([sys.executable, "-m", "closedloop", "dashboard", "--experiment", str(folder),
                                      "--port", "0"], cwd=ROOT, env=_ENV, stdout=subprocess.PIPE, text=True)
        port = int(re.search(r":(\d+)/", dashboard.stdout.readline())[1])
        threads = [threading.Thread(target=_follow, args=(port, stop, received), daemon=True) for _ in range(n_clients)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # the streams are open and the first states read
        cpu_before, wall_before = _cpu_seconds(dashboard.pid), time.monotonic()
    _closedloop("fit-day", "0", "--experiment", str(folder), "--until", "present")
    result = {"seconds": read_json(layout.marker_path(folder / "day_000", "present"))["seconds"]}
    summary = read_json(layout.marker_path(folder / "day_000", "present"))["summary"]
    result["presentations"] = summary["n_presentations"]
    result["per_s"] = result["presentations"] / result["seconds"]
    if watched:
        result["dashboard_cpu_share"] = (_cpu_seconds(dashboard.pid) - cpu_before) / (time.monotonic() - wall_before)
        result["states_received"] = len(received)
        stop.set()
        dashboard.terminate()
        dashboard.wait(timeout=30)
    shutil.rmtree(folder)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=60, help="Valid presentations per stimulus.")
    parser.add_argument("--clients", type=int, default=10, help="Event streams open on the dashboard.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_dashboard_") as scratch:
        template = Path(scratch) / "template"
        template.mkdir()
        (template / "experiment.toml").write_text(TINY.format(time_scale=0.0).replace(
            "[rig]", f"[rsvp]\nrepetitions = {args.repetitions}\n[rig]"))
        _closedloop("fit-day", "0", "--experiment", str(template), "--until", "bundle")
        runs = {"alone": [], "watched": []}
        for repeat in range(args.repeats):
            for kind in ("alone", "watched") if repeat % 2 == 0 else ("watched", "alone"):
                runs[kind].append(_present(template, Path(scratch) / f"{kind}{repeat}", watched=kind == "watched",
                                           n_clients=args.clients))
                print(kind, runs[kind][-1], file=sys.stderr)
    ratio = [w["per_s"] / a["per_s"] for a, w in zip(runs["alone"], runs["watched"], strict=True)]
    print(json.dumps({
        "cpu": _cpu_name(), "repeats": args.repeats, "clients": args.clients, "runs": runs,
        "per_s_watched_over_alone": [round(r, 3) for r in ratio], "median_ratio": round(float(np.median(ratio)), 3),
        "dashboard_cpu_share_median": round(float(np.median([w["dashboard_cpu_share"] for w in runs["watched"]])), 3),
    }, indent=1))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
