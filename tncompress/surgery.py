"""Module surgery: find decomposable layers, swap modules by qualified name, re-apply a saved
structure to a fresh model.

What counts as a layer: ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2's projections: a Linear
that stores its weight transposed) as "Linear", ``nn.Conv2d``, and ``nn.Embedding``.
``nn.MultiheadAttention`` reads its projection weights directly, so the pipeline first swaps it for
the equivalent :class:`~tncompress.layers.attention.DecomposableMultiheadAttention`, whose
``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` are ordinary Linears (:func:`unpacked`), and
puts the original back where nothing was decomposed (:func:`repack_attention`). Layer kinds no
method handles (1-D / 3-D and transposed convs, RNNs, ``EmbeddingBag``) are listed with the reason
(:func:`other_layers`), and so are layers whose weight is shared with another module (tied).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from tncompress.layers import LAYER_CLASSES, FactorizedLayer
from tncompress.layers.attention import DecomposableMultiheadAttention, unpack_attention

DECOMPOSABLE_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
STRUCTURE_KEY_ATTENTION = "attention"  # the checkpoint structure entry of an unpacked nn.MultiheadAttention


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``transformers``' ``Conv1D``: ``y = x·W + b`` with W stored (in, out) — a Linear."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def type_name(module: nn.Module) -> str | None:
    """The recipe type name ("Linear", "Conv2d", "Embedding") of a decomposable module, else None."""
    if is_hf_conv1d(module):
        return "Linear"
    for name, cls in DECOMPOSABLE_TYPES.items():
        if isinstance(module, cls):
            return name
    return None


def dense_view(module: nn.Module) -> nn.Module:
    """The module as the methods see it: a Hugging Face ``Conv1D`` becomes an ``nn.Linear`` sharing
    its storage (weight transposed, no copy); every other module is returned as it is."""
    if not is_hf_conv1d(module):
        return module
    weight = cast(torch.Tensor, module.weight).detach()
    bias = getattr(module, "bias", None)
    with torch.device("meta"):
        linear = nn.Linear(int(weight.shape[0]), int(weight.shape[1]), bias=bias is not None)
    linear.weight = nn.Parameter(weight.t(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    linear.train(module.training)
    return linear


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def _sharing(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Every qualified name of each module and of each parameter (by object id): more than one name
    means the module is registered twice or the parameter is tied."""
    module_names: dict[int, list[str]] = defaultdict(list)
    param_names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        module_names[id(module)].append(name)
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            param_names[id(param)].append(f"{name}.{pname}" if name else pname)
    return module_names, param_names


def shared_reason(name: str, module: nn.Module, module_names: dict[int, list[str]],
                  param_names: dict[int, list[str]]) -> str | None:
    """Why a layer must stay dense because it is shared, or None: the same module registered under
    another name, or a parameter tied to another module's (GPT-2's ``lm_head`` and ``wte``).
    Replacing one user would untie them and grow the model."""
    others = [n for n in module_names.get(id(module), []) if n != name]
    if others:
        return f"the same module is also registered as {others[0]}; replacing one name would untie them; left dense"
    for pname, param in module.named_parameters(recurse=False):
        tied = [n for n in param_names.get(id(param), []) if not n.startswith(name + ".")]
        if tied:
            return (f"{pname} is tied to {tied[0]} (one shared tensor); decomposing one user would untie them and "
                    f"add {param.numel():,} parameters; left dense")
    return None


def candidate_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """Yield (qualified name, module, reason it cannot be touched or None) for every decomposable
    layer (see :func:`type_name`) that is not already part of a factorized layer."""
    inside_factorized: list[str] = []
    inside_attention: list[str] = []
    module_names, param_names = _sharing(model)
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer):
            inside_factorized.append(name + ".")
            continue
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.append(name + ".")
        if type_name(module) is None or _inside(name, inside_factorized):
            continue
        reason = None
        if _inside(name, inside_attention):
            reason = ("a projection of nn.MultiheadAttention, which reads its weight directly; plan through "
                      "tncompress (it swaps in an equivalent attention module); left dense")
        else:
            reason = shared_reason(name, module, module_names, param_names)
        yield name, module, reason


