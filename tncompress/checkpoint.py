"""Read model inputs (state dict + architecture, tncompress checkpoints, trusted pickles) and write
tncompress's own compressed checkpoints atomically.

A compressed checkpoint is one file that ``torch.load(path, weights_only=True)`` reads: plain
dicts, lists, strings, numbers and tensors (see :func:`save_compressed` for the keys).
"""
from __future__ import annotations

import copy
import glob
import logging
import os
import pickle
import sys
import tempfile
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tncompress._version import __version__
from tncompress.errors import CheckpointError, ModelSpecError
from tncompress.models import ModelSpec, build_model, file_sha256, import_file
from tncompress.surgery import apply_structure, factorized_structure

log = logging.getLogger(__name__)

FORMAT_NAME = "tncompress-checkpoint"
FORMAT_VERSION = 1
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


class NeedsArchitecture(CheckpointError):
    """A state dict was given without an architecture to load it into."""


@dataclass
class LoadedModel:
    """A model ready to use, and what is known about where it came from."""

    model: nn.Module
    spec: ModelSpec | None
    kind: str  # "state_dict", "tncompress", "pickle"
    path: str
    layers: list[dict[str, Any]] = field(default_factory=list)  # factorized structure already applied
    header: dict[str, Any] = field(default_factory=dict)        # tncompress checkpoint without state_dict
    note: str = ""  # a whole pickle whose architecture could not be recorded: why, and the flag to add


def check_output_path(path: str | Path) -> Path:
    """Fail early, before any work, if ``path`` cannot be written; returns its folder."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CheckpointError(f"cannot write {path}: it is a folder; give a file name")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot write {path}: {directory} is a file, not a folder")
    if not directory.is_dir():
        raise CheckpointError(f"cannot write {path}: folder {directory} does not exist")
    if not os.access(directory, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CheckpointError(f"cannot write {path}: permission denied")
    return directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporary files that an earlier, killed writer of ``path`` left behind.

    Temporaries are named ``.<name>.<pid>.<random>.tmp``; one whose process no longer runs is stale
    (a live writer's temporary is never touched). Returns what was removed.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    removed = []
    for tmp in directory.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s, left by a writer that was killed", tmp)
            except OSError:
                pass
    return removed


def _output_mode(path: Path) -> int:
    """The existing file's permissions, else 0666 minus the process umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place, so a reader
    (or a crash) never sees a half-written file. Temporaries left by a killed earlier writer of the
    same path are removed first."""
    path = Path(path)
    directory = check_output_path(path)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _output_mode(path))  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _plain(value: Any) -> Any:
    """Tuples → lists recursively, so the checkpoint holds only weights_only-safe plain types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)  # str subclasses (e.g. torch.__version__) are not weights_only-safe
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Drop a DataParallel / DistributedDataParallel ``module.`` prefix when every key has it."""
    keys = list(state_dict)
    meta = getattr(state_dict, "_metadata", None)
    out: dict[str, torch.Tensor]
    if keys and all(k.startswith(prefix) for k in keys):
        out = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items())
        if meta is not None:  # the per-module versions, under the stripped names
            meta = OrderedDict((k[len(prefix):] if k.startswith(prefix) else ("" if k == prefix[:-1] else k), v)
                               for k, v in meta.items())
    else:
        out = OrderedDict(state_dict)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


class _MainClassNotFound(Exception):
    """Raised inside unpickling: a class pickled from a script (module ``__main__``) is nowhere to be found."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


_MISSING = object()


def _lookup(module: Any, qualname: str) -> Any:
    """``module.<qualname>`` (dotted for nested classes), or ``_MISSING``."""
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _main_resolving_pickle(modules: Sequence[str]) -> types.SimpleNamespace:
    """A ``pickle_module`` for ``torch.load`` (it needs ``__name__``, ``Unpickler`` and ``load``) whose
    Unpickler finds classes that were pickled from a script or notebook, where they lived in
    ``__main__``: such a class is looked up in ``__main__`` first, then in the modules imported with
    --import, in the order given; if none defines it, :class:`_MainClassNotFound` is raised."""
    search = [sys.modules[name] for name in modules if name in sys.modules]

    class Unpickler(pickle.Unpickler):
        def find_class(self, module_name: str, name: str) -> Any:
            if module_name != "__main__":
                return super().find_class(module_name, name)
            for module in (sys.modules.get("__main__"), *search):
                found = _lookup(module, name) if module is not None else _MISSING
                if found is not _MISSING:
                    return found
            raise _MainClassNotFound(name)

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="tncompress_pickle", Unpickler=Unpickler, load=load)


