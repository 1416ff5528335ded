import json

import pytest

from closedloop.core.files import compute_file_digest, read_json, write_bytes, write_json, write_npz
from closedloop.core.provenance import compute_provenance, derive_seed


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, 3, "synthesize") == derive_seed(0, 3, "synthesize")
    seeds = {derive_seed(m, d, s) for m in (0, 1) for d in (0, 1, 2) for s in ("plan", "synthesize")}
    assert len(seeds) == 12
    assert all(0 <= s < 2**32 for s in seeds)


def test_provenance_names_versions_commit_and_inputs(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    digest = compute_file_digest(tmp_path / "a.bin")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    record = compute_provenance(seeds={"plan": 7}, inputs={"images": digest})
    assert record["packages"]["numpy"] and record["packages"]["torch"]
    assert record["seeds"] == {"plan": 7} and record["inputs"]["images"] == digest
    assert set(record["git"]) == {"commit", "dirty"}
    json.dumps(record)


def test_json_written_atomically_and_damage_is_named(tmp_path):
    path = write_json(tmp_path / "sub" / "x.json", {"a": [1, 2]})
    assert read_json(path) == {"a": [1, 2]}
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(path, {"a": float("nan")})
    assert read_json(path) == {"a": [1, 2]}  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary left behind
    path.write_text("{broken")
    with pytest.raises(ValueError, match="x.json: not valid JSON"):
        read_json(path)


def test_bytes_and_npz_are_written_whole_or_not_at_all(tmp_path):
    import numpy as np

    path = write_bytes(tmp_path / "b.bin", b"abc")
    assert path.read_bytes() == b"abc"
    for compressed in (True, False):
        saved = write_npz(tmp_path / f"a{compressed}.npz", compressed=compressed, x=np.arange(3), y=np.ones((2, 2)))
        with np.load(saved) as arrays:
            assert arrays["x"].tolist() == [0, 1, 2] and arrays["y"].shape == (2, 2)
    class Unreadable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("cannot be read")

    with pytest.raises(RuntimeError, match="cannot be read"):
        write_npz(tmp_path / "bad.npz", x=np.arange(2), y=Unreadable())  # fails half-way: nothing may be left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aFalse.npz", "aTrue.npz", "b.bin"]
