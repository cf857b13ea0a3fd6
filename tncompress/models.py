"""Architecture registry: turn an architecture spec into a fresh ``nn.Module``.

A spec is one of

* ``torchvision:<name>`` — a torchvision classification model, built without pretrained weights,
  with keyword arguments such as ``num_classes=10`` (and ``cifar_stem=true`` for ResNets on 32×32
  inputs: 3×3 stride-1 first conv, no max-pool);
* ``<package.module>:<factory>`` — a callable in the user's code (``--import path/to/file.py``
  makes a file importable first);
* a built-in reference net: ``mlp-1024`` (the 1024-1024-10 MNIST MLP of the TT paper) or ``lenet5``.

The spec (a plain dict) is stored in compressed checkpoints so the base model can be rebuilt; its
``imports`` are recorded as absolute paths with their SHA-256 (see :class:`ModelSpec`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tncompress.errors import ModelSpecError

log = logging.getLogger(__name__)


class MLP1024(nn.Sequential):
    """The TT paper's MNIST net: 32×32 input → 1024 → ReLU → 1024 → ReLU → 10 (Novikov et al. 2015)."""

    def __init__(self, num_classes: int = 10, in_features: int = 1024, hidden: int = 1024) -> None:
        super().__init__(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(in_features, hidden)),
            ("relu1", nn.ReLU(inplace=True)),
            ("fc2", nn.Linear(hidden, hidden)),
            ("relu2", nn.ReLU(inplace=True)),
            ("fc3", nn.Linear(hidden, num_classes)),
        ]))


class LeNet5(nn.Module):
    """LeNet-5 for 1×32×32 (or 3×32×32) inputs, with ReLU and max pooling."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class BuiltinModel:
    """A reference net shipped with tncompress and the input shape it expects."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "mlp-1024": BuiltinModel(MLP1024, (1, 1, 32, 32), "1024-1024-10 MLP of the TT paper (MNIST at 32×32)"),
    "lenet5": BuiltinModel(LeNet5, (1, 1, 32, 32), "LeNet-5 (MNIST at 32×32)"),
}


