"""Checkpoint files: safe loading, atomic saving, nested state dicts, sample batches.

* A ``.safetensors`` name (any case), or a safetensors header under another name, goes through
  the safetensors library; a ``torch.save`` archive or pickle, whatever its name (``.pt``,
  ``.pth``, ``.bin``, ``.ckpt``...), is read with ``torch.load(weights_only=True)``: a file that
  needs arbitrary pickled code is refused, never executed; a file that is none of these is named
  as such.
* Writes are atomic: a temporary file in the destination folder, then ``os.replace``.  An
  existing file is not overwritten without ``force``, the input is never the output, and a
  device, FIFO or socket is never replaced.  A safetensors output keeps the input's ``__metadata__``.
* A checkpoint may nest its state dicts (``{"state_dict": ...}``, ``{"generator": ...,
  "discriminator": ...}``): :func:`map_state_dicts` transforms each one and keeps the rest.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tarfile
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import WeightNormError, few, first_line

__all__ = [
    "CheckpointError", "check_output", "file_format", "files_of", "is_state_dict", "load_batch", "load_checkpoint",
    "map_state_dicts", "optimizer_states", "rebuilt_like", "safetensors_metadata", "save_checkpoint", "state_dict_paths",
]

SAFETENSORS = ".safetensors"
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint's index: model.safetensors.index.json


class CheckpointError(WeightNormError):
    """A checkpoint or batch file cannot be read or written as asked (the file is named)."""


def is_state_dict(obj: Any) -> bool:
    """A model's ``state_dict()``: a mapping of string keys holding at least one tensor of one
    dimension or more, every tensor under a parameter name (``conv.0.weight``: no ``/``, space or
    empty part).  It may hold other values too (``"epoch": 3``, a module's ``_extra_state``, an
    optimizer's state saved beside the weights, other state dicts such as ``"ema": state_dict``),
    kept as they are.  Names of scalars only (a callback's ``{"/ckpts/best.ckpt": score}``, an
    optimizer's ``param_groups`` with a tensor ``lr``) are no model's.  A checkpoint that holds
    tensors of its own beside nested state dicts (``{"model": sd, "ema": sd, "mel_basis": t}``) is
    one too: :func:`state_dict_paths` lists it and the nested ones."""
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    tensors = {key: value for key, value in obj.items() if isinstance(value, Tensor)}
    return any(t.ndim for t in tensors.values()) and all(map(_is_parameter_name, tensors))


def _is_parameter_name(key: str) -> bool:
    """A dotted name such as ``encoder.layers.0.weight``, not a file path or a phrase."""
    return all(part and not any(c.isspace() or c in "/\\" for c in part) for part in key.split("."))


def _children(obj: Any) -> list[tuple[str, Any]]:
    """Where state dicts may nest: string-keyed mappings, lists and tuples (``{"ema": [sd]}``),
    and a state dict's values that are not tensors (``{**sd, "ema": sd}``).
    Mappings with other keys (an optimizer's per-parameter ``state``) hold no model weights,
    nor does an optimizer's ``state_dict()`` (``state`` and ``param_groups``) or a module's
    ``_extra_state``."""
    if isinstance(obj, Mapping) and {"state", "param_groups"} <= obj.keys():
        return []
    if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
        return [(k, v) for k, v in obj.items() if not isinstance(v, Tensor) and not k.endswith("_extra_state")]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    return []


def state_dict_paths(obj: Any, path: tuple[str, ...] = (), *, _above: frozenset[int] = frozenset()) -> list[tuple[str, ...]]:
    """Where the state dicts are in a checkpoint: ``[()]`` for a bare one, ``[("generator",), ...]``,
    ``("ema", "0")`` for the first of a list; a state dict that holds others (``{**sd, "ema": sd}``)
    comes before them: ``[(), ("ema",)]``.  A container that holds itself (``cfg["parent"] = cfg``,
    which pickle keeps) is not entered again (``_above``: the containers on the way here)."""
    found = [path] if is_state_dict(obj) else []
    above = _above | {id(obj)}
    return found + [p for key, value in _children(obj) if id(value) not in above
                    for p in state_dict_paths(value, (*path, key), _above=above)]


def optimizer_states(obj: Any, path: tuple[str, ...] = (), *,
                     _above: frozenset[int] = frozenset()) -> list[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """Every optimizer's ``state_dict()`` (``state`` and ``param_groups``) in a checkpoint, with
    its path (Lightning's ``("optimizer_states", "0")``, HiFi-GAN's ``("optim_g",)``)."""
    if isinstance(obj, Mapping) and {"state", "param_groups"} <= obj.keys():
        return [(path, obj)]
    items = (obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    above = _above | {id(obj)}
    return [found for key, value in items if not isinstance(value, Tensor) and id(value) not in above
            for found in optimizer_states(value, (*path, str(key)), _above=above)]


def rebuilt_like(mapping: Mapping[str, Any], items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A mapping of ``items`` of ``mapping``'s kind: an ``OrderedDict`` stays one and keeps its
    ``_metadata`` (a ``state_dict()``'s, which ``load_state_dict`` reads); any other, a dict."""
    kind = type(mapping) if type(mapping) in (dict, OrderedDict) else dict
    rebuilt = kind(items)
    if kind is OrderedDict and hasattr(mapping, "_metadata"):
        rebuilt._metadata = mapping._metadata  # type: ignore[attr-defined]
    return rebuilt


def map_state_dicts(obj: Any, fn: Callable[[dict[str, Any]], dict[str, Any]], *,
                    _above: frozenset[int] = frozenset()) -> Any:
    """Apply ``fn(state_dict)`` to every state dict in ``obj``; keep everything else (an
    ``OrderedDict`` stays one).  A state dict that holds others is mapped first, then the ones it
    holds (``fn`` keeps values that are not tensors as they are).  A container that holds itself
    keeps that reference as it is (see :func:`state_dict_paths`)."""
    above = _above | {id(obj)}
    if is_state_dict(obj):
        obj = fn(obj)
    children = _children(obj)
    if not children:
        return obj
    mapped = {key: value if id(value) in above else map_state_dicts(value, fn, _above=above) for key, value in children}
    if all(mapped[key] is value for key, value in children):
        return obj  # nothing inside changed: the mapping as it is (a state dict keeps its _metadata)
    if isinstance(obj, Mapping):
        return rebuilt_like(obj, ((key, mapped.get(key, value)) for key, value in obj.items()))
    values = list(mapped.values())
    return type(obj)(values) if type(obj) in (list, tuple) else values


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint safely (no arbitrary code), on the CPU.  A sharded checkpoint is read
    whole through its index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``);
    one of its shards alone is refused while the index is beside it (a weight-norm pair may be
    split across two shards, and a fold of one shard would leave the index naming keys it lost)."""
    path = _existing_file(path)
    if path.name.endswith(INDEX_SUFFIX):
        return _load_sharded(path)
    index = _index_beside(path)
    if index is not None:
        msg = (f"{path}: one shard of a sharded checkpoint (a weight-norm pair may be split across shards); "
               f"pass its index, {index}, to read the whole checkpoint")
        raise CheckpointError(msg)
    return _read(path)


_CHECKPOINT_SUFFIXES = (INDEX_SUFFIX, ".safetensors", ".bin", ".pt", ".pth", ".ckpt")
#: Files a trainer saves beside the weights (Hugging Face's Trainer, Lightning): not offered as the checkpoint.
_NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args", "scaler", "trainer_state")


def _checkpoint_files(folder: Path) -> list[str]:
    """The names of the files in ``folder`` that may be a model's checkpoint, the weights first."""
    return sorted((p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(_CHECKPOINT_SUFFIXES)
                   and not p.name.lower().startswith(_NOT_WEIGHTS)),
                  key=lambda name: ("model" not in name.lower(), name))


def _checkpoint_files_below(folder: Path) -> list[str]:
    """Checkpoint files one folder down (``global_step100/mp_rank_00_model_states.pt``, DeepSpeed's
    layout), those of the folder its ``latest`` file names first."""
    latest = folder / "latest"
    named = latest.read_text(errors="replace").strip() if latest.is_file() and latest.stat().st_size < 4096 else ""
    subfolders = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: (p.name != named, p.name))
    return [f"{sub.name}/{name}" for sub in subfolders for name in _checkpoint_files(sub)]


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():  # a save_pretrained folder, a run's checkpoint folder: name what is inside
        inside = _checkpoint_files(path)
        index = [name for name in inside if name.lower().endswith(INDEX_SUFFIX)]
        below = [] if inside else _checkpoint_files_below(path)
        hint = (f"; pass the checkpoint file in it: {', '.join(index or inside[:5])}"
                + (" (a sharded checkpoint's index, read whole)" if index else "") if inside else
                f"; pass a checkpoint file in a folder in it: {', '.join(below[:5])}" if below else
                "; it holds no checkpoint file (.safetensors, .bin, .pt, .pth, .ckpt, or a sharded one's .index.json)")
        msg = f"{path}: is a folder{hint}"
        raise CheckpointError(msg)
    if not path.is_file():
        msg = f"{path}: no such file" if not path.exists() else f"{path}: not a file"
        raise CheckpointError(msg)
    return path


def _read(path: Path) -> Any:
    """One checkpoint file's contents (see :func:`load_checkpoint`)."""
    kind = file_format(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind == "unknown" and _tar_with_members(path):
        msg = (f"{path}: a tar archive (NeMo's .nemo is one), not a checkpoint; extract it (tar -xf) and pass the "
               "checkpoint inside (NeMo's model_weights.ckpt)")
        raise CheckpointError(msg)
    if kind == "unknown":
        start = path.read_bytes()[:16] if path.stat().st_size else b""
        what = f"it starts with {start!r}" if start else "it is empty"
        msg = f"{path}: not a PyTorch checkpoint (neither a torch.save archive, a pickle nor safetensors: {what})"
        raise CheckpointError(msg)
    if kind == "zip" and _is_torchscript(path):
        msg = (f"{path}: a TorchScript archive (torch.jit.save), which holds code, not a checkpoint; load it with "
               "torch.jit.load and save its state_dict() with torch.save")
        raise CheckpointError(msg)
    try:
        with warnings.catch_warnings():  # a bare pickle's protocol draws a warning before the clear error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            with path.open("rb") as file:  # (a file, not its name: torch reads a .safetensors name as one)
                loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = _needed_global(str(exc))
        if "DTensor" in str(exc):  # torch.save(model.state_dict()) of a model FSDP sharded: one rank's shards
            raise CheckpointError(_shards_message(path)) from exc
        if needed is not None:  # the unpickler met a class or function it would import, or build
            name = needed if "." in needed else None  # (a bare builtin such as getattr: no class to allow)
            allow = (f"If you trust its source and that class: allow it with --safe-global {name} (the CLI), or in "
                     f"Python load it within torch.serialization.safe_globals([{name}]) and fold it with "
                     "wn.fold_state_dict, which keeps its other entries; or load" if name else "If you trust its "
                     "source, load")
            msg = (f"{path}: refused to load: the file needs arbitrary Python code to unpickle "
                   f"({_unpickler_detail(exc)}). It was not executed. {allow} it with torch.load(..., "
                   "weights_only=False) and save the weights alone (fairseq's and Coqui's ckpt['model'] beside "
                   "their config objects).")
        else:
            msg = f"{path}: not a PyTorch checkpoint torch.load can read safely ({_unpickler_detail(exc)})"
        raise CheckpointError(msg) from exc
    except Exception as exc:  # on a file that is not a checkpoint torch's unpickler raises KeyError, ValueError...
        msg = f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})"
        raise CheckpointError(msg) from exc
    if _holds_dtensor(loaded):
        raise CheckpointError(_shards_message(path))
    return loaded


