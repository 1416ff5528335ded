"""Backbones (placeholder: registered names only; to be replaced by the models work)."""


def registered_backbones() -> tuple[str, ...]:
    return ("resnet50", "wide_resnet50_2", "resnet_tiny")
