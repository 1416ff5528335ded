"""The rig bundle ``stimuli.h5``: the day's 8-bit frames, their ids and event codes, for the rig.

An HDF5 file that MATLAB's ``h5read`` reads as it is: default library version bounds, gzip
compression only, fixed-length ASCII strings, booleans stored as uint8. Datasets:

- ``pixels``        uint8 ``(n_stimuli, 224, 224, 3)``: RGB frames, 0–255.
- ``stimulus_ids``  int64 ``(n_stimuli,)``: the stimulus index in the day store.
- ``codes``         uint16 ``(n_stimuli,)``: the digital event word the rig sends at onset
  (non-zero, unique).

For a rig that runs its own software (``[rig] kind = "files"``) the bundle also holds the day's
RSVP list as a group ``rsvp/`` of int64 datasets ``(n_presentations,)``: ``presentation``,
``stimulus_id``, ``code`` (uint16) and ``repetition``, in showing order
(:mod:`closedloop.data.handoff`; in MATLAB ``h5read('stimuli.h5', '/rsvp/code')``).

Root attributes: ``sha256`` (hex digest of the ``pixels`` bytes in C order, see
:func:`compute_bundle_digest`), ``n_stimuli``, ``format_version`` and any caller attributes.

:func:`read_bundle` and :func:`check_bundle` check all of it (datasets, not groups; dtypes;
``n`` ids and ``n`` codes for ``n`` frames; unique ids; codes in 1..65279 and unique, since
65280 and up are the rig's control codes (:mod:`closedloop.data.event_codes`); the frames'
sha256) and raise :class:`BundleError` for a file that breaks any of it, so a reader (e.g. the
rig agent, before it accepts a bundle) never holds half a bundle.
"""


from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from closedloop.core.files import write_bytes
from closedloop.core.validation import check_array, check_file, check_integer, check_integer_array
from closedloop.data.event_codes import MAX_STIMULUS_CODE

__all__ = [
    "Bundle",
    "BundleError",
    "write_bundle",
    "read_bundle",
    "check_bundle",
    "compute_bundle_digest",
    "make_event_codes",
    "MAX_EVENT_CODE",
    "BUNDLE_FORMAT_VERSION",
]

MAX_EVENT_CODE = MAX_STIMULUS_CODE
BUNDLE_FORMAT_VERSION = 1
FRAME_SHAPE = (224, 224, 3)
_RESERVED_ATTRS = ("sha256", "n_stimuli", "format_version")
_DATASETS = ("pixels", "stimulus_ids", "codes")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FRAMES_PER_READ = 64


class BundleError(ValueError):
    """A file that is not a valid rig bundle. ``path``: the file; ``problem``: what is wrong (the
    message without the file's name, e.g. for a reply that must stay short)."""

    def __init__(self, path, problem: str) -> None:
        super().__init__(f"bundle {str(path)!r}: {problem}")
        self.path, self.problem = Path(path), problem


@dataclass(frozen=True, eq=False)
class Bundle:
    """A rig bundle in memory: ``pixels`` uint8 ``(n, 224, 224, 3)``, ``stimulus_ids`` int64
    ``(n,)``, ``codes`` uint16 ``(n,)``, the frames' ``sha256`` and the caller's ``attrs``."""

    pixels: np.ndarray
    stimulus_ids: np.ndarray
    codes: np.ndarray
    sha256: str
    attrs: dict = field(default_factory=dict)

    @property
    def n_stimuli(self) -> int:
        return len(self.stimulus_ids)


def compute_bundle_digest(pixels: np.ndarray) -> str:
    """sha256 hex digest of 8-bit frames ``(n, 224, 224, 3)``, hashed as C-order bytes."""
    pixels = check_array("pixels", pixels, shape=(None, *FRAME_SHAPE), dtype=np.uint8)
    digest = hashlib.sha256()
    for frame in pixels:
        digest.update(np.ascontiguousarray(frame).data)
    return digest.hexdigest()


def make_event_codes(n: int) -> np.ndarray:
    """Digital event codes ``1..n`` as uint16 ``(n,)``; at most 65279 stimuli fit one 16-bit port
    (the codes above are the rig's control codes, :mod:`closedloop.data.event_codes`)."""
    n = check_integer("n", n, minimum=0)
    if n > MAX_EVENT_CODE:
        raise ValueError(
            f"'n' = {n} stimuli do not fit the 16-bit digital port (stimulus codes 1..{MAX_EVENT_CODE}); "
            f"split the day's stimuli into bundles of at most {MAX_EVENT_CODE}."
        )
    return np.arange(1, n + 1, dtype=np.uint16)


