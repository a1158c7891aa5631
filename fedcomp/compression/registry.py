"""Name -> compressor class registry."""

from __future__ import annotations

from typing import Any, Callable

from fedcomp.compression.base import Compressor

_REGISTRY: dict[str, type[Compressor]] = {}


def register(name: str) -> Callable[[type[Compressor]], type[Compressor]]:
    def deco(cls: type[Compressor]) -> type[Compressor]:
        if name in _REGISTRY:
            raise ValueError(f"compressor {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def build(name: str, **params: Any) -> Compressor:
    _load_builtins()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; known: {sorted(_REGISTRY)}") from None
    return cls(**params)


def _load_builtins() -> None:
    # Imported for their @register side effect; lazily, so registry has no import cycle.
    from fedcomp.compression import cast  # noqa: F401
