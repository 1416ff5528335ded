"""Shared input checks for the public boundary (CLI, config, public functions, files).

Every check raises ``ValueError`` or ``TypeError`` with a message that names the parameter,
the value received, what is allowed, and where useful the fix, e.g.::

    Invalid value for 'kind': allowed values are 'attack', 'gaussian', but got 'atack'.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "check_option",
    "check_number",
    "check_integer",
    "check_file",
    "check_dir",
    "check_image_batch",
    "check_indices",
    "check_uint8_images",
    "check_budgets",
    "check_device",
    "check_array",
    "check_integer_array",
]


def check_option(name: str, value, allowed: Iterable) -> object:
    """Return ``value`` if it is one of ``allowed``; raise ``ValueError`` naming both otherwise."""
    allowed = list(allowed)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"Invalid value for '{name}': allowed values are {shown}, but got {value!r}.")
    return value


def check_number(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    inclusive: bool = True,
) -> float:
    """Return ``value`` as float if it is a finite real number inside the given bounds.

    ``inclusive`` applies to both bounds. Booleans are refused (``True`` is not a budget).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"'{name}' must be a real number, but got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"'{name}' must be finite, but got {value!r}.")
    low_ok = minimum is None or (value >= minimum if inclusive else value > minimum)
    high_ok = maximum is None or (value <= maximum if inclusive else value < maximum)
    if not (low_ok and high_ok):
        lo = "-inf" if minimum is None else f"{minimum:g}"
        hi = "inf" if maximum is None else f"{maximum:g}"
        brackets = "[]" if inclusive else "()"
        raise ValueError(
            f"'{name}' must lie in {brackets[0]}{lo}, {hi}{brackets[1]}, but got {value:g}."
        )
    return value


def check_integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as int if it is an integer inside ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"'{name}' must be an integer, but got {value!r} of type {type(value).__name__}.")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else str(minimum)
        hi = "inf" if maximum is None else str(maximum)
        raise ValueError(f"'{name}' must lie in [{lo}, {hi}], but got {value}.")
    return value


def check_file(name: str, path) -> Path:
    """Return ``path`` as a ``Path`` if it names an existing regular file."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"'{name}': the file {str(path)!r} {what}; give the path of an existing file.")
    return path


def check_dir(name: str, path) -> Path:
    """Return ``path`` as a ``Path`` if it names an existing directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"'{name}': the directory {str(path)!r} {what}; give the path of an existing directory.")
    return path


def check_image_batch(name: str, images, *, size: int | None = None):
    """Check a batch of images in [0, 1] with shape (n_images, 3, H, W); return it unchanged.

    Works for numpy arrays and torch tensors. ``size`` fixes H = W when given.
    Refuses NaN/inf values and values outside [0, 1].
    """
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1] != 3 or (size is not None and shape[2:] != (size, size)):
        want = f"(n_images, 3, {size}, {size})" if size else "(n_images, 3, H, W)"
        raise ValueError(f"'{name}' must have shape {want}, but got {shape}.")
    values = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if not np.isfinite(values).all():
        raise ValueError(f"'{name}' contains NaN or infinite values; images must be finite and in [0, 1].")
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low < 0.0 or high > 1.0:
        raise ValueError(f"'{name}' must have values in [0, 1], but got values in [{low:g}, {high:g}].")
    return images


def check_indices(name: str, indices, n: int) -> np.ndarray:
    """Return ``indices`` as an int64 array if every entry lies in ``[0, n)``."""
    indices = np.asarray(indices)
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"'{name}' must hold integers, but got dtype {indices.dtype}.")
    indices = indices.astype(np.int64)
    bad = indices[(indices < 0) | (indices >= n)]
    if bad.size:
        raise ValueError(f"'{name}' must lie in [0, {n - 1}], but got {bad[:5].tolist()}.")
    return indices


