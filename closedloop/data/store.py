"""The day store ``store.zarr``: everything one day records, append-only while recording.

A zarr v3 group, readable with plain zarr and with ``xarray.open_zarr(path, group=...)``
(every array names its dimensions). Layout (``n_stim`` stimuli, ``n_pres`` presentations):

- ``stimuli/``: ``pixels`` uint8 ``(n_stim, 224, 224, 3)``; ``parent`` int64 (clean image's
  stimulus index, −1 for a clean image); ``site`` int64 (target site, −1 if none); ``eps``
  float64 (L2 budget in [0, 1] pixel units, 0 for clean); ``direction`` int8 (+1 increase,
  −1 decrease, 0 none); ``kind`` string; ``predicted`` float64 ``(n_stim, n_sites)`` (spikes per
  window predicted by the generating model on the 8-bit image; NaN if none); ``code`` uint16
  (the digital event word of the stimulus, unique).
- ``presentations/``: ``id`` int64 (unique, given by the control side); ``stimulus`` int64;
  ``onset`` float64 (s, recording clock); ``valid`` bool (shown without a fixation break).
- ``counts`` uint16 ``(n_pres, n_sites)``: spikes per response window from the live stream;
  all zero, with the root attribute ``live_counts`` false, when the rig sent no counts (a real
  presenter, or the files hand-off): the ``.nev`` ingest is then the only source of counts.
- ``sites/``: ``array``, ``electrode``, ``unit`` int64 (−1 = all units merged), ``label`` string.
- ``ingest/`` (after ``closedloop ingest``): ``counts`` uint16 ``(n_pres, n_sites)`` from the
  ``.nev``, ``matched`` bool, ``onset`` float64 (s, NaN where unmatched); attributes name the
  source file, its sha256, the window and every mismatch.

Appends are committed in two steps: arrays are resized and filled, then the group attribute
``n_committed`` is written. Readers use only the first ``n_committed`` rows, so a crash during an
append never exposes half-written rows; the next append overwrites them. :meth:`DayStore.finish`
trims the arrays to their committed length and consolidates the metadata; a finished store
refuses appends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zarr
from zarr.core import sync as zarr_sync

from closedloop.core.logs import logger
from closedloop.core.validation import check_array, check_dir, check_integer, check_integer_array, check_option
from closedloop.data.sites import SiteTable, make_default_sites

__all__ = ["DayStore", "create_store", "open_store", "SCHEMA_VERSION", "KINDS"]

SCHEMA_VERSION = 1
KINDS = ("clean", "attack", "gaussian", "interpolation")
FRAME_SHAPE = (224, 224, 3)
COMMITTED = "n_committed"
_STIMULI = "stimuli"
_PRESENTATIONS = "presentations"
_INGEST = "ingest"
_INGEST_NEW = "ingest_new"
_INGEST_OLD = "ingest_old"
_STIMULUS_CHUNK = 16
_ROW_CHUNK = 4096


def _array_specs(n_sites: int) -> dict[str, tuple]:
    """Append-only arrays: path → (dtype, trailing shape, dimension names, rows per chunk)."""
    return {
        "stimuli/pixels": (np.uint8, FRAME_SHAPE, ("stimulus", "y", "x", "channel"), _STIMULUS_CHUNK),
        "stimuli/parent": (np.int64, (), ("stimulus",), _ROW_CHUNK),
        "stimuli/site": (np.int64, (), ("stimulus",), _ROW_CHUNK),
        "stimuli/eps": (np.float64, (), ("stimulus",), _ROW_CHUNK),
        "stimuli/direction": (np.int8, (), ("stimulus",), _ROW_CHUNK),
        "stimuli/kind": (str, (), ("stimulus",), _ROW_CHUNK),
        "stimuli/predicted": (np.float64, (n_sites,), ("stimulus", "site_index"), _ROW_CHUNK),
        "stimuli/code": (np.uint16, (), ("stimulus",), _ROW_CHUNK),
        "stimuli/image_id": (str, (), ("stimulus",), _ROW_CHUNK),
        "stimuli/category": (str, (), ("stimulus",), _ROW_CHUNK),
        "presentations/id": (np.int64, (), ("presentation",), _ROW_CHUNK),
        "presentations/stimulus": (np.int64, (), ("presentation",), _ROW_CHUNK),
        "presentations/onset": (np.float64, (), ("presentation",), _ROW_CHUNK),
        "presentations/valid": (np.bool_, (), ("presentation",), _ROW_CHUNK),
        "counts": (np.uint16, (n_sites,), ("presentation", "site_index"), _ROW_CHUNK),
    }


def _settling_zarr_writes(write):
    """Make ``write`` wait, when it fails, for the chunk writes zarr still runs before it raises.

    zarr writes an array's chunks concurrently on its I/O thread and raises at the first that fails
    (a full disk), leaving the others running: they would go on writing after the error, and be
    destroyed half-way when the process exits (asyncio then prints "Task was destroyed but it is
    pending!" after the one-line error). Waits at most 60 s.
    """
    @functools.wraps(write)
    def settled(*args, **kwargs):
        try:
            return write(*args, **kwargs)
        except BaseException:
            loop = zarr_sync.loop[0]
            if loop is not None and loop.is_running():
                with contextlib.suppress(TimeoutError):  # a hung disk: the write's own error matters more
                    asyncio.run_coroutine_threadsafe(_the_rest(60.0), loop).result(65.0)
            raise
    return settled


async def _the_rest(timeout_s: float) -> None:
    """Wait for every other task of the running loop (zarr's) to end, at most ``timeout_s``."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=timeout_s)


def _group_of(name: str) -> str:
    return _STIMULI if name.startswith(_STIMULI) else _PRESENTATIONS


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path))