def _check_codes(codes, n: int) -> np.ndarray:
    codes = check_integer_array("codes", codes, shape=(n,), minimum=1, maximum=MAX_EVENT_CODE)
    values, counts = np.unique(codes, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"'codes' must be unique (one stimulus per event code), but {values[counts > 1][:5].tolist()} repeat; "
            "make them with make_event_codes(n)."
        )
    return codes.astype(np.uint16)


def _check_ids(stimulus_ids, n: int) -> np.ndarray:
    stimulus_ids = check_integer_array("stimulus_ids", stimulus_ids, shape=(n,), minimum=0)
    values, counts = np.unique(stimulus_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"'stimulus_ids' must be unique (one frame per stimulus), but {values[counts > 1][:5].tolist()} repeat.")
    return stimulus_ids


def _as_hdf5_attr(key: str, value):
    """A caller attribute as MATLAB-friendly HDF5: fixed-length ASCII text, uint8 booleans."""
    if isinstance(value, (bool, np.bool_)):
        return np.uint8(value)
    if isinstance(value, str):
        if not value.isascii():
            raise ValueError(f"attrs[{key!r}] = {value!r}: text attributes must be ASCII (MATLAB reads them as char).")
        return np.bytes_(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    raise TypeError(
        f"attrs[{key!r}] has type {type(value).__name__}; allowed are str (ASCII), bool, int and float."
    )


def write_bundle(path: str | Path, pixels, stimulus_ids, codes, *, attrs: dict | None = None,
                 rsvp: dict[str, np.ndarray] | None = None) -> str:
    """Write the rig bundle atomically (built in memory, then written in one go); return the sha256
    hex digest of ``pixels``.

    ``pixels``: uint8 ``(n, 224, 224, 3)``; ``stimulus_ids``: integers ``(n,)`` (≥ 0, unique);
    ``codes``: event codes ``(n,)`` in 1..65279, unique; ``attrs``: extra root attributes
    (str, bool, int, float); ``rsvp``: the RSVP list of the files hand-off
    (:func:`closedloop.data.handoff.make_rsvp_list`; its stimulus ids and codes must be the
    bundle's), written as the group ``rsvp/``.
    """
    pixels = check_array("pixels", pixels, shape=(None, *FRAME_SHAPE), dtype=np.uint8)
    n = len(pixels)
    stimulus_ids = _check_ids(stimulus_ids, n)
    codes = _check_codes(codes, n)
    attrs = dict(attrs or {})
    reserved = sorted(set(attrs) & set(_RESERVED_ATTRS))
    if reserved:
        raise ValueError(f"attrs: the keys {reserved} are written by write_bundle itself; rename them.")
    converted = {str(key): _as_hdf5_attr(str(key), value) for key, value in attrs.items()}
    rsvp = None if rsvp is None else _check_rsvp(rsvp, stimulus_ids, codes)
    digest = compute_bundle_digest(pixels)

    built = io.BytesIO()  # HDF5 never writes to a disk that may fill: a failed close crashed the process at exit
    with h5py.File(built, "w") as handle:
        handle.create_dataset(
            "pixels", data=pixels, chunks=(1, *FRAME_SHAPE) if n else None, compression="gzip" if n else None
        )
        handle.create_dataset("stimulus_ids", data=stimulus_ids, dtype=np.int64)
        handle.create_dataset("codes", data=codes, dtype=np.uint16)
        handle.attrs["sha256"] = np.bytes_(digest)
        handle.attrs["n_stimuli"] = np.int64(n)
        handle.attrs["format_version"] = np.int64(BUNDLE_FORMAT_VERSION)
        for key, value in converted.items():
            handle.attrs[key] = value
        for name, values in (rsvp or {}).items():
            handle.create_dataset(f"rsvp/{name}", data=values)
    write_bytes(path, built.getbuffer())
    return digest


def _check_rsvp(rsvp: dict, stimulus_ids: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    """The RSVP list as the bundle stores it; its stimulus ids and codes must be the bundle's."""
    columns = ("presentation", "stimulus_id", "code", "repetition")
    if sorted(rsvp) != sorted(columns):
        raise ValueError(f"'rsvp' must have the columns {list(columns)}, but has {sorted(rsvp)}; make it with make_rsvp_list.")
    n = len(rsvp["presentation"])
    checked = {name: check_integer_array(f"rsvp[{name!r}]", rsvp[name], shape=(n,), minimum=0).astype(np.int64)
               for name in columns}
    code_of = dict(zip(stimulus_ids.tolist(), codes.tolist()))
    if any(code_of.get(s) != c for s, c in zip(checked["stimulus_id"].tolist(), checked["code"].tolist())):
        raise ValueError("'rsvp': its stimulus ids and codes must be the bundle's (stimulus_ids, codes).")
    checked["code"] = checked["code"].astype(np.uint16)
    return checked


def _as_python(value):
    if isinstance(value, bytes):
        return value.decode("ascii")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dataset(handle: h5py.File, name: str) -> h5py.Dataset:
    item = handle[name]
    if not isinstance(item, h5py.Dataset):
        raise ValueError(f"{name!r} must be a dataset, but it is a {type(item).__name__.lower()}; write the bundle "
                         "with write_bundle.")
    return item


def _read_vector(handle: h5py.File, name: str, n: int) -> np.ndarray:
    """Dataset ``name`` as an integer array ``(n,)``; its shape and dtype are checked before it is read."""
    dataset = _dataset(handle, name)
    if dataset.shape != (n,):
        raise ValueError(f"{name!r} must have shape ({n},), one per frame of 'pixels', but got {dataset.shape}.")
    if not np.issubdtype(dataset.dtype, np.integer):
        raise ValueError(f"{name!r} must hold integers, but got dtype {dataset.dtype}.")
    return dataset[()]


def _read_index(handle: h5py.File) -> tuple[h5py.Dataset, np.ndarray, np.ndarray, str]:
    """The checked frames dataset (not read), ids, codes and stored sha256 of an open bundle."""
    missing = [name for name in _DATASETS if name not in handle] + (
        ["sha256 attribute"] if "sha256" not in handle.attrs else []
    )
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}; it was not written by write_bundle.")
    pixels = _dataset(handle, "pixels")
    if pixels.dtype != np.uint8:
        raise ValueError(f"'pixels' must have dtype uint8, but got {pixels.dtype}.")
    if pixels.ndim != 4 or pixels.shape[1:] != FRAME_SHAPE:
        raise ValueError(f"'pixels' must have shape (n, 224, 224, 3), but got {pixels.shape}.")
    n = pixels.shape[0]
    if n > MAX_EVENT_CODE:
        raise ValueError(f"'pixels' holds {n} frames, more than the {MAX_EVENT_CODE} event codes of a 16-bit port.")
    stimulus_ids = _check_ids(_read_vector(handle, "stimulus_ids", n), n)
    codes = _check_codes(_read_vector(handle, "codes", n), n)
    stored = _as_python(handle.attrs["sha256"])
    if not isinstance(stored, str) or not _SHA256.fullmatch(stored):
        raise ValueError(f"the 'sha256' attribute must be 64 lower-case hexadecimal characters, but got {stored!r:.80}.")
    return pixels, stimulus_ids, codes, stored


def _open_bundle(path):
    path = check_file("bundle", path)
    if not h5py.is_hdf5(path):
        raise BundleError(path, "not an HDF5 file; give the stimuli.h5 written by write_bundle.")
    return path


def _check_digest(actual: str, stored: str) -> None:
    if actual != stored:
        raise ValueError(
            f"the frames' sha256 is {actual} but the file records {stored}; "
            "the frames were changed or damaged after writing; write the bundle again."
        )


_READ_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError)  # h5py reports damage as any of these


