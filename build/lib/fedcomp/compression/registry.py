"""Name -> compressor class registry, and the pipeline builder used by configs."""

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


def build(
    name: str, *, scope: str = "model", error_feedback: bool = False,
    sizes: list[int] | None = None, **params: Any,
) -> Compressor:
    """Build compressor ``name`` (registered, or a dotted class path) with ``params``;
    ``scope="layerwise"`` gives each layer (``sizes``) its own instance, ``error_feedback``
    wraps the result in an EF memory."""
    from fedcomp.compression.memory import ErrorFeedback
    from fedcomp.compression.scope import Layerwise

    _load_builtins()
    if name in _REGISTRY:
        cls = _REGISTRY[name]
    elif "." in name:  # a class of the user's, by its dotted path
        from hydra.utils import get_class

        cls = get_class(name)
    else:
        raise ValueError(f"unknown compressor {name!r}; known: {sorted(_REGISTRY)}, or a dotted class path "
                         "(or import your module with plugins: [...])")
    if scope == "model":
        compressor = cls(**params)
    elif scope == "layerwise":
        compressor = Layerwise(lambda: cls(**params), sizes or [])
    else:
        raise ValueError(f"scope must be 'model' or 'layerwise', got {scope!r}")
    return ErrorFeedback(compressor) if error_feedback else compressor


def _load_builtins() -> None:
    # Imported for their @register side effect; lazily, so the registry has no import cycle.
    from fedcomp.compression import adacomp, cast, cat, dgc, recipes  # noqa: F401
