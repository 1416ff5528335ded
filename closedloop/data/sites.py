"""The recorded sites: which Blackrock electrode and unit each model output stands for.

A site is one electrode with all its units merged (``unit = -1``), unless a site map names a
sorted unit. Blackrock unit classes: 0 unclassified, 1–16 sorted, 255 noise; a merged site
counts every spike on its electrode except those classed as noise (255).

A site map is a CSV file with the header ``site,array,electrode,unit,label`` and one row per
site, ``site`` running 0, 1, …, n_sites − 1::

    site,array,electrode,unit,label
    0,0,1,-1,A-e1
    1,0,2,3,A-e2-u3
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from closedloop.core.validation import check_file, check_integer_array

__all__ = ["SiteTable", "read_site_map", "make_default_sites", "ALL_UNITS", "NOISE_UNIT", "SITE_MAP_COLUMNS"]

ALL_UNITS = -1
NOISE_UNIT = 255
SITE_MAP_COLUMNS = ("site", "array", "electrode", "unit", "label")
ELECTRODES_PER_ARRAY = 96


@dataclass(frozen=True, eq=False)
class SiteTable:
    """Per-site metadata, each field of shape ``(n_sites,)``.

    ``array``: Utah array index (0, 1, …); ``electrode``: Blackrock electrode id (≥ 1);
    ``unit``: Blackrock unit class, or ``-1`` for all units merged; ``label``: free text.
    """

    array: np.ndarray
    electrode: np.ndarray
    unit: np.ndarray
    label: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.label)
        object.__setattr__(self, "array", check_integer_array("sites.array", self.array, shape=(n,), minimum=0))
        electrode = check_integer_array("sites.electrode", self.electrode, shape=(n,), minimum=1, maximum=65535)
        object.__setattr__(self, "electrode", electrode)
        unit = check_integer_array("sites.unit", self.unit, shape=(n,), minimum=ALL_UNITS, maximum=NOISE_UNIT)
        object.__setattr__(self, "unit", unit)
        object.__setattr__(self, "label", tuple(str(text) for text in self.label))
        pairs = list(zip(electrode.tolist(), unit.tolist()))
        repeated = sorted({pair for pair in pairs if pairs.count(pair) > 1})
        if repeated:
            raise ValueError(
                f"'sites': (electrode, unit) pairs {repeated} appear more than once; each site must name a "
                "different electrode or unit."
            )

    @property
    def n_sites(self) -> int:
        return len(self.label)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SiteTable):
            return NotImplemented
        return (
            self.label == other.label
            and np.array_equal(self.array, other.array)
            and np.array_equal(self.electrode, other.electrode)
            and np.array_equal(self.unit, other.unit)
        )

    def compute_membership(self, electrodes: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Which sites hold spikes with these ``(electrode, unit)`` keys: bool ``(n_keys, n_sites)``."""
        electrodes = np.asarray(electrodes, dtype=np.int64)[:, None]
        units = np.asarray(units, dtype=np.int64)[:, None]
        merged = (self.unit[None, :] == ALL_UNITS) & (units != NOISE_UNIT)
        return (electrodes == self.electrode[None, :]) & (merged | (units == self.unit[None, :]))

    def to_dict(self) -> dict:
        """The table as plain lists (for JSON)."""
        return {
            "array": self.array.tolist(),
            "electrode": self.electrode.tolist(),
            "unit": self.unit.tolist(),
            "label": list(self.label),
        }


def make_default_sites(electrodes) -> SiteTable:
    """One site per electrode, all units merged; array = (electrode − 1) // 96.

    ``electrodes``: Blackrock electrode ids (≥ 1), shape ``(n_sites,)``; an integer ``n`` means
    electrodes ``1..n``.
    """
    if isinstance(electrodes, (int, np.integer)) and not isinstance(electrodes, bool):
        electrodes = np.arange(1, int(electrodes) + 1)
    electrodes = check_integer_array("electrodes", list(electrodes), shape=(None,), minimum=1, maximum=65535)
    return SiteTable(
        array=(electrodes - 1) // ELECTRODES_PER_ARRAY,
        electrode=electrodes,
        unit=np.full(electrodes.shape, ALL_UNITS),
        label=tuple(f"e{e}" for e in electrodes.tolist()),
    )


def read_site_map(csv_path: str | Path) -> SiteTable:
    """Read a site map CSV (columns ``site,array,electrode,unit,label``) into a :class:`SiteTable`."""
    path = check_file("site_map", csv_path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = tuple(name.strip() for name in reader.fieldnames or ())
        if columns != SITE_MAP_COLUMNS:
            raise ValueError(
                f"site map {str(path)!r}: the header must be {','.join(SITE_MAP_COLUMNS)}, but got "
                f"{','.join(columns) or '(empty file)'}; fix the first line of the file."
            )
        rows = [{key.strip(): (value or "").strip() for key, value in row.items()} for row in reader]
    if not rows:
        raise ValueError(f"site map {str(path)!r} has no rows; give one row per site.")
    try:
        numbers = {key: [int(row[key]) for row in rows] for key in SITE_MAP_COLUMNS[:4]}
    except ValueError as error:
        raise ValueError(f"site map {str(path)!r}: site, array, electrode and unit must be integers ({error}).") from None
    if numbers["site"] != list(range(len(rows))):
        raise ValueError(
            f"site map {str(path)!r}: the 'site' column must run 0, 1, …, {len(rows) - 1} in order, "
            f"but got {numbers['site'][:10]}."
        )
    try:
        return SiteTable(
            array=np.array(numbers["array"]),
            electrode=np.array(numbers["electrode"]),
            unit=np.array(numbers["unit"]),
            label=tuple(row["label"] for row in rows),
        )
    except ValueError as error:
        raise ValueError(f"site map {str(path)!r}: {error}") from None
