"""One codec registry for readers and writers: built-ins, registered classes, and entry points.

A third-party package makes its codec available by registering it (``register_codec``) or by
declaring an entry point in the ``mettaformat.codecs`` group whose object is the codec class;
entry points are loaded the first time their name is needed, so installing a package is enough
for files that use its codec to open.
"""

from __future__ import annotations

import threading
import warnings
from importlib import metadata
from typing import Any, Final

from mettaformat.container.codecs.base import Codec
from mettaformat.errors import UnknownCodecError, WriteError

__all__ = ["ENTRY_POINT_GROUP", "available_codecs", "codec_class", "get_codec", "register_codec", "resolve_codec",
           "unregister_codec"]

ENTRY_POINT_GROUP: Final = "mettaformat.codecs"
_REQUIRED: Final = ("configuration", "from_configuration", "frame_table_size", "write", "open_section")
_lock = threading.RLock()
_registry: dict[str, type[Any]] = {}
_builtin: set[str] = set()


def _check_class(cls: type[Any], name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isascii() or not name.isprintable():
        raise ValueError(f"codec name {name!r} must be 1 to 64 printable ASCII characters")
    if getattr(cls, "name", None) != name:
        raise ValueError(f"codec class {cls!r} declares name {getattr(cls, 'name', None)!r}, registered as {name!r}")
    missing = [attr for attr in _REQUIRED if not callable(getattr(cls, attr, None))]
    if missing or not isinstance(getattr(cls, "filters", None), tuple):
        raise TypeError(f"codec class {cls!r} lacks {', '.join(missing) or 'a filters tuple'}")


def register_codec(cls: type[Any], *, replace: bool = False) -> None:
    """Make the codec class ``cls`` available to readers and writers under ``cls.name``.

    Raises:
        ValueError: the name is taken (pass ``replace=True`` to replace a registered codec;
            built-in codecs are never replaced) or the name is invalid.
        TypeError: ``cls`` does not implement the codec interface.
    """
    name = getattr(cls, "name", None)
    _check_class(cls, name)  # type: ignore[arg-type]
    with _lock:
        if name in _builtin:
            raise ValueError(f"codec {name!r} is built in and cannot be replaced")
        if name in _registry and not replace and _registry[name] is not cls:
            raise ValueError(f"codec {name!r} is already registered ({_registry[name]!r}); pass replace=True")
        _registry[name] = cls  # type: ignore[index]


def unregister_codec(name: str) -> None:
    """Remove a registered (not built-in) codec; unknown names are ignored."""
    with _lock:
        if name in _builtin:
            raise ValueError(f"codec {name!r} is built in")
        _registry.pop(name, None)


def _register_builtin(cls: type[Any]) -> None:
    with _lock:
        _check_class(cls, cls.name)
        _registry[cls.name] = cls
        _builtin.add(cls.name)


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def available_codecs() -> tuple[str, ...]:
    """Names of every codec this process can read and write: built-in, registered, and installed entry points."""
    with _lock:
        names = set(_registry)
    names.update(ep.name for ep in _entry_points())
    return tuple(sorted(names))


def codec_class(name: str, *, region: str | None = None) -> type[Any]:
    """The codec class called ``name``, loading its entry point on first use.

    Raises:
        UnknownCodecError: no such codec, naming it and the codecs that are known; or its entry
            point failed to load (the cause is in the message).
    """
    with _lock:
        cls = _registry.get(name)
        if cls is not None:
            return cls
        for ep in _entry_points():
            if ep.name != name:
                continue
            try:
                loaded = ep.load()
                _check_class(loaded, name)
            except Exception as e:  # an installed package that cannot provide its codec
                raise UnknownCodecError(
                    f"codec {name!r}: its entry point {ep.value!r} failed to load ({type(e).__name__}: {e})",
                    region=region,
                ) from e
            _registry[name] = loaded
            result: type[Any] = loaded
            return result
        known = ", ".join(sorted(_registry))
    raise UnknownCodecError(
        f"unknown codec {name!r}; this reader knows {known} (a third-party codec is installed as a package "
        f"that provides the entry point group {ENTRY_POINT_GROUP!r}, or registered with register_codec)",
        region=region,
    )


def get_codec(name: str, *, region: str | None = None) -> Codec:
    """A reader-side instance of the codec called ``name`` (built with no arguments).

    Raises:
        UnknownCodecError: as for :func:`codec_class`.
    """
    codec: Codec = codec_class(name, region=region)()
    return codec


def resolve_codec(compression: str | Codec, level: int | str | None = None) -> Codec:
    """The codec a writer uses for ``compression=`` (a name or a codec object) and ``level=``.

    ``"none"`` is the deprecated spelling of ``"raw"``. ``level`` configures codecs that have
    levels (``None``: the codec's default); with a codec object, the object's own level applies.

    Raises:
        WriteError: an unknown name, or a configuration the codec rejects.
    """
    if not isinstance(compression, str):
        if not all(callable(getattr(compression, attr, None)) for attr in _REQUIRED):
            raise WriteError(f"compression {compression!r} is neither a codec name nor a codec object")
        return compression
    if compression == "none":
        warnings.warn('compression="none" is deprecated; use "raw" (the name written in the file)',
                      DeprecationWarning, stacklevel=4)
        compression = "raw"
    try:
        cls = codec_class(compression)
    except UnknownCodecError as e:
        raise WriteError(f"unknown compression {compression!r}; available: {', '.join(available_codecs())}") from e
    configuration = {} if level is None else {"level": level}
    try:
        codec: Codec = cls.from_configuration(configuration)
    except (TypeError, ValueError) as e:
        raise WriteError(f"compression {compression!r}: invalid configuration {configuration!r} ({e})") from e
    return codec