def _broadcast(name: str, values, n: int) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 0:
        return np.broadcast_to(values, (n,))
    return check_array(name, values, shape=(n,))


class DayStore:
    """One day's store; make it with :func:`create_store` or :func:`open_store`."""

    def __init__(self, path: Path, root: zarr.Group, mode: str) -> None:
        self.path = path
        self.mode = mode
        self._root = root
        self.sites = SiteTable(
            array=root["sites/array"][:],
            electrode=root["sites/electrode"][:],
            unit=root["sites/unit"][:],
            label=tuple(str(text) for text in root["sites/label"][:]),
        )
        self._codes = self._read("stimuli/code")
        self._ids = np.sort(self._read("presentations/id"))

    # -- sizes --------------------------------------------------------------------------------
    @property
    def n_sites(self) -> int:
        return self.sites.n_sites

    @property
    def n_stimuli(self) -> int:
        return int(self._root[_STIMULI].attrs[COMMITTED])

    @property
    def n_presentations(self) -> int:
        return int(self._root[_PRESENTATIONS].attrs[COMMITTED])

    @property
    def has_live_counts(self) -> bool:
        """False when the presentations came without spike counts (only the ``.nev`` has them)."""
        return bool(self._root.attrs.get("live_counts", True))

    @property
    def finished(self) -> bool:
        return bool(self._root.attrs.get("finished", False))

    def __repr__(self) -> str:
        state = "finished" if self.finished else "recording"
        return (
            f"DayStore({str(self.path)!r}, {self.n_stimuli} stimuli, {self.n_presentations} presentations, "
            f"{self.n_sites} sites, {state})"
        )

    # -- reading ------------------------------------------------------------------------------
    def _read(self, name: str, rows: slice | None = None) -> np.ndarray:
        n = int(self._root[_group_of(name)].attrs[COMMITTED])
        rows = rows or slice(0, n)
        start, stop, _ = rows.indices(n)
        return self._root[name][start:stop]

    def read_stimuli(self, *, pixels: bool = True) -> dict[str, np.ndarray]:
        """Committed stimuli: a dict of the ``stimuli/`` arrays (see the module docstring).

        ``pixels=False`` leaves out the frames (the large part).
        """
        names = [name for name in _array_specs(self.n_sites) if name.startswith(_STIMULI + "/")]
        return {
            name.split("/")[1]: self._read(name)
            for name in names
            if pixels or name != "stimuli/pixels"
        }

    def read_pixels(self, indices) -> np.ndarray:
        """Frames of the given stimuli: uint8 ``(len(indices), 224, 224, 3)``."""
        indices = check_integer_array("indices", indices, shape=(None,), minimum=0, maximum=self.n_stimuli - 1)
        return self._root["stimuli/pixels"].get_orthogonal_selection((indices, slice(None), slice(None), slice(None)))

    def read_presentations(self, start: int = 0) -> dict[str, np.ndarray]:
        """Committed presentations from row ``start`` on (0: all): ``id``, ``stimulus``, ``onset`` (s),
        ``valid`` ``(n,)`` and ``counts`` uint16 ``(n, n_sites)`` (live stream). A reader that
        follows a recording day asks only for the rows after those it has read."""
        start = check_integer("start", start, minimum=0)
        names = [name for name in _array_specs(self.n_sites) if _group_of(name) == _PRESENTATIONS]
        n = int(self._root[_PRESENTATIONS].attrs[COMMITTED])  # one commit for every column
        return {name.split("/")[-1]: self._read(name, slice(min(start, n), n)) for name in names}

    def read_ingest(self) -> dict | None:
        """The ``.nev`` ingest result, or None when the day was not ingested yet.

        Returns ``counts`` uint16 ``(n, n_sites)``, ``matched`` bool ``(n,)``, ``onset`` float64
        ``(n,)`` (s) for the first ``n`` presentations, and ``attrs`` (source, sha256, window_s,
        mismatches).
        """
        if _INGEST not in self._root:
            return None
        group = self._root[_INGEST]
        result = {name: group[name][:] for name in ("counts", "matched", "onset")}
        result["attrs"] = dict(group.attrs)
        return result

    def read_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The counts to trust: uint16 ``(n_pres, n_sites)`` spikes per response window from the
        ``.nev`` ingest where the day was ingested and the presentation matched, else from the live
        stream; and bool ``(n_pres,)``, True where the count came from the ``.nev``. A store
        without live counts (:attr:`has_live_counts`) has counts only where the ``.nev`` matched
        (zeros elsewhere: leave those presentations out), and none before its ingest: that raises
        ``ValueError``."""
        counts = self._read("counts")
        from_nev = np.zeros(len(counts), dtype=bool)
        ingest = self.read_ingest()
        if ingest is None and not self.has_live_counts and len(counts):
            raise ValueError(
                f"day store {str(self.path)!r} has no spike counts yet: its rig sent presentations without counts; "
                "ingest the day's recording first (copy the .nev into the day folder and run `closedloop fit-day` "
                "again, or `closedloop ingest`)."
            )
        if ingest is not None:
            from_nev[: len(ingest["matched"])] = ingest["matched"]
            counts[from_nev] = ingest["counts"][ingest["matched"]]
        return counts, from_nev

    # -- appending ----------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.mode == "r":
            raise ValueError(f"day store {str(self.path)!r} is open read-only; open it with mode='a' to append.")
        if self.finished:
            raise ValueError(
                f"day store {str(self.path)!r} is finished and refuses appends; record further data in a new day."
            )

    @_settling_zarr_writes
    def _append(self, group: str, columns: dict[str, np.ndarray]) -> None:
        """Resize and fill every column, then commit the new length (the two-step append)."""
        start = int(self._root[group].attrs[COMMITTED])
        n_new = len(next(iter(columns.values())))
        for name, values in columns.items():
            array = self._root[name]
            array.resize((start + n_new, *array.shape[1:]))
            if n_new:
                array[start:] = values
        self._root[group].attrs[COMMITTED] = start + n_new

    def append_stimuli(self, pixels, *, parent, site, eps, direction, kind, predicted, code, image_id="",
                       category="") -> np.ndarray:
        """Append stimuli; return their stimulus indices, int64 ``(n,)``.

        ``pixels`` uint8 ``(n, 224, 224, 3)``; ``parent``, ``site``, ``direction``, ``eps`` (L2,
        [0, 1] pixel units), ``kind`` (one of :data:`KINDS`): ``(n,)`` or one value for all;
        ``predicted`` ``(n, n_sites)`` spikes per window (NaN where unknown); ``code`` ``(n,)``
        event codes in 1..65535, unique over the day; ``image_id`` and ``category`` (str, ``(n,)``
        or one value): the image pool's id and category name of the clean image (of the parent
        for a perturbed stimulus; "" if unknown). A clean stimulus has parent = site = −1,
        direction 0 and eps 0; any other has a parent ≥ 0 and eps > 0; an attack also has a
        target site and direction ±1.
        """
        self._check_writable()
        pixels = check_array("pixels", pixels, shape=(None, *FRAME_SHAPE), dtype=np.uint8)
        n, start = len(pixels), self.n_stimuli
        kinds = _broadcast("kind", kind, n)
        for value in set(kinds.tolist()):
            check_option("kind", value, KINDS)
        parent = check_integer_array("parent", _broadcast("parent", parent, n), shape=(n,), minimum=-1,
                                     maximum=start + n - 1)
        site = check_integer_array("site", _broadcast("site", site, n), shape=(n,), minimum=-1, maximum=self.n_sites - 1)
        direction = check_integer_array("direction", _broadcast("direction", direction, n), shape=(n,), minimum=-1,
                                        maximum=1)
        eps = _broadcast("eps", eps, n).astype(np.float64)
        if not (np.isfinite(eps).all() and (eps >= 0).all()):
            raise ValueError(f"'eps' must be finite and >= 0 (L2 in [0, 1] pixel units), but got {eps[:5].tolist()}.")
        predicted = check_array("predicted", predicted, shape=(n, self.n_sites)).astype(np.float64)
        code = check_integer_array("code", _broadcast("code", code, n), shape=(n,), minimum=1, maximum=65535)
        self._check_stimulus_rows(kinds, parent, site, direction, eps)
        self._check_new_codes(code)
        self._append(_STIMULI, {
            "stimuli/pixels": pixels, "stimuli/parent": parent, "stimuli/site": site, "stimuli/eps": eps,
            "stimuli/direction": direction.astype(np.int8), "stimuli/kind": kinds.astype(str),
            "stimuli/predicted": predicted, "stimuli/code": code.astype(np.uint16),
            "stimuli/image_id": _broadcast("image_id", image_id, n).astype(str),
            "stimuli/category": _broadcast("category", category, n).astype(str),
        })
        self._codes = np.concatenate([self._codes, code.astype(np.uint16)])
        return np.arange(start, start + n, dtype=np.int64)

    @staticmethod
    def _check_stimulus_rows(kinds, parent, site, direction, eps) -> None:
        clean = kinds == "clean"
        rules = [
            (clean & ((parent != -1) | (site != -1) | (direction != 0) | (eps != 0)),
             "a 'clean' stimulus needs parent = -1, site = -1, direction = 0 and eps = 0"),
            (~clean & ((parent < 0) | (eps <= 0)), "a perturbed stimulus needs a parent >= 0 and eps > 0"),
            ((kinds == "attack") & ((site < 0) | (direction == 0)),
             "an 'attack' stimulus needs a target site >= 0 and direction +1 or -1"),
        ]
        for bad, rule in rules:
            if bad.any():
                rows = np.flatnonzero(bad)[:5].tolist()
                raise ValueError(f"append_stimuli: rows {rows} break the rule: {rule}.")

    def _check_new_codes(self, code: np.ndarray) -> None:
        values, counts = np.unique(code, return_counts=True)
        repeated = values[counts > 1].tolist() + np.intersect1d(code, self._codes).tolist()
        if repeated:
            raise ValueError(
                f"'code': event codes {sorted(set(repeated))[:5]} are already used by other stimuli of this day; "
                "every stimulus needs its own code (see closedloop.data.bundle.make_event_codes)."
            )

    def append_presentations(self, ids, stimulus, onset, valid, counts, *, skip_existing: bool = True) -> int:
        """Append presentations; return how many were new.

        ``ids`` int ``(n,)``: unique presentation ids from the control side; ``stimulus`` ``(n,)``
        stimulus indices; ``onset`` ``(n,)`` s on the recording clock; ``valid`` bool ``(n,)``;
        ``counts`` ``(n, n_sites)`` spikes per response window (0..65535), or None when the rig
        sent none (stored as zeros and the store marked as without live counts; a day's
        presentations are all with or all without counts). An id already stored (or repeated
        within ``ids``) is skipped with ``skip_existing`` (crash-resume and stream retries), and
        refused otherwise.
        """
        self._check_writable()
        ids = check_integer_array("ids", ids, shape=(None,))
        n = len(ids)
        if n and (counts is None) == self.has_live_counts and self.n_presentations:
            raise ValueError(
                f"'counts': day store {str(self.path)!r} holds presentations {'with' if self.has_live_counts else 'without'} "
                f"live counts, these come {'without' if counts is None else 'with'}; a day's presentations are all "
                "with or all without counts."
            )
        if n and not self.n_presentations:
            self._root.attrs["live_counts"] = counts is not None
        if counts is None:
            counts = np.zeros((n, self.n_sites), dtype=np.uint16)
        stimulus = check_integer_array("stimulus", stimulus, shape=(n,), minimum=0, maximum=self.n_stimuli - 1)
        onset = check_array("onset", onset, shape=(n,)).astype(np.float64)
        if not np.isfinite(onset).all():
            raise ValueError("'onset' must be finite times in s on the recording clock, but holds NaN or inf.")
        valid = check_array("valid", valid, shape=(n,))
        if valid.dtype != np.bool_:
            raise TypeError(f"'valid' must be a bool array (True = shown without a fixation break), got {valid.dtype}.")
        counts = check_integer_array("counts", counts, shape=(n, self.n_sites), minimum=0, maximum=65535)
        _, first = np.unique(ids, return_index=True)
        keep = np.zeros(n, dtype=bool)
        keep[first] = True
        keep &= ~np.isin(ids, self._ids)
        if not skip_existing and not keep.all():
            repeated = sorted(set(ids[~keep].tolist()))
            raise ValueError(
                f"'ids': presentations {repeated[:5]} are already stored (or repeated); pass skip_existing=True "
                "to skip them."
            )
        if not keep.any():
            return 0
        self._append(_PRESENTATIONS, {
            "presentations/id": ids[keep], "presentations/stimulus": stimulus[keep],
            "presentations/onset": onset[keep], "presentations/valid": valid[keep],
            "counts": counts[keep].astype(np.uint16),
        })
        self._ids = np.sort(np.concatenate([self._ids, ids[keep]]))
        return int(keep.sum())

    # -- ingest and finishing -----------------------------------------------------------------
    @_settling_zarr_writes
    def write_ingest(self, counts, matched, onset, *, attrs: dict) -> None:
        """Store the ``.nev`` ingest: ``counts`` ``(n_pres, n_sites)``, ``matched`` bool and
        ``onset`` (s) ``(n_pres,)`` for the committed presentations, and JSON-ready ``attrs``.

        Replaces an earlier ingest only once the new one is complete; the stimuli, presentations
        and live counts are not touched. Allowed on a finished store (metadata is re-consolidated).
        """
        if self.mode == "r":
            raise ValueError(f"day store {str(self.path)!r} is open read-only; open it with mode='a' to ingest.")
        n = self.n_presentations
        counts = check_integer_array("counts", counts, shape=(n, self.n_sites), minimum=0, maximum=65535)
        matched = check_array("matched", matched, shape=(n,), dtype=np.bool_)
        onset = check_array("onset", onset, shape=(n,)).astype(np.float64)
        attrs = json.loads(json.dumps(attrs))
        for name in (_INGEST_NEW, _INGEST_OLD):
            shutil.rmtree(self.path / name, ignore_errors=True)
        group = zarr.open_group(str(self.path), mode="a", use_consolidated=False).create_group(_INGEST_NEW)
        for name, values, dims in (
            ("counts", counts.astype(np.uint16), ("presentation", "site_index")),
            ("matched", matched, ("presentation",)),
            ("onset", onset, ("presentation",)),
        ):
            chunks = (min(max(n, 1), _ROW_CHUNK), *values.shape[1:])
            array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=chunks, dimension_names=dims)
            array[...] = values
        group.attrs.update({**attrs, COMMITTED: n})
        if (self.path / _INGEST).exists():
            (self.path / _INGEST).rename(self.path / _INGEST_OLD)
        (self.path / _INGEST_NEW).rename(self.path / _INGEST)
        shutil.rmtree(self.path / _INGEST_OLD, ignore_errors=True)
        if self.finished:
            _consolidate(self.path)
        self._root = zarr.open_group(str(self.path), mode="a", use_consolidated=False)
        logger.info("stored the ingest of %d presentations in %s", n, self.path)

    @_settling_zarr_writes
    def finish(self) -> None:
        """Trim every array to its committed length, mark the store finished and consolidate."""
        if self.mode == "r":
            raise ValueError(f"day store {str(self.path)!r} is open read-only; open it with mode='a' to finish it.")
        for name in _array_specs(self.n_sites):
            n = int(self._root[_group_of(name)].attrs[COMMITTED])
            array = self._root[name]
            if array.shape[0] != n:
                array.resize((n, *array.shape[1:]))
        self._root.attrs["finished"] = True
        self._root.attrs["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        _consolidate(self.path)


@_settling_zarr_writes
def create_store(path: str | Path, *, sites: SiteTable | int, overwrite: bool = False) -> DayStore:
    """Create an empty day store at ``path`` (a ``.zarr`` folder) for ``sites``.

    ``sites``: a :class:`SiteTable`, or a number of sites (electrodes 1..n, units merged).
    Refuses an existing path unless ``overwrite``.
    """
    if not isinstance(sites, SiteTable):
        sites = make_default_sites(sites)
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"day store {str(path)!r} already exists; open it with open_store, or pass overwrite=True.")
    if path.exists():
        shutil.rmtree(path)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, (dtype, trailing, dims, rows) in _array_specs(sites.n_sites).items():
        root.create_array(name, shape=(0, *trailing), dtype=dtype, chunks=(rows, *trailing), dimension_names=dims)
    for group in (_STIMULI, _PRESENTATIONS):
        root[group].attrs[COMMITTED] = 0
    for name, values in (("array", sites.array), ("electrode", sites.electrode), ("unit", sites.unit),
                         ("label", np.array(sites.label, dtype=str))):
        array = root.create_array(f"sites/{name}", shape=values.shape, dtype=values.dtype if name != "label" else str,
                                  chunks=(max(len(values), 1),), dimension_names=("site_index",))
        array[...] = values
    root.attrs.update({
        "format": "closedloop day store",
        "schema_version": SCHEMA_VERSION,
        "n_sites": sites.n_sites,
        "finished": False,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    return DayStore(path, root, "a")


def open_store(path: str | Path, mode: str = "r") -> DayStore:
    """Open an existing day store; ``mode`` "r" (read) or "a" (append).

    Refuses a folder that is not a closedloop day store, and a store written by a newer schema
    version, without changing anything on disk.
    """
    check_option("mode", mode, ("r", "a"))
    path = check_dir("store", path)
    try:
        attributes = json.loads((path / "zarr.json").read_text(encoding="utf-8")).get("attributes", {})
    except (FileNotFoundError, json.JSONDecodeError):
        attributes = {}
    if attributes.get("format") != "closedloop day store":
        raise ValueError(f"{str(path)!r} is not a closedloop day store (no zarr.json with format 'closedloop day store').")
    version = attributes.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(
            f"day store {str(path)!r} was written with schema version {version!r}; this closedloop reads versions up "
            f"to {SCHEMA_VERSION}; upgrade closedloop to read it."
        )
    root = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", use_consolidated=None if mode == "r" else False)
    return DayStore(path, root, mode)