def check_uint8_images(name: str, images, *, size: int | None = None) -> np.ndarray:
    """Return ``images`` if it is a uint8 numpy batch (n_images, H, W, 3), channels last.

    ``size`` fixes H = W when given.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        kind = f"dtype {images.dtype}" if hasattr(images, "dtype") else f"type {type(images).__name__}"
        raise TypeError(
            f"'{name}' must be a uint8 numpy array (8-bit images), but got {kind}; "
            "convert float images in [0, 1] with closedloop.images.quantize."
        )
    shape = images.shape
    if len(shape) != 4 or shape[3] != 3 or (size is not None and shape[1:3] != (size, size)):
        want = f"(n_images, {size}, {size}, 3)" if size else "(n_images, H, W, 3)"
        raise ValueError(f"'{name}' must have shape {want} (channels last), but got {shape}.")
    return images


def check_budgets(name: str, eps, n: int) -> np.ndarray:
    """Return per-image L2 budgets as float64 (n,): a scalar is repeated, an array must have n entries.

    Every budget must be finite and > 0 (eps in [0, 1] pixel units).
    """
    values = np.asarray(eps)
    if values.dtype == bool or not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise TypeError(f"'{name}' must hold real numbers (L2 budgets), but got dtype {values.dtype}.")
    values = values.astype(np.float64)
    if values.ndim == 0:
        values = np.full(n, float(values))
    if values.shape != (n,):
        raise ValueError(f"'{name}' must be a number or have shape ({n},), one budget per image, but got shape {values.shape}.")
    bad = values[~(np.isfinite(values) & (values > 0))]
    if bad.size:
        raise ValueError(f"'{name}' must be finite and > 0 (L2 norm in [0, 1] pixel units), but got {bad[:5].tolist()}.")
    return values


def check_device(name: str, device):
    """Return ``device`` as a ``torch.device`` if it is "cpu" or an available "cuda" device."""
    import torch  # inside: every module checks its input with this one, and the CLI must start without torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Invalid value for '{name}': allowed values are 'cpu', 'cuda', but got {device!r}.") from None
    check_option(name, resolved.type, ["cpu", "cuda"])
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"'{name}' = {device!r} but no CUDA device is available; use 'cpu'.")
    return resolved


def check_array(name: str, values, *, shape: tuple, dtype=None) -> np.ndarray:
    """Return ``values`` as a numpy array of ``shape`` (``None`` entries match any length).

    ``dtype`` (optional) is the exact dtype required; a mismatch is a ``TypeError``.
    """
    values = np.asarray(values)
    if values.ndim != len(shape) or any(want is not None and got != want for got, want in zip(values.shape, shape)):
        want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"'{name}' must have shape {want}, but got {values.shape}.")
    if dtype is not None and values.dtype != np.dtype(dtype):
        raise TypeError(
            f"'{name}' must have dtype {np.dtype(dtype)}, but got {values.dtype}; convert it with .astype(np.{np.dtype(dtype)})."
        )
    return values


def check_integer_array(
    name: str, values, *, shape: tuple, minimum: int | None = None, maximum: int | None = None
) -> np.ndarray:
    """Return ``values`` as an int64 array of ``shape`` whose entries lie in ``[minimum, maximum]``.

    Integer dtypes only: floats and booleans are refused (``1.5`` is not a code).
    """
    values = check_array(name, values, shape=shape)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"'{name}' must hold integers, but got dtype {values.dtype}.")
    values = values.astype(np.int64)
    low = values < minimum if minimum is not None else np.zeros(values.shape, bool)
    high = values > maximum if maximum is not None else np.zeros(values.shape, bool)
    bad = values[low | high]
    if bad.size:
        lo = "-inf" if minimum is None else str(minimum)
        hi = "inf" if maximum is None else str(maximum)
        raise ValueError(f"'{name}' must lie in [{lo}, {hi}], but got {bad[:5].tolist()}.")
    return values