@dataclass
class ModelSpec:
    """How to rebuild a base model: architecture, keyword arguments, files to import, input shape.

    ``imports`` holds the files to import before building. A spec made fresh (``import_sha256`` not
    given) normalises them so that it can be recorded and rebuilt from anywhere: each path that names
    an existing file becomes absolute (symlinks resolved) and its SHA-256 goes into
    ``import_sha256`` (parallel to ``imports``; ``None`` for a path not found). A spec read back from a
    checkpoint (:meth:`from_dict`) keeps the recorded paths and hashes as they are.
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    input_shape: list[int] | None = None
    import_sha256: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.imports = [str(p) for p in self.imports]
        if len(self.import_sha256) != len(self.imports):  # a fresh spec: describe the files on disk now
            self.imports, self.import_sha256 = normalise_imports(self.imports)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data for a checkpoint: ``imports`` stays a list of path strings (what
        older tncompress versions read) and ``import_sha256`` is the parallel list of file hashes."""
        return {"arch": self.arch, "kwargs": dict(self.kwargs), "imports": list(self.imports),
                "import_sha256": list(self.import_sha256),
                "input_shape": list(self.input_shape) if self.input_shape else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Read a recorded spec; one from an older checkpoint (no ``import_sha256``) gets ``None`` hashes."""
        imports = [str(p) for p in data.get("imports") or []]
        recorded = list(data.get("import_sha256") or [])
        hashes: list[str | None] = [str(h) if h else None for h in recorded[:len(imports)]]
        hashes += [None] * (len(imports) - len(hashes))
        return cls(arch=data["arch"], kwargs=dict(data.get("kwargs") or {}), imports=imports,
                   input_shape=list(data["input_shape"]) if data.get("input_shape") else None,
                   import_sha256=hashes)

    def default_input_shape(self) -> list[int]:
        """The input shape to use when the user gives none (batch of one)."""
        if self.input_shape:
            return list(self.input_shape)
        if self.arch in BUILTIN_MODELS:
            shape = list(BUILTIN_MODELS[self.arch].input_shape)
            if "in_channels" in self.kwargs:
                shape[1] = int(self.kwargs["in_channels"])
            return shape
        if self.kwargs.get("cifar_stem"):
            return [1, 3, 32, 32]
        return [1, 3, 224, 224]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (reports and specs record which exact inputs they describe)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise_imports(paths: Sequence[str | Path]) -> tuple[list[str], list[str | None]]:
    """Absolute paths and SHA-256 hashes of the files to import; a path that names no file is kept as
    given (hash ``None``) so that :func:`import_file` can report it."""
    resolved: list[str] = []
    hashes: list[str | None] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            resolved.append(str(path.resolve()))
            hashes.append(file_sha256(path))
        else:
            resolved.append(str(raw))
            hashes.append(None)
    return resolved, hashes


def import_file(path: str | Path) -> str:
    """Import a Python file as a top-level module named after its stem, so ``stem:factory`` resolves
    and pickles referring to ``stem.Class`` load. Its folder goes on ``sys.path`` first, as Python
    does for a script, so ``import sibling`` inside it works. Returns the module name."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"--import {path}: no such file")
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
        return name
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # as Python does for a script: its siblings import by name
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"--import {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code failed; say where
        del sys.modules[name]
        raise ModelSpecError(f"--import {path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    log.info("imported %s as module %r", path, name)
    return name


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        hints = difflib.get_close_matches(name, available, n=3)
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ModelSpecError(f"torchvision has no model {name!r}{hint}")

    def build(**kwargs: Any) -> nn.Module:
        kwargs.setdefault("weights", None)
        cifar_stem = bool(kwargs.pop("cifar_stem", False))
        model = torchvision.models.get_model(name, **kwargs)
        if cifar_stem:
            apply_cifar_stem(model, name)
        return model

    return build


def apply_cifar_stem(model: nn.Module, name: str = "model") -> nn.Module:
    """Replace a ResNet's ImageNet stem (7×7 stride-2 conv + max-pool) with a 3×3 stride-1 conv and
    no pooling, the usual choice for 32×32 inputs (CIFAR): feature maps stay 32×32 in layer1."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ModelSpecError(f"cifar_stem=true applies to ResNet-style models (conv1 + maxpool); {name} has none")
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _import_factory(arch: str) -> Callable[..., nn.Module]:
    module_name, _, attr = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(
            f"architecture {arch!r}: cannot import module {module_name!r} ({exc}); "
            "use --import path/to/file.py to make a file importable") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"architecture {arch!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"architecture {arch!r}: {attr!r} is not callable")
    return obj


def resolve_factory(arch: str) -> Callable[..., nn.Module]:
    """The callable that builds ``arch`` (see the module docstring for the accepted forms)."""
    if arch in BUILTIN_MODELS:
        return BUILTIN_MODELS[arch].factory
    if arch.startswith("torchvision:"):
        return _torchvision_factory(arch.split(":", 1)[1])
    if ":" in arch and arch.split(":", 1)[1]:
        return _import_factory(arch)
    names = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelSpecError(
        f"unknown architecture {arch!r}: use torchvision:<name>, package.module:factory, or one of {names}")


def build_model(spec: ModelSpec) -> nn.Module:
    """Build a fresh (randomly initialised) model from a spec, in eval mode."""
    for path in spec.imports:
        import_file(path)
    factory = resolve_factory(spec.arch)
    try:
        model = factory(**spec.kwargs)
    except TypeError as exc:
        raise ModelSpecError(f"architecture {spec.arch!r} rejected its arguments {spec.kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"architecture {spec.arch!r} returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def parse_arch_args(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are YAML scalars (``10`` → int, ``true`` → bool)."""
    import yaml

    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ModelSpecError(f"--arch-arg {item!r}: expected key=value, e.g. num_classes=10")
        try:
            kwargs[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            kwargs[key.strip()] = raw
    return kwargs