def _tar_with_members(path: Path) -> bool:
    """Whether ``path`` is a tar archive holding a file (``tarfile.is_tarfile`` takes zero bytes for one)."""
    try:
        with tarfile.open(path) as archive:
            return archive.next() is not None
    except (tarfile.TarError, OSError):
        return False


def _kind(tensor: Tensor) -> str:
    """``quantized (qint8)``, ``sparse_coo``: what makes ``tensor`` other than a dense one."""
    if tensor.is_quantized:
        return f"quantized ({str(tensor.dtype).removeprefix('torch.')})"
    return str(tensor.layout).removeprefix("torch.")


def _holds_dtensor(obj: Any) -> bool:
    """Whether a DTensor is among the values of ``obj`` (by its class's name: where DTensor was not
    imported first); each mapping, list and tuple is walked once (a config may hold itself)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if type(item).__name__ == "DTensor":
            return True
        if isinstance(item, (Mapping, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, Mapping) else item)
    return False


def _shards_message(path: Path) -> str:
    return (f"{path}: one rank's shards of a model sharded by FSDP (DTensors), not a whole state dict; save the full "
            "state dict on one rank (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True))) and convert that")


def _load_sharded(index: Path) -> dict[str, Any]:
    """The state dict a sharded checkpoint's index (Hugging Face's ``weight_map``) spreads over its
    shards, shard after shard, each in the order its file gives (a safetensors file's: sorted by
    name); each key from the shard the index names (another shard's copy of it is stale)."""
    weight_map = _weight_map(index)
    merged: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        part = _read(_existing_file(path))
        if not _is_shard(part):  # (a shard may hold 0-d tensors alone, CLIP's logit_scale, or an _extra_state)
            msg = f"{path}: a shard of {index.name} that holds no state dict (a mapping of names to tensors)"
            raise CheckpointError(msg)
        unlisted = [key for key in part if key not in weight_map]
        if unlisted:
            msg = f"{path}: holds keys its index {index.name} does not list: {few(unlisted)}"
            raise CheckpointError(msg)
        merged.update((key, value) for key, value in part.items() if weight_map[key] == shard)
    absent = [key for key in weight_map if key not in merged]
    if absent:
        msg = f"{index}: keys the index lists are not in the shards it names: {few(absent)}"
        raise CheckpointError(msg)
    return merged


def _is_shard(obj: Any) -> bool:
    """A mapping of string keys (a state dict's: tensors, and values such as a module's
    ``_extra_state``), as a sharded checkpoint's shard is; the index says which keys it holds."""
    return isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj)


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's ``weight_map`` (key -> shard file), checked."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = f"{index}: not a readable checkpoint index (a JSON file with a 'weight_map' of key -> shard file): {exc}"
        raise CheckpointError(msg) from exc
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) and v for v in weight_map.values())):
        msg = f"{index}: not a checkpoint index: its 'weight_map' must map each key to a shard file name"
        raise CheckpointError(msg)
    elsewhere = sorted({v for v in weight_map.values() if Path(v).name != v or v in (".", "..")})
    if elsewhere:
        msg = f"{index}: names shard files outside its folder ({few(elsewhere)}); a sharded checkpoint keeps them beside it"
        raise CheckpointError(msg)
    return weight_map