def read_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read a rig bundle; with ``verify`` the frames' sha256 must match the stored attribute.

    Raises :class:`BundleError` (a ``ValueError``) naming the file and the problem for a file that
    is not a complete, consistent bundle (see the module docstring) or whose hash does not match
    (both hashes are given).
    """
    path = _open_bundle(path)
    try:
        with h5py.File(path, "r") as handle:
            dataset, stimulus_ids, codes, stored = _read_index(handle)
            pixels = dataset[()]
            attrs = {key: _as_python(value) for key, value in handle.attrs.items()}
        if verify:
            _check_digest(compute_bundle_digest(pixels), stored)
    except _READ_ERRORS as error:
        raise BundleError(path, str(error)) from error
    for key in _RESERVED_ATTRS:
        attrs.pop(key, None)
    return Bundle(pixels=pixels, stimulus_ids=stimulus_ids, codes=codes.astype(np.uint16), sha256=stored, attrs=attrs)


def check_bundle(path: str | Path) -> np.ndarray:
    """Check a rig bundle as :func:`read_bundle` does, frames' sha256 included, holding at most 64
    frames in memory; return its stimulus ids, int64 ``(n,)``. Raises :class:`BundleError`."""
    path = _open_bundle(path)
    try:
        with h5py.File(path, "r") as handle:
            pixels, stimulus_ids, _, stored = _read_index(handle)
            digest = hashlib.sha256()
            for start in range(0, len(pixels), _FRAMES_PER_READ):
                digest.update(np.ascontiguousarray(pixels[start:start + _FRAMES_PER_READ]).data)
        _check_digest(digest.hexdigest(), stored)
    except _READ_ERRORS as error:
        raise BundleError(path, str(error)) from error
    return stimulus_ids