_OTHER_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv1d, "1-D convolutions have no tncompress method yet"),
    (nn.Conv3d, "3-D convolutions have no tncompress method yet"),
    (nn.modules.conv._ConvTransposeNd, "transposed convolutions have no tncompress method yet"),
    (nn.RNNBase, "recurrent layers (RNN/LSTM/GRU) have no tncompress method yet: their gate weights are read "
                 "by a fused kernel"),
    (nn.EmbeddingBag, "EmbeddingBag has no tncompress method yet"),
    (nn.Bilinear, "bilinear layers have no tncompress method yet"),
    (nn.MultiheadAttention, "nn.MultiheadAttention reads its weights directly; tncompress plans its projections "
                            "after swapping in an equivalent module"),
)


def other_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, str]]:
    """Yield (qualified name, module, type name, reason) for parameterised layers no method
    decomposes (RNNs, 1-D/3-D/transposed convs, …), so a plan lists them instead of skipping them
    silently. Layers inside factorized layers are not listed."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer):
            inside.append(name + ".")
            continue
        if _inside(name, inside) or type_name(module) is not None:
            continue
        for cls, reason in _OTHER_KINDS:
            if isinstance(module, cls) and any(True for _ in module.parameters(recurse=False)):
                yield name, module, type(module).__name__, reason + "; left dense"
                break


def unpacked(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no ``nn.MultiheadAttention``, else a deep copy whose attention
    modules are the equivalent :class:`DecomposableMultiheadAttention` (the plan can then name and
    decompose their projections)."""
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    unpack_attention(model)
    return model


def repack_attention(model: nn.Module) -> list[str]:
    """Turn every :class:`DecomposableMultiheadAttention` whose four projections are still dense
    ``nn.Linear`` back into ``nn.MultiheadAttention`` (fused fast path, the original state-dict
    keys); returns the names repacked."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, DecomposableMultiheadAttention) and all(
                type(getattr(module, p)) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
                for p in ("q_proj", "k_proj", "v_proj", "out_proj")) and not _fast_path_would_read(model, name):
            set_module(model, name, module.to_mha())
            names.append(name)
    return names


def _fast_path_would_read(model: nn.Module, name: str) -> bool:
    """Whether the attention at ``name`` sits in an ``nn.TransformerEncoderLayer`` /
    ``TransformerDecoderLayer`` whose other layers were factorized: with an ``nn.MultiheadAttention``
    back in place, that layer's fast-path check reads ``linear1.weight`` and fails; the equivalent
    module declines the fast path before that check."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return (isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
            and any(isinstance(child, FactorizedLayer) for child in parent.children()))


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
        if entry["method"] == STRUCTURE_KEY_ATTENTION:
            if not isinstance(old, nn.MultiheadAttention):
                raise ValueError(f"{entry['name']} is a {type(old).__name__}, not the nn.MultiheadAttention the "
                                 "checkpoint's structure decomposed")
            new_attn = DecomposableMultiheadAttention(**dict(entry["config"]))
            ref_attn = next(old.parameters(), None)
            if ref_attn is not None:
                new_attn = new_attn.to(device=ref_attn.device, dtype=ref_attn.dtype)
            new_attn.train(old.training)
            set_module(model, entry["name"], new_attn)
            continue
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
        if isinstance(module, DecomposableMultiheadAttention) and not _inside(name, inside):
            out.append({"name": name, "method": STRUCTURE_KEY_ATTENTION, "config": module.config()})
            continue
        if isinstance(module, FactorizedLayer) and not _inside(name, inside):
            out.append({"name": name, "method": type(module).method, "config": module.config()})
            inside.append(name + ".")
    return out
