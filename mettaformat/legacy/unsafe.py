"""Which globals named in a legacy pickle would run code if the file were loaded with ``torch.load``.

The importer never calls a global; this is what ``validate`` reports about a file. A global the
importer interprets as data (:func:`mettaformat.legacy.allowlist.interprets`: containers,
``__builtin__.long``, tensor rebuilds, storages, dtypes...) is never unsafe, so the importer and
``validate`` agree by construction. Other names are unsafe when their module or name is one that
picklescan-style scanners treat as code execution.
"""

from __future__ import annotations

from typing import Final

from mettaformat.legacy.allowlist import interprets

__all__ = ["is_unsafe_global", "unsafe_class_paths"]

#: Top-level modules whose callables run commands, load code or open files or sockets.
_UNSAFE_MODULES: Final = frozenset(
    {
        "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "socket", "shutil", "importlib",
        "runpy", "pty", "commands", "webbrowser", "ctypes", "code", "codeop", "pickle", "_pickle", "marshal",
        "types", "multiprocessing", "asyncio", "requests", "urllib", "http", "ftplib", "telnetlib", "pdb", "bdb",
        "timeit",
    }
)  # fmt: skip
#: Callable names that run or load code whatever module they come from.
_UNSAFE_NAMES: Final = frozenset(
    {
        "eval", "exec", "system", "popen", "__import__", "compile", "open", "getattr", "setattr", "apply",
        "breakpoint", "execfile", "input", "load", "loads", "_load_from_bytes", "load_config",
    }
)  # fmt: skip


def is_unsafe_global(module: str, name: str) -> bool:
    """True if ``module.name`` from a pickle names a code-running callable the importer does not interpret."""
    if interprets(module, name):
        return False
    return module.split(".")[0] in _UNSAFE_MODULES or name in _UNSAFE_NAMES


def unsafe_class_paths(class_paths: list[str]) -> list[str]:
    """The ``module.name`` paths (as in a checkpoint's provenance) that :func:`is_unsafe_global` flags, sorted."""
    found = set()
    for path in class_paths:
        module, _, name = path.rpartition(".")
        if is_unsafe_global(module, name):
            found.add(path)
    return sorted(found)