def _read(path: Path, trust_pickle: bool, modules: Sequence[str] = ()) -> Any:
    """The object a checkpoint file holds, read with ``weights_only=True``; a file that needs more is
    unpickled only with ``trust_pickle`` (classes from ``__main__`` are resolved against ``modules``,
    the names of the files imported with --import)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable (permissions)")
    if path.suffix == ".safetensors" or _sniff(path) == "safetensors":
        return _read_safetensors(path)
    _check_zip_integrity(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) and "weights_only" not in str(exc):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from exc
        if not trust_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects (e.g. a whole nn.Module); unpickling can run arbitrary code "
                "from the file, so it is refused. If you trust it, pass --trust-pickle (and --import model_def.py if "
                "its classes live in your code); better, save a state_dict and pass --arch") from None
    except Exception as exc:  # torch raises many types on corrupt or truncated files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, or truncated ({_first_line(exc)})") from exc
    log.warning("loading %s with weights_only=False because --trust-pickle was given", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_main_resolving_pickle(modules))
    except _MainClassNotFound as exc:
        raise CheckpointError(
            f"{path}: the pickled model's class {exc.name} was defined in the script that saved it (module __main__) "
            f"and no imported file defines it; pass --import FILE that defines {exc.name}") from None
    except (AttributeError, ModuleNotFoundError) as exc:
        raise CheckpointError(
            f"{path}: the pickled model's class cannot be found ({_first_line(exc)}); "
            "pass --import path/to/model_def.py that defines it") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: unpickling failed ({type(exc).__name__}: {_first_line(exc)})") from exc


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the number the legacy format pickles first
_LEGACY_BINARY = b"\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")  # pickle protocol >= 2: LONG1
_LEGACY_TEXT = f"L{_LEGACY_MAGIC}L\n".encode()  # pickle protocols 0 and 1
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"\x89HDF", "an HDF5 file"),
               (b"\x93NUMPY", "a NumPy .npy array"), (b"\x7fELF", "an executable"))


def _sniff(path: Path) -> str:
    """What the file's first bytes say it is: "zip" (torch.save), "pickle" (torch's legacy format)
    or "safetensors"; anything else raises a one-line CheckpointError naming what the file looks
    like, so a YAML or an image is not called a pickle that needs --trust-pickle."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(exc)})") from None
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes), not a readable PyTorch checkpoint")
    if head.startswith(_ZIP_MAGIC):
        _check_torch_zip(path)
        return "zip"
    if head.startswith(b"\x80") or head.startswith(_LEGACY_TEXT):
        if _LEGACY_BINARY in head[:32] or head.startswith(_LEGACY_TEXT):
            return "pickle"
        raise CheckpointError(f"{path} is a Python pickle, but not a PyTorch checkpoint (torch.save writes a zip "
                              "archive, or a pickle that starts with PyTorch's magic number); save it with "
                              "torch.save(model.state_dict(), path)")
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        return "safetensors"  # an 8-byte header length, then the JSON header
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            raise CheckpointError(f"{path} is {what}, not a readable PyTorch checkpoint")
    text = _as_text(head)
    if text is not None:
        raise CheckpointError(f"{path} is {_text_kind(path, text)}, not a readable PyTorch checkpoint")
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: neither a zip archive (torch.save's format) "
                          f"nor a pickle (its legacy format); it starts with bytes {head[:8].hex(' ')}")


def _check_torch_zip(path: Path) -> None:
    """Refuse a zip archive that is not one torch.save wrote (no ``data.pkl`` inside); a damaged
    one is left to the integrity check and torch.load, which name the damage."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        raise CheckpointError(f"{path} is a zip archive of {len(names)} file(s) but not a PyTorch checkpoint "
                              "(torch.save's archives hold a data.pkl)")


def _as_text(head: bytes) -> str | None:
    """``head`` decoded when it is UTF-8 text without control bytes other than whitespace (a cut
    multi-byte character at the end is allowed), else None."""
    if any(byte < 0x20 and byte not in b"\t\n\r\x0b\x0c" for byte in head):
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return None
        return head[: exc.start].decode("utf-8")


def _text_kind(path: Path, text: str) -> str:
    """"a YAML/text file (it starts with 'version: 1')" and the like, for the error message."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    start = f" (it starts with {first[:40]!r})" if first else ""
    kinds = {".py": "a Python source file", ".json": "a JSON/text file", ".yaml": "a YAML/text file",
             ".yml": "a YAML/text file"}
    kind = kinds.get(path.suffix.lower())
    if kind is None:
        kind = ("a JSON/text file" if first.startswith(("{", "[")) else
                "a YAML/text file" if ":" in first else "a text file")
    return kind + start


