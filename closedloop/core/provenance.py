"""Provenance of every artifact: versions, git commit, seeds and input hashes."""

from __future__ import annotations

import hashlib
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = [
    "derive_seed",
    "compute_provenance",
    "PACKAGES",
]

PACKAGES = ("closedloop", "torch", "torchvision", "numpy", "scipy", "zarr", "h5py", "neo", "pyzmq", "safetensors")


def _text_entropy(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def derive_seed(master: int, *keys: int | str) -> int:
    """A 32-bit seed derived from the experiment's master seed and any keys (day, stage name…).

    Deterministic, and independent streams for different keys (numpy ``SeedSequence``).
    """
    entropy = [int(master)] + [k if isinstance(k, int) else _text_entropy(k) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])



def _git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        module = sys.modules.get(package)
        return getattr(module, "__version__", None)


def compute_provenance(*, seeds: dict | None = None, inputs: dict | None = None) -> dict:
    """Where and with what an artifact was made.

    ``seeds``: name → seed used; ``inputs``: name → digest (or any JSON value) of each input.
    Returns a JSON-able dict with time (UTC, ISO 8601), host, Python and package versions, the
    git commit of the code (and whether the checkout had uncommitted changes), seeds and inputs.
    """
    return {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git": _git_commit(),
        "seeds": dict(seeds or {}),
        "inputs": dict(inputs or {}),
    }
