"""closedloop behavior build / serve: session composition, balance, the results server over real HTTP."""

import json
import threading
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pytest
from behavior_sets import CATEGORIES, write_stimulus_set
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.behavior.server import make_behavior_server, read_behavior_results, write_behavior_result
from closedloop.behavior.sessions import _assign, read_behavior_build, write_behavior_sessions
from closedloop.core.files import read_json
from tests.small_disk import fill_disk, mount_small_disk

SMALL = dict(n_warmup=3, n_test=10, n_reference=4, n_catch=5, detection_budgets=[30.0], n_detection_items=5)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    write_stimulus_set(root / "set")
    result = write_behavior_sessions(root / "set", root / "task", **SMALL)
    return root / "task", result


def _sessions(out, kind):
    return [read_json(out / "site" / "sessions" / f"{s['session']}.json") for s in read_behavior_build(out)["sessions"]
            if s["kind"] == kind]


def test_categorization_sessions_have_the_published_composition(built):
    out, result = built
    sessions = _sessions(out, "categorization")
    assert result["n_sessions"]["categorization"] == len(sessions) == 8  # 36 perturbed images × 2 / 10 per session
    for session in sessions:
        roles = [t["role"] for t in session["trials"]]
        assert roles[:3] == ["warmup"] * 3
        assert Counter(roles[3:]) == {"test": 10, "reference": 4, "catch": 5}
        assert [t["index"] for t in session["trials"]] == list(range(22))
        for trial in session["trials"]:
            assert trial["feedback"] == (trial["role"] != "test")
            if trial["role"] == "catch":
                assert sorted(set(trial["buttons"]) - set(CATEGORIES)) == ["circle", "triangle"]
                assert trial["answer"] == trial["stimulus"].split("_")[1].removesuffix(".png")
            else:
                assert sorted(trial["buttons"]) == sorted(CATEGORIES)
        tests = [t["stimulus"] for t in session["trials"] if t["role"] == "test"]
        assert len(set(tests)) == len(tests)  # never twice in one session
    assert len({tuple(t["buttons"]) for s in sessions for t in s["trials"]}) > 20  # button order random per trial


def test_every_perturbed_image_gets_two_subjects_and_names_are_opaque(built):
    out, _ = built
    build = read_behavior_build(out)
    shown = Counter(t["stimulus"] for s in _sessions(out, "categorization") for t in s["trials"] if t["role"] == "test")
    perturbed = [name for name, item in build["stimuli"].items() if not item.startswith(("control", "catch"))]
    assert len(perturbed) == 36 and min(shown[name] for name in perturbed) >= 2
    assert all(name.startswith("stimuli/s") for name in perturbed)
    assert (out / "site" / "task.js").is_file() and not (out / "site" / "build.json").exists()
    assert "jsdelivr" not in (out / "site" / "index.html").read_text() and "unpkg" not in (out / "site" / "task.js").read_text()


def test_detection_sessions_hold_four_orders_per_image_and_catch_every_tenth(built):
    out, result = built
    build = read_behavior_build(out)
    sessions = _sessions(out, "detection")
    assert result["n_sessions"]["detection"] == len(sessions) == 8  # ceil(18 images at eps 30 × 2 / 5 per session)
    for session in sessions:
        trials = session["trials"]
        assert all(t["role"] == "catch" for t in trials[9::10])
        assert sum(t["role"] == "catch" for t in trials) == len(trials) // 10
        probes = build["probes"][session["session"]]
        orders = Counter((probes[t["index"]], t["order"]) for t in trials if t["role"] == "test")
        assert set(orders.values()) == {1} and len(orders) == 5 * 4
        for t in trials:
            assert t["answer"] == ("same" if t["order"] in ("c-c", "p-p") else "different")
            if t["order"] == "p-p":
                assert t["first"] == t["second"] == probes[t["index"]]


@pytest.mark.parametrize(("options", "message"), [
    (dict(n_test=37), "'n_test' must be at most the 36 perturbed images"),
    (dict(n_test=10, detection_budgets=[7.0]), r"'detection_budgets' \[7.0\] are not budgets of the set"),
    (dict(n_test=10, detection_modes=["centroid"]), r"'detection_modes' \['centroid'\] are not perturbation modes"),
    (dict(n_catch=0), r"'n_catch' must lie in \[1, inf\]"),
    (dict(image_degrees=0.0), r"'image_degrees' must lie in \[0.5, 40\]"),
])
def test_bad_build_options_are_refused(tmp_path, options, message):
    write_stimulus_set(tmp_path / "set")
    with pytest.raises(ValueError, match=message):
        write_behavior_sessions(tmp_path / "set", tmp_path / "task", **options)


def test_a_set_without_clean_images_is_refused(tmp_path):
    write_stimulus_set(tmp_path / "set")
    manifest = read_json(tmp_path / "set" / "manifest.json")
    manifest["records"] = [r for r in manifest["records"] if r["mode"] != "control"]
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="holds no clean images"):
        write_behavior_sessions(tmp_path / "set", tmp_path / "task")
    with pytest.raises(FileNotFoundError, match="'stimuli': the directory"):
        write_behavior_sessions(tmp_path / "nothing", tmp_path / "task")


