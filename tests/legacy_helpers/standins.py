"""Stand-in modules for loading legacy Metta pickles with ``torch.load`` where Metta is not installed.

Only for tests and benchmarks that compare with torch's own loader (which imports what a pickle
names). mettaformat's importer never needs this: it imports nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

import torch.nn as nn

#: Top-level packages the stand-in finder serves.
PACKAGES = ("metta", "gymnasium", "omegaconf", "tensordict")


class StandIn(types.ModuleType):
    """A module whose every attribute is a class made on first use (modules for Metta components)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        cls: Any
        if name == "PolicyMetadata":
            cls = type(name, (dict,), {"__module__": self.__name__})
        elif name == "Any":
            cls = object
        elif self.__name__.startswith(("metta.agent", "tensordict.nn")) and name[0].isupper():
            cls = type(name, (nn.Module,), {"__module__": self.__name__})
        else:
            cls = type(name, (), {"__module__": self.__name__})
        setattr(self, name, cls)
        return cls


class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in PACKAGES:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return StandIn(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


def install() -> None:
    """Serve stand-ins for the legacy packages from now on (in this process)."""
    if not any(isinstance(f, Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, Finder())
