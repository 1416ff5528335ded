"""The manifest of a behavioural stimulus set: what every saved image is (torch-free to read).

``manifest.json`` (written by :func:`closedloop.behavior.generate.write_behavior_stimuli`) holds
``category_names``, ``models`` and one record per image with the fields of
:data:`MANIFEST_FIELDS` plus every model's logits; ``manifest.csv`` the same as a table.
"""

from __future__ import annotations

from pathlib import Path

from closedloop.core.files import read_json
from closedloop.core.validation import check_file

__all__ = ["MANIFEST_NAME", "MANIFEST_FIELDS", "read_manifest"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FIELDS = (
    "item", "file", "start_image", "category", "guide", "mode", "targets", "target_image", "budget", "realised_eps",
)


def read_manifest(out: str | Path) -> dict:
    """The ``manifest.json`` of a finished stimulus set: ``category_names``, ``models``, ``records``."""
    return read_json(check_file("out", Path(out).expanduser() / MANIFEST_NAME))
