"""Every docstring example of the package runs and prints what it says (the public API's examples are runnable)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import fxpeft.passes
import pytest

import fxpeft

# fxpeft.passes ships from passes/ (setuptools package-dir), so it is walked on its own.
MODULES = sorted(({m.name for m in pkgutil.walk_packages(fxpeft.__path__, "fxpeft.")}
                  | {m.name for m in pkgutil.walk_packages(fxpeft.passes.__path__, "fxpeft.passes.")}
                  | {"fxpeft", "fxpeft.passes"}) - {"fxpeft.demo", "fxpeft.__main__"})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
