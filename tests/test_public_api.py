"""Each package's public surface: every listed name resolves to the object its module defines."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ("closedloop", "models", "rigs", "analysis")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} lists no public names"
    for name in module.__all__:
        value = getattr(module, name)
        home = importlib.import_module(module._EXPORTS[name])
        assert value is getattr(home, name)
        assert name in getattr(home, "__all__", ()), f"{name} is not in {home.__name__}.__all__"
    assert set(module.__all__) <= set(dir(module))


@pytest.mark.parametrize("package", PACKAGES)
def test_unknown_name_is_an_attribute_error(package):
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        importlib.import_module(package).no_such_name  # noqa: B018