def _check_zip_integrity(path: Path) -> None:
    """torch.load does not verify the CRC-32 that every member of a zip checkpoint carries, so a
    damaged file would load with silently wrong weights; check them (one extra read of the file)."""
    if not zipfile.is_zipfile(path):
        return  # legacy format, or damaged beyond recognition: torch.load reports it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: corrupted checkpoint ({_first_line(exc)})") from exc
    if bad is not None:
        raise CheckpointError(f"{path}: corrupted checkpoint: {bad} fails its CRC-32 check "
                              "(the file was damaged after it was written)")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file (a format that cannot hold code); needs the optional
    ``safetensors`` package."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package: "
                              "pip install 'tncompress[safetensors]'") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path}: not a readable safetensors file, or truncated ({_first_line(exc)})") from exc


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN or Inf: compressing, fine-tuning or
    reporting it would only produce a broken model with plausible-looking numbers."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point() or tensor.is_complex():
            bad = ~torch.isfinite(tensor.detach())
            if bool(bad.any()):
                nan = int(torch.isnan(tensor.detach()).sum())
                kinds = " and ".join(k for k, n in (("NaN", nan), ("Inf", int(bad.sum()) - nan)) if n)
                raise CheckpointError(f"{source}: {name} holds {int(bad.sum()):,} {kinds} value(s) of "
                                      f"{tensor.numel():,}; the model is broken (a diverged training run?) "
                                      "and is refused")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    return None


