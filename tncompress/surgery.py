"""Module surgery: find decomposable layers, swap modules by qualified name, re-apply a saved
structure to a fresh model."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from tncompress.layers import LAYER_CLASSES, FactorizedLayer

DECOMPOSABLE_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


def type_name(module: nn.Module) -> str | None:
    """The recipe type name ("Linear", "Conv2d") of a decomposable module, else None."""
    for name, cls in DECOMPOSABLE_TYPES.items():
        if isinstance(module, cls):
            return name
    return None


def candidate_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """Yield (qualified name, module, reason it cannot be touched or None) for every Linear/Conv2d
    that is not already part of a factorized layer."""
    inside_factorized: list[str] = []
    inside_attention: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer):
            inside_factorized.append(name + ".")
            continue
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.append(name + ".")
        if type_name(module) is None or any(name.startswith(p) for p in inside_factorized):
            continue
        reason = None
        if any(name.startswith(p) for p in inside_attention):
            reason = "used directly by nn.MultiheadAttention (its weight is read, not called); left dense"
        yield name, module, reason


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted qualified name."""
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``name`` with ``new``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old


def layer_class(key: str) -> type[FactorizedLayer]:
    """The layer class whose ``method`` key is ``key``: the built-in layers first, then the layer
    classes of every registered method (so a checkpoint of a plug-in method reloads).
    :class:`ValueError` if no class has that key."""
    cls = LAYER_CLASSES.get(key)
    if cls is not None:
        return cls
    from tncompress.methods import all_methods  # the registry imports its plug-ins on first use

    known = dict(LAYER_CLASSES)
    for method in all_methods().values():
        for candidate in method.layer_classes():
            known.setdefault(candidate.method, candidate)
    if key in known:
        return known[key]
    raise ValueError(f"unknown layer method {key!r}; known: {', '.join(sorted(known))}")


def apply_structure(model: nn.Module, layers: Iterable[dict[str, Any]]) -> nn.Module:
    """Swap in factorized layers of the recorded structure (``name``, ``method``, ``config``),
    matching the original layer's dtype and device; weights come from a state dict afterwards."""
    for entry in layers:
        old = get_module(model, entry["name"])
        new: nn.Module = layer_class(entry["method"])(**dict(entry["config"]))
        ref = next(old.parameters(), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        new.train(old.training)
        set_module(model, entry["name"], new)
    return model


def factorized_structure(model: nn.Module) -> list[dict[str, Any]]:
    """Name, method key and config of every factorized layer in ``model``, outermost first: what a
    checkpoint needs to rebuild the model's structure on a fresh base model. Derived from the model
    itself, so layers decomposed in an earlier run (a reloaded checkpoint) are never forgotten."""
    out = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer) and not any(name.startswith(p) for p in inside):
            out.append({"name": name, "method": type(module).method, "config": module.config()})
            inside.append(name + ".")
    return out
