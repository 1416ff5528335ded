"""Choosing the torch device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``."""

from __future__ import annotations

import torch

from closedloop.core.validation import check_option

__all__ = ["DEVICES", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``device``: ``"auto"`` → CUDA if available, else CPU.

    A ``torch.device`` is returned unchanged. ``"cuda"`` on a machine without CUDA is refused.
    """
    if isinstance(device, torch.device):
        return device
    check_option("device", device, DEVICES)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("'device' = 'cuda' but CUDA is not available on this machine; use 'auto' or 'cpu'.")
    return torch.device(device)