def files_of(path: str | os.PathLike) -> tuple[str, ...]:
    """The files a checkpoint is read from: a sharded checkpoint's index and its shards, or ``path``."""
    path = Path(path)
    if not (path.name.endswith(INDEX_SUFFIX) and path.is_file()):
        return (str(path),)
    try:
        shards = sorted(set(_weight_map(path).values()))
    except CheckpointError:
        return (str(path),)  # (load_checkpoint's error to give)
    return (str(path), *(str(path.parent / shard) for shard in shards))


def _index_beside(shard: Path) -> Path | None:
    """The index of the sharded checkpoint ``shard`` belongs to (``model-00001-of-00003.safetensors``
    beside ``model.safetensors.index.json``), or None."""
    match = re.fullmatch(r"(.+)-\d{5}-of-\d{5}(\.[A-Za-z]+)", shard.name)
    if match is None:
        return None
    index = shard.with_name(f"{match[1]}{match[2]}{INDEX_SUFFIX}")
    return index if index.is_file() else None


def file_format(path: Path) -> str:
    """``"zip"`` (``torch.save``'s archive), ``"pickle"`` (legacy ``torch.save``, or a bare pickle),
    ``"safetensors"`` (by content, or by name, any case) or ``"unknown"``, read off the first bytes
    (a ``torch.save`` archive named ``.safetensors`` is one)."""
    with path.open("rb") as file:
        head = file.read(9)
    # safetensors: an 8-byte little-endian header length (its low byte may be 0x80), then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80"):  # pickle protocol 2 or later
        return "pickle"
    return "safetensors" if path.suffix.lower() == SAFETENSORS else "unknown"  # (its reader says what is wrong)