def _answers(session):
    return {"format": "closedloop.behavior_result", "session": session["session"],
            "trials": [{"index": t["index"], "role": t["role"], "response": t["buttons"][0], "rt_ms": 500, "image_ms": 200,
                        "ip": "10.0.0.1", "worker_id": "A123"} for t in session["trials"]]}


def test_server_serves_pages_redirects_to_least_used_session_and_saves_anonymous_results(built):
    out, _ = built
    server = make_behavior_server(out, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    session = _sessions(out, "categorization")[0]
    try:
        assert b"task.js" in urllib.request.urlopen(f"{base}/index.html").read()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{base}/../build.json")
        first = urllib.request.urlopen(f"{base}/start").geturl()
        request = urllib.request.Request(f"{base}/results", data=json.dumps(_answers(session)).encode(),
                                         headers={"Content-Type": "application/json"})
        saved = json.loads(urllib.request.urlopen(request).read())["saved"]
        second = urllib.request.urlopen(f"{base}/start").geturl()
        bad = _answers(session)
        bad["trials"] = bad["trials"][:-1]
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(urllib.request.Request(f"{base}/results", data=json.dumps(bad).encode()))
    finally:
        server.shutdown()
        server.server_close()
    assert first.endswith("session=c001") and not second.endswith("session=c001")
    results = read_behavior_results(out)
    assert [r["anonymous_id"] for r in results] == [saved] and len(saved) == 16
    assert set(results[0]) == {"format", "format_version", "anonymous_id", "session", "kind", "trials"}
    assert all("ip" not in t and "worker_id" not in t for t in results[0]["trials"])
    for path in (out / "results").glob("*.json"):
        path.unlink()


def test_a_full_disk_refuses_a_result_with_507_and_keeps_no_part_of_it(built, tmp_path):
    """The results folder on a real small file system, filled up: the result does not fit, the participant's
    page gets 507 (and offers the download), nothing is left half-written; with room, the same result is saved."""
    out, _ = built
    results = out / "results"
    with mount_small_disk(results, 64 << 10):
        server = make_behavior_server(out, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        post = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/results",
                                      data=json.dumps(_answers(_sessions(out, "categorization")[0])).encode(),
                                      headers={"Content-Type": "application/json"})
        filler = fill_disk(results)
        try:
            with pytest.raises(urllib.error.HTTPError, match="507"):
                urllib.request.urlopen(post)
            assert [path.name for path in results.iterdir()] == [".filler"]
            filler.unlink()
            saved = json.loads(urllib.request.urlopen(post).read())["saved"]
            assert [r["anonymous_id"] for r in read_behavior_results(out)] == [saved]
        finally:
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.update(format="other"), "'payload' must be a dict with format"),
    (lambda p: p.update(session="../x"), "'session' '../x' is not a session of this build"),
    (lambda p: p["trials"][0].update(response="zebra"), "'trials' entry 0 does not match the session"),
])
def test_bad_results_are_refused(built, change, message):
    out, _ = built
    payload = _answers(_sessions(out, "categorization")[0])
    change(payload)
    with pytest.raises(ValueError, match=message):
        write_behavior_result(out, payload)


def test_serving_a_folder_without_a_build_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="closedloop behavior build SET OUT"):
        make_behavior_server(tmp_path)


def test_cli_build_and_report_and_a_bad_option(tmp_path, capsys):
    from closedloop.cli import main

    write_stimulus_set(tmp_path / "set")
    main(["behavior", "build", str(tmp_path / "set"), str(tmp_path / "task"), "--n-test", "12", "--detection-budgets", "none",
          "--json"])
    assert json.loads(capsys.readouterr().out)["n_sessions"] == {"categorization": 6, "detection": 0}
    main(["behavior", "report", str(tmp_path / "task"), "--n-boot", "10"])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "task" / "report" / "behavior.html").is_file()
    with pytest.raises(SystemExit) as stop:
        main(["behavior", "build", str(tmp_path / "set"), str(tmp_path / "task"), "--n-test", "99"])
    assert stop.value.code == 2 and "'n_test' must be at most" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["behavior", "build", str(tmp_path / "set"), str(tmp_path / "task"), "--detection-budgets", "a,b"])
    assert stop.value.code == 2 and "comma-separated numbers" in capsys.readouterr().err


@given(n_items=st.integers(1, 60), data=st.data(), n_repeats=st.integers(1, 4), seed=st.integers(0, 2**16))
@settings(max_examples=200, deadline=None)
def test_assignment_gives_every_item_its_repeats_never_twice_in_a_session(n_items, data, n_repeats, seed):
    n_per_session = data.draw(st.integers(1, n_items))
    sessions = _assign(n_items, n_per_session, n_repeats, np.random.default_rng(seed))
    assert len(sessions) == -(-n_items * n_repeats // n_per_session)
    assert all(len(set(s.tolist())) == len(s) == n_per_session for s in sessions)
    assert np.bincount(np.concatenate(sessions), minlength=n_items).min() >= n_repeats


def test_a_missing_web_bundle_names_the_make_target(tmp_path, monkeypatch):
    import closedloop.behavior.sessions as sessions

    monkeypatch.setattr(sessions, "_BUNDLE", tmp_path / "_web")
    write_stimulus_set(tmp_path / "set")
    with pytest.raises(FileNotFoundError, match=r"the web task bundle is missing .* build it with `make web`"):
        write_behavior_sessions(tmp_path / "set", tmp_path / "task", n_test=6)
