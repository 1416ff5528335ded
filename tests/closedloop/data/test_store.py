import hashlib
import json

import numpy as np
import pytest
import xarray as xr
import zarr

from closedloop.data.sites import SiteTable
from closedloop.data.store import SCHEMA_VERSION, create_store, open_store
from closedloop.sensitivity.responses import read_day_responses

N_SITES = 3


def _frames(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8)


def _fill(store):
    store.append_stimuli(_frames(2), parent=-1, site=-1, eps=0.0, direction=0, kind="clean",
                         predicted=np.zeros((2, N_SITES)), code=[1, 2])
    store.append_stimuli(_frames(2, 1), parent=[0, 1], site=[0, 2], eps=[1.0, 2.0], direction=[1, -1], kind="attack",
                         predicted=np.ones((2, N_SITES), int), code=[3, 4])
    return store.append_presentations([10, 11, 12], [0, 2, 3], [1.0, 1.2, 1.4], np.array([True, False, True]),
                                      np.arange(9).reshape(3, N_SITES))


def _snapshot(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture
def store(tmp_path):
    return create_store(tmp_path / "day_001" / "store.zarr", sites=N_SITES)


def test_appends_read_back(store):
    assert _fill(store) == 3
    stimuli = store.read_stimuli()
    assert stimuli["pixels"].shape == (4, 224, 224, 3) and stimuli["kind"].tolist() == ["clean"] * 2 + ["attack"] * 2
    assert stimuli["code"].dtype == np.uint16 and stimuli["parent"].tolist() == [-1, -1, 0, 1]
    np.testing.assert_array_equal(store.read_pixels([3, 0]), np.concatenate([_frames(2, 1)[1:], _frames(2)[:1]]))
    log = store.read_presentations()
    assert log["id"].tolist() == [10, 11, 12] and log["valid"].tolist() == [True, False, True]
    assert log["counts"].dtype == np.uint16 and log["counts"][2].tolist() == [6, 7, 8]
    assert (store.n_stimuli, store.n_presentations, store.n_sites) == (4, 3, N_SITES)


def test_existing_presentation_ids_are_skipped_or_refused(store):
    _fill(store)
    new = store.append_presentations([11, 13, 13], [0, 1, 2], [2.0, 2.2, 2.4], np.ones(3, bool), np.ones((3, N_SITES), int))
    assert new == 1 and store.read_presentations()["id"].tolist() == [10, 11, 12, 13]
    assert store.read_presentations()["stimulus"].tolist()[-1] == 1
    with pytest.raises(ValueError, match=r"'ids': presentations \[12\] are already stored"):
        store.append_presentations([12], [0], [3.0], np.ones(1, bool), np.ones((1, N_SITES), int), skip_existing=False)
    assert store.append_presentations([10], [0], [3.0], np.ones(1, bool), np.ones((1, N_SITES), int)) == 0
    reopened = open_store(store.path, mode="a")
    assert reopened.append_presentations([13, 14], [0, 0], [4.0, 4.2], np.ones(2, bool), np.ones((2, N_SITES), int)) == 1


def test_half_written_append_is_invisible_and_overwritten(store):
    _fill(store)
    root = zarr.open_group(str(store.path), mode="r+")
    for name in ("presentations/id", "presentations/stimulus", "presentations/onset", "presentations/valid", "counts"):
        root[name].resize((5, *root[name].shape[1:]))  # a crash after resizing, before the commit
    root["presentations/id"][3:] = [99, 98]
    reopened = open_store(store.path, mode="a")
    assert reopened.n_presentations == 3 and reopened.read_presentations()["id"].tolist() == [10, 11, 12]
    assert reopened.append_presentations([99], [1], [5.0], np.ones(1, bool), np.ones((1, N_SITES), int)) == 1
    assert reopened.read_presentations()["id"].tolist() == [10, 11, 12, 99]


def test_finished_store_is_consolidated_trimmed_and_refuses_appends(store):
    _fill(store)
    store.finish()
    with pytest.raises(ValueError, match=r"is finished and refuses appends"):
        store.append_presentations([20], [0], [5.0], np.ones(1, bool), np.ones((1, N_SITES), int))
    reader = open_store(store.path)
    assert reader.finished and reader.n_presentations == 3
    with pytest.raises(ValueError, match=r"open read-only"):
        reader.append_stimuli(_frames(1), parent=-1, site=-1, eps=0, direction=0, kind="clean",
                              predicted=np.zeros((1, N_SITES)), code=[9])
    metadata = json.loads((store.path / "zarr.json").read_text())
    assert "consolidated_metadata" in metadata and metadata["attributes"]["schema_version"] == SCHEMA_VERSION


def test_readable_with_plain_zarr_and_xarray(store):
    _fill(store)
    store.finish()
    root = zarr.open_group(str(store.path), mode="r")
    assert root["stimuli/pixels"].shape == (4, 224, 224, 3) and root["counts"].dtype == np.uint16
    assert root["sites/electrode"][:].tolist() == [1, 2, 3]
    stimuli = xr.open_zarr(store.path, group="stimuli")
    assert stimuli.sizes["stimulus"] == 4 and stimuli["predicted"].dims == ("stimulus", "site_index")
    assert stimuli["kind"].values.tolist()[2] == "attack"
    log = xr.open_zarr(store.path, group="presentations")
    assert log["onset"].values.tolist() == [1.0, 1.2, 1.4]
    counts = xr.open_zarr(store.path)["counts"]
    assert counts.dims == ("presentation", "site_index") and int(counts.sum()) == 36
    sites = xr.open_zarr(store.path, group="sites")
    assert sites["label"].values.tolist() == ["e1", "e2", "e3"]


def test_unfinished_store_readable_with_xarray(store):
    _fill(store)
    log = xr.open_zarr(store.path, group="presentations", consolidated=False)
    assert log.attrs["n_committed"] == 3 and log["id"].values.tolist() == [10, 11, 12]


def test_site_table_round_trip(tmp_path):
    sites = SiteTable(array=[0, 1], electrode=[5, 120], unit=[-1, 2], label=("a", "b"))
    assert create_store(tmp_path / "s.zarr", sites=sites).sites == sites
    assert open_store(tmp_path / "s.zarr").sites == sites


def test_newer_schema_is_refused_and_left_alone(store):
    _fill(store)
    root = zarr.open_group(str(store.path), mode="r+")
    root.attrs["schema_version"] = SCHEMA_VERSION + 1
    before = _snapshot(store.path)
    for mode in ("r", "a"):
        with pytest.raises(ValueError, match=rf"store.zarr' was written with schema version {SCHEMA_VERSION + 1}.*upgrade"):
            open_store(store.path, mode=mode)
    assert _snapshot(store.path) == before


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'store': the directory .* does not exist"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"'.*other' is not a closedloop day store"):
        open_store(tmp_path / "other")
    with pytest.raises(ValueError, match=r"Invalid value for 'mode': allowed values are 'r', 'a', but got 'w'"):
        open_store(tmp_path / "other", mode="w")
    create_store(tmp_path / "s.zarr", sites=2)
    with pytest.raises(FileExistsError, match=r"already exists"):
        create_store(tmp_path / "s.zarr", sites=2)
    assert create_store(tmp_path / "s.zarr", sites=4, overwrite=True).n_sites == 4


def test_bad_appends_are_refused_without_change(store):
    _fill(store)
    before = _snapshot(store.path)
    good = dict(parent=0, site=1, eps=1.0, direction=1, kind="attack", predicted=np.zeros((1, N_SITES)), code=[7])
    cases = [
        (dict(good, kind="atack"), ValueError, r"Invalid value for 'kind': allowed values are 'clean', 'attack'"),
        (dict(good, code=[3]), ValueError, r"'code': event codes \[3\] are already used"),
        (dict(good, site=N_SITES), ValueError, r"'site' must lie in \[-1, 2\]"),
        (dict(good, direction=0), ValueError, r"an 'attack' stimulus needs a target site >= 0 and direction"),
        (dict(good, kind="clean"), ValueError, r"a 'clean' stimulus needs parent = -1"),
        (dict(good, eps=-1.0), ValueError, r"'eps' must be finite and >= 0"),
        (dict(good, predicted=np.zeros((1, 2))), ValueError, r"'predicted' must have shape \(1, 3\)"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            store.append_stimuli(_frames(1), **kwargs)
    with pytest.raises(ValueError, match=r"'stimulus' must lie in \[0, 3\], but got \[4\]"):
        store.append_presentations([20], [4], [1.0], np.ones(1, bool), np.ones((1, N_SITES), int))
    with pytest.raises(TypeError, match=r"'valid' must be a bool array"):
        store.append_presentations([20], [0], [1.0], [1], np.ones((1, N_SITES), int))
    with pytest.raises(ValueError, match=r"'counts' must lie in \[0, 65535\]"):
        store.append_presentations([20], [0], [1.0], np.ones(1, bool), -np.ones((1, N_SITES), int))
    assert _snapshot(store.path) == before


def test_presentations_without_live_counts_wait_for_the_ingest(store):
    _fill(store)
    with pytest.raises(ValueError, match=r"holds presentations with live counts, these come without; a day's presentations "
                                         r"are all with or all without counts"):
        store.append_presentations([13], [0], [1.6], np.array([True]), None)
    other = create_store(store.path.with_name("other.zarr"), sites=N_SITES)
    other.append_stimuli(_frames(2), parent=-1, site=-1, eps=0.0, direction=0, kind="clean",
                         predicted=np.zeros((2, N_SITES)), code=[1, 2])
    assert other.has_live_counts  # an empty store, as every store written before live_counts existed
    assert other.append_presentations([0, 1, 2], [0, 1, 0], [1.0, 1.2, 1.4], np.array([True, True, True]), None) == 3
    with pytest.raises(ValueError, match=r"holds presentations without live counts, these come with"):
        other.append_presentations([3], [1], [1.6], np.array([True]), np.zeros((1, N_SITES), int))
    reader = open_store(other.path)
    assert not reader.has_live_counts and not reader.read_presentations()["counts"].any()
    with pytest.raises(ValueError, match=r"has no spike counts yet: its rig sent presentations without counts; ingest the "
                                         r"day's recording first"):
        reader.read_counts()
    other.write_ingest(np.full((3, N_SITES), 4), np.array([True, False, True]), np.array([1.0, np.nan, 1.4]), attrs={})
    counts, from_nev = open_store(other.path).read_counts()
    assert counts[:, 0].tolist() == [4, 0, 4] and from_nev.tolist() == [True, False, True]
    responses = read_day_responses(other.path)  # the unmatched presentation has no count: not valid there
    assert responses.valid.tolist() == [True, False, True] and responses.n_valid.tolist() == [2, 0]
    assert responses.source == "nev"


def _zarr_tasks_pending() -> int:
    """How many tasks zarr's I/O thread still runs (it writes chunks there, several at once)."""
    import asyncio

    from zarr.core import sync

    async def count():
        return len([task for task in asyncio.all_tasks() if task is not asyncio.current_task()])

    return asyncio.run_coroutine_threadsafe(count(), sync.loop[0]).result(10) if sync.loop[0] else 0


def test_an_append_that_fills_the_disk_leaves_no_chunk_write_running(tmp_path):
    """zarr writes an append's chunks concurrently and gives up at the first that fails, leaving the others
    running: they went on writing after the error and, when the process exited, asyncio printed 'Task was
    destroyed but it is pending!' after the one-line error. The store waits for them before it raises."""
    from tests.small_disk import fill_disk, mount_small_disk

    with mount_small_disk(tmp_path / "disk", 8 << 20) as disk:
        store = create_store(disk / "store.zarr", sites=N_SITES)
        fill_disk(disk, leave_bytes=1 << 20)
        n = 40 * 16  # 40 chunks of 16 frames (2.4 MB each): the first fails while most are still queued
        with pytest.raises(OSError, match="No space left"):
            store.append_stimuli(_frames(n), parent=-1, site=-1, eps=0.0, direction=0, kind="clean",
                                 predicted=np.zeros((n, N_SITES)), code=np.arange(n) + 1)
        assert _zarr_tasks_pending() == 0
        assert store.n_stimuli == 0