def _is_torchscript(path: Path) -> bool:
    """Whether a zip archive is ``torch.jit.save``'s: its record holds ``code/`` and ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):  # torch.load then names what is wrong
        return False
    return any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names)


def _needed_global(message: str) -> str | None:
    """The class or function torch's weights-only unpickler refused (``Unsupported global: GLOBAL
    argparse.Namespace``, or ``Can only build ... but got <class 'numpy.dtypes.Float64DType'>``),
    or None where it refused something else."""
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Can only build .* but got <class '([\w.]+)'>", message)
    return found.group(1) if found else None


def _unpickler_detail(exc: Exception) -> str:
    """The line of torch's weights-only unpickler error that says what it met."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = next((line for line in lines if "unsupported" in line.lower() or line.startswith("Can only build")), None)
    if found is None:
        return lines[0] if lines else type(exc).__name__
    start = found.lower().find("unsupported")
    return found[start:] if start > 0 and found[:start].endswith("error: ") else found


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Raise :class:`CheckpointError` if ``path`` is one of ``inputs`` (the files the output is
    made from), a folder, in a folder that does not exist or that it cannot write in, an existing file that is not a regular one (a device such as
    ``/dev/null``, a FIFO, a socket: never replaced, even with ``force``), or an existing file
    and not ``force``; or a path that ends with a separator (``out/``: a folder, meant or not)."""
    if str(os.fspath(path)).endswith((os.sep, "/")):
        msg = f"{os.fspath(path)}: names a folder (it ends with a separator); give the path of the file to write"
        raise CheckpointError(msg)
    path = Path(path)
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(path, source):
            msg = f"{path}: is the input file; write the output somewhere else"
            raise CheckpointError(msg)
    if path.is_dir():
        msg = f"{path}: is a folder; give the path of the file to write"
        raise CheckpointError(msg)
    if not path.parent.is_dir():
        msg = f"{path}: the folder {path.parent} does not exist"
        raise CheckpointError(msg)
    if not os.access(path.parent, os.W_OK | os.X_OK):  # found before the work, not when the result is written
        msg = f"{path}: cannot write in {path.parent} (permission denied)"
        raise CheckpointError(msg)
    if path.exists() and not path.is_file():
        msg = (f"{path}: is not a regular file ({_special_kind(path)}); outputs replace the file they are "
               f"written to, so give the path of a new or regular file")
        raise CheckpointError(msg)
    if path.exists() and not force:
        msg = f"{path}: already exists; to overwrite it, pass --force"
        raise CheckpointError(msg)


def _special_kind(path: Path) -> str:
    """What a file that is not a regular one is, in words."""
    kinds = [("a character device", path.is_char_device), ("a block device", path.is_block_device),
             ("a FIFO", path.is_fifo), ("a socket", path.is_socket)]
    return next((name for name, test in kinds if test()), "a special file")


def save_checkpoint(obj: Any, path: str | os.PathLike, *, force: bool = False, inputs: tuple[str | os.PathLike, ...] = (),
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``obj`` atomically (``.safetensors`` for a flat state dict, else ``torch.save``).

    Refuses what :func:`check_output` refuses: an existing file unless ``force``, one of
    ``inputs`` (the files the output was made from), a device or FIFO.  ``metadata``: the
    safetensors header's ``__metadata__`` (``{"format": "pt"}``), for a safetensors output.
    A write that fails (a full disk, an object pickle cannot store) raises :class:`CheckpointError`
    naming the file, and leaves no file behind.
    """
    check_output(path, force=force, inputs=inputs)
    path = Path(path)
    safetensors = path.suffix.lower() == SAFETENSORS
    if safetensors and not is_state_dict(obj):
        msg = (f"{path}: safetensors holds one flat mapping of names to tensors, but this checkpoint nests "
               f"state dicts ({', '.join('.'.join(p) for p in state_dict_paths(obj)) or 'no tensors'}); use .pt, "
               f"or write one of them alone (fold and convert take --key)")
        raise CheckpointError(msg)
    if safetensors and (plain := [k for k, v in obj.items() if not isinstance(v, Tensor)]):
        msg = f"{path}: safetensors holds only tensors, but {few(plain)} {'is' if len(plain) == 1 else 'are'} not; use .pt"
        raise CheckpointError(msg)
    if safetensors and (odd := [k for k, v in obj.items() if v.is_quantized or v.layout != torch.strided]):
        kinds = ", ".join(sorted({_kind(obj[k]) for k in odd}))
        msg = (f"{path}: {few(odd)} {'is a' if len(odd) == 1 else 'are'} {kinds} tensor{'' if len(odd) == 1 else 's'}, "
               "which safetensors cannot store (it holds dense tensors); use .pt")
        raise CheckpointError(msg)
    if safetensors and (meta := [k for k, v in obj.items() if v.is_meta]):
        msg = (f"{path}: {few(meta)} {'is a meta tensor' if len(meta) == 1 else 'are meta tensors'} (a shape, no "
               f"values), which safetensors cannot store; use .pt, or load real weights first")
        raise CheckpointError(msg)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        msg = f"{path}: cannot write in {path.parent} ({exc.strerror or exc})"
        raise CheckpointError(msg) from exc
    os.close(fd)
    try:
        if safetensors:
            _save_safetensors(obj, tmp, metadata)
        else:
            torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and safetensors) make it private; the output gets the usual mode
        os.replace(tmp, path)
    except Exception as exc:  # a full disk, a file-size limit, an object pickle cannot store
        Path(tmp).unlink(missing_ok=True)
        msg = f"{path}: writing it failed ({_write_failure(exc)}); no file was written"
        raise CheckpointError(msg) from exc
    except BaseException:  # an interrupt: nothing half-written is left
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_failure(exc: Exception) -> str:
    """Why a write failed, in a line: the system's reason (``No space left on device``), or the
    writer's first line with its type (torch's zip writer stops with ``RuntimeError: ... unexpected
    pos``, safetensors with ``SafetensorError: ... I/O error``)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if "unexpected pos" in detail:  # the zip writer found fewer bytes in the file than it wrote
        detail += ": the write stopped short, as on a full disk or past a file-size limit"
    return detail


def load_batch(path: str | os.PathLike) -> Any:
    """A calibration or sample batch: a tensor, tuple or dict saved with ``torch.save``, an
    ``.npy`` array, an ``.npz`` of named arrays (keyword inputs), or ``.safetensors`` (one
    tensor: positional input; several: keyword inputs)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        if not path.is_file():
            msg = f"{path}: no such file" if not path.exists() else f"{path}: not a file"
            raise CheckpointError(msg)
        try:
            loaded = np.load(path, allow_pickle=False)
            if suffix == ".npy":
                return _from_numpy(loaded)
            with loaded:
                return {name: _from_numpy(loaded[name]) for name in loaded.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, TypeError) as exc:
            what = "array file" if suffix == ".npy" else "archive of named arrays"
            msg = f"{path}: not a readable NumPy {what} ({type(exc).__name__}: {exc})"
            raise CheckpointError(msg) from exc
    batch = load_checkpoint(path)
    if isinstance(batch, Mapping) and file_format(path) == "safetensors" and len(batch) == 1:
        return next(iter(batch.values()))
    if isinstance(batch, list):
        return tuple(batch)
    if not isinstance(batch, (Tensor, tuple, Mapping)):
        msg = f"{path}: holds a {type(batch).__name__}; a batch is a tensor, a tuple of tensors or a dict of tensors"
        raise CheckpointError(msg)
    return batch



def _from_numpy(array: np.ndarray) -> Tensor:
    """A tensor with the array's shape (0-d stays 0-d), its own copy of the data, native byte
    order; an object or unsupported dtype raises TypeError."""
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("="), copy=True))


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file's header (``{"format": "pt"}``), or None for a
    file without one or in another format, to carry over to an output made from it."""
    from safetensors import SafetensorError, safe_open

    path = Path(files_of(path)[-1])  # a sharded checkpoint's: that of its shards
    if not path.is_file() or file_format(path) != "safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            return file.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        msg = f"{path}: not a readable safetensors file ({exc})"
        raise CheckpointError(msg) from exc


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        msg = f"{path}: not a readable safetensors file ({exc})"
        raise CheckpointError(msg) from exc


def _save_safetensors(state_dict: Mapping[str, Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for key, value in state_dict.items():  # safetensors refuses shared storage: store copies
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.detach().clone().contiguous() if storage in seen else value.detach().contiguous()
        seen.add(storage)
    save_file(tensors, path, metadata=dict(metadata) if metadata else None)