def _batch_counters(model: nn.Module, keys: Sequence[str]) -> list[str]:
    """The keys among ``keys`` that are a normalisation layer's ``num_batches_tracked`` buffer."""
    found = []
    for key in keys:
        owner, _, leaf = key.rpartition(".")
        if leaf != "num_batches_tracked":
            continue
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase):
            found.append(key)
    return found


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that names the mismatch.

    BatchNorm ``num_batches_tracked`` buffers absent from the file (checkpoints saved by PyTorch
    before 0.4.1, such as many published CIFAR models) keep the model's own value, as
    ``nn.Module.load_state_dict`` does for old checkpoints; any other missing key is an error.
    """
    state_dict = strip_prefix(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    counters = _batch_counters(model, missing)
    if counters:
        for key in counters:
            state_dict[key] = expected[key]
        filled = set(counters)
        missing = [k for k in missing if k not in filled]
        log.info("%s: %d BatchNorm num_batches_tracked buffer(s) missing (saved by an older PyTorch); "
                 "they keep the model's value, as load_state_dict does", source, len(counters))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source}: state dict does not fit the architecture: {'; '.join(parts)} "
                              "— is --arch (and --arch-arg) right?")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state_dict[key].shape)} but the architecture expects "
                f"{tuple(tensor.shape)} — is --arch (and --arch-arg, e.g. num_classes) right?")
    if getattr(state_dict, "_metadata", None) is None and getattr(expected, "_metadata", None) is not None:
        # A state dict without PyTorch's per-module version metadata (rebuilt as a plain dict, or
        # written by such code) loads with the versions of the model as built now: modules that
        # check their version on load (torchvision's MNASNet) refuse None.
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = copy.deepcopy(expected._metadata)  # type: ignore[attr-defined]
    model.load_state_dict(state_dict, strict=True)


def is_compressed_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME


def _locate_imports(spec: ModelSpec, path: Path, explicit: Sequence[str]) -> ModelSpec:
    """The recorded spec with each recorded --import file replaced by the file to import now.

    A file the caller gave (``explicit``) wins over a recorded one with the same stem; otherwise the
    recorded path is used if it exists, else the same file name beside the checkpoint, else in the
    current folder. A file whose SHA-256 differs from the recorded one is loaded with a warning.
    """
    given = {Path(p).stem: Path(p) for p in explicit}
    found: list[str] = []
    hashes = [*spec.import_sha256, *[None] * (len(spec.imports) - len(spec.import_sha256))]
    for recorded, digest in zip(spec.imports, hashes):
        name = Path(recorded).name
        candidates = [given[Path(recorded).stem]] if Path(recorded).stem in given else \
            [Path(recorded), path.parent / name, Path.cwd() / name]
        use = next((c for c in candidates if c.is_file()), None)
        if use is None:
            raise CheckpointError(f"{path}: it was made with --import {recorded}, which is not there; "
                                  f"pass --import PATH to the file that defines {spec.arch}")
        if use.resolve() != Path(recorded).resolve():
            log.info("%s: importing %s in place of the recorded %s", path, use, recorded)
        if digest and file_sha256(use) != digest:
            log.warning("%s: %s differs from the file the checkpoint was made with (%s, sha256 %s…); loading anyway",
                        path, use, recorded, digest[:12])
        found.append(str(use))
    return ModelSpec(spec.arch, dict(spec.kwargs), found, spec.input_shape)


def _rebuild_compressed(obj: Mapping[str, Any], path: Path, base_model: nn.Module | None,
                        explicit: Sequence[str] = ()) -> LoadedModel:
    """Rebuild a tncompress checkpoint: its base model (from the recorded spec, importing the
    recorded files located by :func:`_locate_imports`, unless ``base_model`` is given), the
    factorized structure, then the weights."""
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this tncompress "
                              f"({__version__}) reads; upgrade tncompress")
    for key in ("base", "layers", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"{path}: tncompress checkpoint is missing its {key!r} entry (corrupted?)")
    spec = ModelSpec.from_dict(obj["base"]) if obj["base"].get("arch") else None
    if base_model is None:
        if spec is None:
            why = (obj.get("metadata") or {}).get("architecture_note") or \
                "pass --arch (and --import / --arch-arg) for its base model"
            raise CheckpointError(f"{path}: made from a pickled model whose architecture was not recorded: {why} "
                                  "(from Python: tncompress.load(path, base_model=...))")
        spec = _locate_imports(spec, path, explicit)
        try:
            base_model = build_model(spec)
        except ModelSpecError as exc:
            raise CheckpointError(f"{path}: cannot rebuild its base model: {exc}") from exc
    layers = [dict(entry) for entry in obj["layers"]]
    try:
        apply_structure(base_model, layers)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its layer plan does not fit the base model ({_first_line(exc)})") from exc
    load_state_dict_into(base_model, obj["state_dict"], str(path))
    header = {k: v for k, v in obj.items() if k != "state_dict"}
    return LoadedModel(base_model.eval(), spec, "tncompress", str(path), layers, header)


def _given_imports(imports: Sequence[str] | None, spec: ModelSpec | None) -> list[str]:
    """The files the caller asked to import (``imports``, then the spec's), each once, in order."""
    files: list[str] = []
    for file in [*(imports or []), *(spec.imports if spec else [])]:
        if all(Path(file).resolve() != Path(seen).resolve() for seen in files):
            files.append(str(file))
    return files


def spec_of_pickled(model: nn.Module, imports: Sequence[str]) -> tuple[ModelSpec | None, str]:
    """How to rebuild a whole pickled model, so a checkpoint made from it records its architecture:
    its class, when an --import file (or an installed module) defines it and it builds with no
    arguments into the same state-dict keys and shapes. Otherwise (None, why — with the flag to add)."""
    cls = type(model)
    module_name, qualname = cls.__module__, cls.__qualname__
    arch = f"{module_name}:{qualname}"
    files = {Path(f).stem: str(f) for f in imports}
    if module_name not in files and (module_name == "__main__" or "<locals>" in qualname
                                     or getattr(sys.modules.get(module_name), "__file__", None) is None):
        return None, (f"its class {qualname} is not defined in an --import file; pass --import FILE that defines "
                      f"{qualname} (and --arch FILE_STEM:{qualname} if it needs arguments)")
    candidate = ModelSpec(arch, {}, [files[module_name]] if module_name in files else [])
    try:
        fresh = build_model(candidate)
    except ModelSpecError as exc:
        return None, f"{qualname} does not build with no arguments ({exc}); pass --arch {arch} --arch-arg KEY=VALUE"
    except Exception as exc:  # the user's constructor failed
        return None, (f"{qualname}() failed with no arguments ({type(exc).__name__}: {_first_line(exc)}); pass --arch "
                      f"{arch} --arch-arg KEY=VALUE")
    mine, theirs = model.state_dict(), fresh.state_dict()
    same = list(mine) == list(theirs) and all(tuple(mine[k].shape) == tuple(theirs[k].shape) for k in mine)
    if not same:
        return None, (f"{qualname}() built with no arguments has other weights than the pickled model; pass --arch "
                      f"{arch} --arch-arg KEY=VALUE with the arguments it was built with")
    log.info("pickled model: architecture recorded as %s", arch)
    return candidate, ""


def load_model(path: str | Path, spec: ModelSpec | None = None, *, trust_pickle: bool = False,
               imports: list[str] | None = None, base_model: nn.Module | None = None) -> LoadedModel:
    """Load any supported input: a tncompress checkpoint (rebuilt from its recorded spec), a state
    dict (needs ``spec``), or — only with ``trust_pickle`` — a whole pickled module.

    ``imports`` (and ``spec.imports``) are imported first; they take precedence over a checkpoint's
    recorded files of the same stem, and a whole pickle's classes from ``__main__`` are looked up in them.
    """
    path = Path(path)
    explicit = _given_imports(imports, spec)
    modules = [import_file(file) for file in explicit]
    obj = _read(path, trust_pickle, modules)
    if is_compressed_checkpoint(obj):
        if spec is not None and base_model is None and not obj.get("base", {}).get("arch"):
            base_model = build_model(spec)
        return _finite(_rebuild_compressed(obj, path, base_model, explicit))
    if isinstance(obj, nn.Module):
        note = ""
        if spec is None:
            spec, note = spec_of_pickled(obj, explicit)
        return _finite(LoadedModel(obj.eval(), spec, "pickle", str(path), note=note))
    state_dict = _as_state_dict(obj)
    if state_dict is None:
        raise CheckpointError(f"{path}: holds neither a state dict nor a model "
                              f"(top-level {type(obj).__name__}{_keys_hint(obj)})")
    if spec is None:
        raise NeedsArchitecture(f"{path} is a state dict: say which architecture it belongs to with --arch "
                              "(e.g. --arch torchvision:resnet18 --arch-arg num_classes=10)")
    model = base_model if base_model is not None else build_model(spec)
    load_state_dict_into(model, state_dict, str(path))
    return _finite(LoadedModel(model.eval(), spec, "state_dict", str(path)))


def _finite(loaded: LoadedModel) -> LoadedModel:
    check_finite(loaded.model, loaded.path)
    return loaded


def _keys_hint(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f" with keys {', '.join(map(str, list(obj)[:5]))}"
    return ""


def load(path: str | Path, *, base_model: nn.Module | None = None, imports: list[str] | None = None) -> nn.Module:
    """Load a tncompress compressed checkpoint as a ready ``nn.Module`` (eval mode).

    Reads with ``weights_only=True``; rebuilds the base model from the recorded spec (or uses
    ``base_model``), re-applies the factorized structure and loads the state dict strictly. The
    recorded --import files are found where they were, else beside ``path``, else in the current
    folder; a file in ``imports`` replaces the recorded one with the same stem.
    """
    path = Path(path)
    explicit = _given_imports(imports, None)
    for file in explicit:
        import_file(file)
    obj = _read(path, trust_pickle=False)
    if not is_compressed_checkpoint(obj):
        raise CheckpointError(f"{path} is not a tncompress checkpoint; use load_model(path, spec) for state dicts")
    return _rebuild_compressed(obj, path, base_model, explicit).model


def save_compressed(path: str | Path, model: nn.Module, *, spec: ModelSpec | None,
                    layers: list[dict[str, Any]] | None = None, plan: list[dict[str, Any]] | None = None,
                    recipe: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> None:
    """Write a compressed checkpoint atomically.

    Keys: ``format``, ``format_version``, ``tncompress_version``, ``torch_version``, ``base`` (model
    spec), ``layers`` (name, method, config of every factorized layer: enough to rebuild the
    structure), ``plan`` (the resolved per-layer plan with ranks, counts and errors), ``recipe``,
    ``metadata`` and ``state_dict``.

    The structure is derived from ``model`` itself (every factorized layer it holds, also those of a
    reloaded checkpoint decomposed again); ``layers``, if given, must agree with it.
    """
    structure = factorized_structure(model)
    if layers is not None:
        given = {entry["name"] for entry in layers}
        missing = given - {entry["name"] for entry in structure}
        if missing:
            raise CheckpointError(f"{path}: layers {sorted(missing)} are listed as factorized but the model "
                                  "holds no factorized layer there")
    layers = structure
    own = model.state_dict()
    state_dict: dict[str, torch.Tensor] = OrderedDict((k, v.detach().cpu().clone()) for k, v in own.items())
    if hasattr(own, "_metadata"):  # per-module state-dict versions (torchvision's MNASNet reads them)
        state_dict._metadata = copy.deepcopy(own._metadata)  # type: ignore[attr-defined]
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tncompress_version": __version__,
        "torch_version": str(torch.__version__),
        "base": _plain(spec.to_dict()) if spec else {"arch": None},
        "layers": _plain(layers),
        "plan": _plain(plan or []),
        "recipe": _plain(recipe or {}),
        "metadata": _plain(metadata or {}),
        "state_dict": state_dict,
    }
    atomic_save(payload, path)
    log.info("wrote %s", path)
