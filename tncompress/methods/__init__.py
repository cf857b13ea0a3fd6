"""The registry of decomposition methods: one module per method in this package.

Every module here (other than ``base``) defines a :class:`~tncompress.methods.base.Method` and
calls :func:`register` at import; the registry imports them all on first use, so adding a method is
adding one module — the recipe, the planner, the budget, the apply step and checkpoint loading all
ask the registry. Methods from other packages register through the ``tncompress.methods`` entry
point group (each entry point is a module to import).

Importing this package is cheap: method modules import tensorly only inside ``factorize``.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib import metadata

from tncompress.methods.base import Method

__all__ = ["Method", "register", "get_method", "all_methods", "methods_for", "resolve_name", "method_for_layer"]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}
_loaded = False

ENTRY_POINT_GROUP = "tncompress.methods"


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name and aliases must be new)."""
    if not method.name or not method.types:
        raise ValueError(f"{type(method).__name__}: a method needs a name and the layer types it applies to")
    for key in (method.name, *method.aliases):
        if key in _REGISTRY or key in _ALIASES or key == "none":
            raise ValueError(f"method name {key!r} is already registered")
    _REGISTRY[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(entry.value)
        except Exception as exc:  # a broken plug-in must not break the tool
            log.warning("method plug-in %s (%s) failed to load: %s", entry.name, entry.value, exc)


def all_methods() -> dict[str, Method]:
    """Every registered method by name, in listing order (``Method.order``, then name)."""
    _load()
    return {m.name: m for m in sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))}


def resolve_name(name: str) -> str:
    """The canonical name of a method or alias (unknown names are returned unchanged)."""
    _load()
    return _ALIASES.get(name, name)


def get_method(name: str) -> Method:
    """The registered method ``name`` (or alias); :class:`KeyError` if there is none."""
    _load()
    return _REGISTRY[_ALIASES.get(name, name)]


def methods_for(type_name: str) -> list[str]:
    """Names of the methods that apply to a recipe layer type ("Linear", "Conv2d")."""
    return [name for name, m in all_methods().items() if type_name in m.types]


def method_for_layer(layer_key: str) -> Method:
    """The method that builds layers whose class attribute ``method`` is ``layer_key`` (what a plan
    and a checkpoint record: ``prodsum_conv`` for a product-of-sums conv); :class:`KeyError` if none."""
    for m in all_methods().values():
        if any(cls.method == layer_key for cls in m.layer_classes()):
            return m
    raise KeyError(layer_key)
