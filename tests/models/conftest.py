"""Shared builders for the models tests: seeded synthetic images and a log catcher."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from closedloop.core.logs import logger


def _make_images(n_images: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n_images, size, size, 3): smooth random patterns with random mean and contrast."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n_images, 3, 8, 8), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.from_numpy(rng.uniform(0.2, 0.8, (n_images, 3, 1, 1)).astype(np.float32))
    contrast = torch.from_numpy(rng.uniform(0.1, 1.0, (n_images, 1, 1, 1)).astype(np.float32))
    images = (mean + contrast * (fine - 0.5)).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@pytest.fixture
def make_images():
    """The builder of seeded synthetic uint8 images, (n_images, size, size, 3)."""
    return _make_images


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def log_messages():
    """Messages logged to the package logger during the test (independent of propagation)."""
    handler = _ListHandler()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)
