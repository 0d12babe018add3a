"""PEP 562 lazy attributes: a package names what it exports without importing torch up front."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, sources: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``sources[name]`` on first access and caches the value.

    Args:
        package: the package's name, for the error message.
        sources: public name -> the module that defines it.
        namespace: the package's ``globals()``; later lookups find the value there directly.
    """

    def __getattr__(name: str) -> Any:
        module = sources.get(name)
        if module is None:
            # A submodule (``mettaformat.convert``) is reachable as an attribute, as it was when the
            # package imported everything eagerly; importing it also binds it on the package.
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
