"""Saving pruned models honestly: the "size" objective is the bytes of these files on disk.

Depends on torch and safetensors only (and autoprune's error types).  A saved model is a directory
with two open files (:mod:`autoprune.weights_format` describes them):

``model.safetensors`` -- the tensors (state dict and non-persistent buffers) as safetensors: dense
    tensors as they are, mostly-zero ones as a uint8 bitmask beside their non-zero values, int8
    weights as their integers and scales; how each is stored is JSON in the file's header.
``architecture.json`` -- the pruned architecture as data: every module's class and the attributes
    pruning changes (channels, features, heads, blocks replaced by ``nn.Identity``), the tensors'
    names; rebuilt by class name or from the user's model factory, then the tensors are loaded.
    Nothing is unpickled, except for a model whose architecture cannot be described as data and
    whose factory is unknown: its JSON then carries the old pickled skeleton (a warning says so).

``load_model`` still reads the previous format, below: ``weights.pt`` + ``skeleton.pt``
(:data:`LEGACY_WEIGHTS_FILE`, :data:`LEGACY_SKELETON_FILE`), what trials of older autoprune have.

Legacy format
=============

``weights.pt`` -- the state dict, in a sparse-aware format (below).
``skeleton.pt`` -- the architecture: the model itself, deep-copied with every parameter and
    persistent buffer replaced by a tensor on the ``meta`` device (shape and dtype, no data),
    pickled with ``torch.save``.  Structured pruning changes shapes, replaces blocks with
    ``nn.Identity`` or swaps attention modules, so the class's default constructor cannot
    rebuild a pruned model; the skeleton records exactly what is there.

Weights file format (version 2)
-------------------------------
``torch.save`` of a plain dict, loadable with ``torch.load(path, weights_only=True)``::

    {"format": "autoprune.sparse_state_dict",
     "version": 2,
     "tensors": {name: entry, ...}}          # in state-dict order

Version 2 adds the quantized entry below; files of version 1 (no quantized entries) are
still read.

Each ``entry`` is one of:

* a ``Tensor`` -- stored densely (contiguous, on CPU, its own exactly-sized storage, so a view
  never drags its base tensor's storage into the file);
* ``{"shape": [int, ...], "dtype": "torch.float32", "mask": uint8 Tensor, "values": Tensor}`` --
  stored sparsely.  **How zeros are stored:** ``mask`` has one bit per element of the tensor in
  row-major (C) order, packed 8 per byte with the first element in the most significant bit
  (like ``numpy.packbits(bitorder="big")``), padding bits 0; a bit is 1 when the element is not
  all-zero bits.  ``values`` holds the elements whose bit is 1, in the same order and dtype.
  Zeros therefore cost one bit each and nothing else.  "Zero" means ``== 0``: NaN is kept as a
  value, and ``-0.0`` is stored as a zero and comes back as ``+0.0`` (equal under ``==`` and
  ``torch.equal``; only the sign bit of a zero is lost).  This matters: ``torch.nn.utils.prune``
  multiplies by its mask, so about half of the pruned weights are ``-0.0``.  All other values
  round-trip bit-exactly;
* ``{"alias": other_name}`` -- the tensor is the very same tensor as an earlier entry (tied
  weights), stored once;
* ``{"quantized": "torch.qint8", "qscheme": "per_tensor_affine", "scale": float64 Tensor,
  "zero_point": int64 Tensor, "int_repr": entry}`` -- a quantized tensor (``qint8``, ``quint8``
  or ``qint32``; per-tensor, or ``"per_channel_affine"`` with 1-D ``scale`` / ``zero_point``
  and an ``"axis"``).  ``int_repr`` holds its integers (``Tensor.int_repr()``: int8 for
  qint8) as a dense tensor or a sparse entry as above, so integer zeros cost one bit.
  autoprune quantizes with symmetric qint8 (zero point 0), where the integer 0 is exactly the
  float 0.0: unstructured-pruned zeros stay one bit each.  Rebuilt bit-exactly with
  ``torch._make_per_tensor_quantized_tensor`` / ``torch._make_per_channel_quantized_tensor``.

A tensor is stored sparsely only when that is smaller: when
``ceil(numel / 8) + nnz * itemsize + SPARSE_OVERHEAD_BYTES < numel * itemsize``, where
``SPARSE_OVERHEAD_BYTES`` covers the extra storage record ``torch.save`` writes.  So a dense
(or structured-pruned) tensor costs what it would in a plain ``torch.save`` of the state dict,
and a 90 %-zero float32 tensor costs about 1/8 + 1/10 of its dense size (a 90 %-zero int8
``int_repr`` about 1/8 + 1/10 of its int8 size).  Sparse-layout tensors and dtypes that cannot
be compared with 0 are always stored densely.

Skeletons
---------
``torch.load(skeleton, weights_only=False)`` unpickles arbitrary objects: only load skeleton
files this tool wrote itself.  Unpickling needs the model's classes importable under the same
module paths as when saving.  So that a file planted in a shared work dir is never unpickled,
the driver stores :func:`digests` (sha256 of both files' bytes) in the Optuna trial
(:data:`FILES_ATTR`) when it writes them, and ``load_model(directory, expected=digests)``
refuses a file whose digest differs or is not stored, before unpickling anything.

Rebuilding materialises each meta tensor as an uninitialised CPU tensor (what
``Module.to_empty(device="cpu")`` does, but done by hand so that tied parameters stay tied and
non-persistent buffers keep their values) and then loads the weights with
``load_state_dict(strict=True)``.  Persistent buffers such as BatchNorm's ``running_mean``,
``running_var`` and ``num_batches_tracked`` are in the state dict and come back exactly.
Non-persistent buffers (``register_buffer(..., persistent=False)``) are not in the state dict:
they are kept *with their data* in the skeleton (and so counted in ``skeleton_bytes``).  Other
plain tensor attributes of modules are pickled with their data in the skeleton too.

Int8 dynamically quantized Linear layers (``torch.ao.nn.quantized.dynamic.Linear``, what
:func:`autoprune.quantize.quantize_model` makes) keep their weights in packed parameters, which
neither a state dict entry (``_packed_params`` is a tuple, its ``dtype`` a ``torch.dtype``) nor
the meta device can hold.  ``save_model`` therefore writes, for each such layer ``L``, the
entries ``L.weight`` (a quantized entry: int8 + scale + zero point) and ``L.bias`` (float32, when
the layer has one) into the weights file, and puts a
:class:`~autoprune.quantize.QuantizedLinearSlot` (sizes only, no data) in the skeleton;
``load_model`` loads everything else with ``strict=True`` and then replaces each slot by a quantized
Linear rebuilt from those two entries, so the reloaded model computes exactly what the quantized
model did.  (The unused output ``scale``/``zero_point`` of a dynamic layer are not stored; they keep
their defaults 1.0 / 0.)  Only ``qint8`` dynamic Linear layers are supported; other quantized
modules (static, float16 dynamic) make ``save_model`` raise ``TypeError``.

Not supported (``save_model`` raises ``ValueError``; both formats): modules still carrying
``torch.nn.utils.prune`` re-parametrisation hooks or ``torch.nn.utils.parametrize``
parametrisations -- make pruning permanent first (``prune.remove``), so the zeros live in the
weights.  State-dict entries that are not tensors (``get_extra_state``) raise ``TypeError``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from . import quantize, weights_format

__all__ = [
    "FILES_ATTR",
    "FORMAT",
    "FORMAT_VERSION",
    "LEGACY_SKELETON_FILE",
    "LEGACY_WEIGHTS_FILE",
    "READABLE_VERSIONS",
    "SKELETON_FILE",
    "SPARSE_OVERHEAD_BYTES",
    "WEIGHTS_FILE",
    "ModelFiles",
    "digests",
    "file_digests",
    "has_model_files",
    "load_model",
    "load_weights",
    "model_size_bytes",
    "save_model",
    "save_weights",
]

FORMAT = "autoprune.sparse_state_dict"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "model.safetensors"
SKELETON_FILE = "architecture.json"
"""The architecture file (the name is kept from the skeleton it replaces, for the driver and the digests)."""
LEGACY_WEIGHTS_FILE = "weights.pt"
LEGACY_SKELETON_FILE = "skeleton.pt"
FILES_ATTR = "autoprune.files"
"""Optuna trial user attribute: :func:`digests` of the trial's two files, stored by the driver that wrote them;
the only source of truth that lets :func:`load_model` rebuild a trial's model (unpickle a legacy skeleton, call
the factory an architecture file names)."""
# Extra bytes torch.save writes for a sparse entry compared with a dense one (one more storage
# record in the zip archive, alignment, the small dict); measured about 380 with torch 2.13.
SPARSE_OVERHEAD_BYTES = 512


# --------------------------------------------------------------------------- weights


def _dense_copy(t: Tensor) -> Tensor:
    """CPU, contiguous, with a storage exactly its own size (never a view of a larger storage)."""
    t = t.detach().to("cpu")
    if t.layout != torch.strided or t.is_quantized:
        return t.clone()
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


def _encode_quantized(t: Tensor) -> dict[str, object]:
    t = t.detach().to("cpu")
    scheme = t.qscheme()
    entry: dict[str, object] = {"quantized": str(t.dtype)}
    if scheme in _PER_TENSOR:
        entry.update(qscheme="per_tensor_affine", scale=torch.tensor(t.q_scale(), dtype=torch.float64),
                     zero_point=torch.tensor(t.q_zero_point(), dtype=torch.int64))
    elif scheme in _PER_CHANNEL:
        entry.update(qscheme="per_channel_affine", scale=t.q_per_channel_scales().to(torch.float64).clone(),
                     zero_point=t.q_per_channel_zero_points().to(torch.int64).clone(),
                     axis=int(t.q_per_channel_axis()))
    else:
        raise TypeError(f"quantized tensor with qscheme {scheme} cannot be saved")
    entry["int_repr"] = _encode(t.int_repr())
    return entry


def _decode_quantized(name: str, entry: dict[str, object]) -> Tensor:
    try:
        dtype_name, scheme, scale, zero_point = (entry["quantized"], entry["qscheme"], entry["scale"],
                                                 entry["zero_point"])
        ints = entry["int_repr"]
    except KeyError as exc:
        raise ValueError(f"weights entry {name!r}: malformed quantized entry") from exc
    ints = _decode(name, ints) if isinstance(ints, dict) else ints
    if not isinstance(ints, Tensor) or not isinstance(scale, Tensor) or not isinstance(zero_point, Tensor):
        raise ValueError(f"weights entry {name!r}: malformed quantized entry")
    with quantize.quiet():
        if scheme == "per_tensor_affine":
            q = torch._make_per_tensor_quantized_tensor(ints, float(scale), int(zero_point))
        elif scheme == "per_channel_affine":
            q = torch._make_per_channel_quantized_tensor(ints, scale, zero_point, int(entry["axis"]))
        else:
            raise ValueError(f"weights entry {name!r}: unknown qscheme {scheme!r}")
    if str(q.dtype) != dtype_name:
        raise ValueError(f"weights entry {name!r}: integers of dtype {ints.dtype} make {q.dtype}, not {dtype_name}")
    return q


def _encode(t: Tensor) -> Tensor | dict[str, object]:
    if t.is_quantized:
        return _encode_quantized(t)
    dense = _dense_copy(t)
    if dense.layout != torch.strided or dense.numel() == 0:
        return dense
    try:
        nonzero = dense.reshape(-1) != 0
    except (RuntimeError, TypeError):  # a dtype without comparison (e.g. some float8 builds)
        return dense
    n = dense.numel()
    itemsize = dense.element_size()
    nnz = int(nonzero.sum().item())
    sparse_bytes = (n + 7) // 8 + nnz * itemsize + SPARSE_OVERHEAD_BYTES
    if sparse_bytes >= n * itemsize:
        return dense
    return {
        "shape": list(dense.shape),
        "dtype": str(dense.dtype),
        "mask": weights_format.pack_bits(nonzero),
        "values": dense.reshape(-1)[nonzero].clone(),
    }


def _decode(name: str, entry: dict[str, object]) -> Tensor:
    try:
        shape = [int(s) for s in entry["shape"]]  # type: ignore[union-attr]
        mask = entry["mask"]
        values = entry["values"]
        dtype_name = entry["dtype"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"weights entry {name!r}: malformed sparse entry") from exc
    if not isinstance(mask, Tensor) or not isinstance(values, Tensor) or mask.dtype != torch.uint8:
        raise ValueError(f"weights entry {name!r}: mask must be a uint8 tensor and values a tensor")
    if str(values.dtype) != dtype_name:
        raise ValueError(f"weights entry {name!r}: values dtype {values.dtype} != {dtype_name}")
    return weights_format.scatter_bitmask(name, mask, values, shape)  # FormatError is a ValueError


def _alias_key(t: Tensor) -> tuple[object, ...] | None:
    if t.layout != torch.strided or t.is_quantized or t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _atomic_torch_save(obj: object, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            torch.save(obj, tmp)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            # A class defined in a notebook or script (``__main__``) cannot be pickled by reference where it
            # is not importable (a Ray worker): cloudpickle stores such classes by value, others by reference.
            try:
                import cloudpickle
            except ImportError:
                raise exc from None
            torch.save(obj, tmp, pickle_module=cloudpickle)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def save_weights(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str]) -> int:
    """Write ``state_dict`` in the sparse-aware format (module docstring); return bytes written.

    Tensors are written from CPU copies; dtypes, shapes and values are preserved (bit-exact except
    that ``-0.0`` becomes ``+0.0`` in sparse entries).
    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    tensors: dict[str, object] = {}
    seen: dict[tuple[object, ...], str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state_dict[{name!r}] is {type(t).__name__}, not a Tensor")
        key = _alias_key(t)
        if key is not None and key in seen:
            tensors[name] = {"alias": seen[key]}
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = _encode(t)
    return _atomic_torch_save({"format": FORMAT, "version": FORMAT_VERSION, "tensors": tensors}, Path(path))


def load_weights(path: str | os.PathLike[str], data: bytes | None = None) -> dict[str, Tensor]:
    """Read a file written by :func:`save_weights` (with ``weights_only=True``) into a state dict
    (from ``data``, the file's bytes already read, when given; ``path`` then only names it).

    Aliased entries (tied weights) come back as the same tensor object. A file in the open format
    (``model.safetensors``, :mod:`autoprune.weights_format`) is read as such.
    """
    raw = Path(path).read_bytes() if data is None else data
    if weights_format.is_weights_file(raw):
        return weights_format.read_weights(raw)
    blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not an autoprune weights file")
    if blob.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported weights format version {blob.get('version')!r}")
    out: dict[str, Tensor] = {}
    for name, entry in blob["tensors"].items():
        if isinstance(entry, Tensor):
            out[name] = entry
        elif isinstance(entry, dict) and "alias" in entry:
            target = entry["alias"]
            if target not in out:
                raise ValueError(f"{path}: entry {name!r} aliases unknown entry {target!r}")
            out[name] = out[target]
        elif isinstance(entry, dict) and "quantized" in entry:
            out[name] = _decode_quantized(name, entry)
        elif isinstance(entry, dict):
            out[name] = _decode(name, entry)
        else:
            raise ValueError(f"{path}: entry {name!r} has unexpected type {type(entry).__name__}")
    return out


# --------------------------------------------------------------------------- whole models


@dataclass(frozen=True)
class ModelFiles:
    """The two files of a saved model and their sizes in bytes."""

    weights_path: Path
    skeleton_path: Path
    weights_bytes: int
    skeleton_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.skeleton_bytes


def _check_saveable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        where = name or "<root>"
        if parametrize.is_parametrized(module):
            raise ValueError(
                f"module {where!r} has torch.nn.utils.parametrize parametrizations: "
                "remove them (parametrize.remove_parametrizations) before saving"
            )
        masked = [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        if masked:
            raise ValueError(
                f"module {where!r} carries a torch.nn.utils.prune mask: "
                "call prune.remove(module, name) before saving so the zeros are in the weights"
            )


def _quantized_slots(model: nn.Module) -> dict[str, quantize.QuantizedLinearSlot]:
    """A :class:`~autoprune.quantize.QuantizedLinearSlot` for each quantized Linear, by module name."""
    slots = {}
    for name, module in model.named_modules():
        if quantize.is_quantized_linear(module) and not isinstance(module, nn.Linear):  # legacy torch.ao layers
            weight, bias = module._weight_bias()
            if weight.dtype != torch.qint8:
                raise TypeError(f"module {name or '<root>'!r}: only qint8 dynamic quantized Linear layers can be "
                                f"saved, not {weight.dtype}")
            slots[name] = quantize.QuantizedLinearSlot(module.in_features, module.out_features, bias is not None,
                                                       str(weight.dtype))
        elif module.__class__.__module__.startswith("torch.ao.nn.quantized") and not any(
            name.startswith(f"{slot}.") for slot in slots
        ):
            raise TypeError(f"module {name or '<root>'!r}: {type(module).__name__} cannot be saved; only int8 "
                            "dynamic quantized Linear layers are supported")
    return slots


def _saveable_state(model: nn.Module, slots: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """``model.state_dict()`` with each quantized Linear's packed entries replaced by ``weight`` / ``bias``."""
    state = model.state_dict()
    if not slots:
        return state
    modules = dict(model.named_modules())
    prefixes = {name: f"{name}." if name else "" for name in slots}
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for key, value in state.items():
        owner = next((name for name, prefix in prefixes.items() if key.startswith(prefix)), None)
        if owner is None:
            out[key] = value
            continue
        if owner not in done:
            weight, bias = modules[owner]._weight_bias()
            out[prefixes[owner] + "weight"] = weight
            if bias is not None:
                out[prefixes[owner] + "bias"] = bias.detach()
            done.add(owner)
    return out


def _meta_skeleton(model: nn.Module, slots: Mapping[str, nn.Module] | None = None) -> nn.Module:
    """Deep copy of ``model`` with parameters and persistent buffers on ``meta``; ties kept.

    Modules named in ``slots`` are replaced by the given placeholder (quantized layers).
    """
    memo: dict[int, object] = {}
    modules = dict(model.named_modules())
    for name, slot in (slots or {}).items():
        if not name:
            raise TypeError("the whole model is a quantized Linear layer; wrap it in a container to save it")
        memo[id(modules[name])] = slot
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for key, b in module._buffers.items():
            if b is None or key in module._non_persistent_buffers_set or id(b) in memo:
                continue
            memo[id(b)] = torch.empty_like(b, device="meta")
    # deepcopy consults the memo first: parameters and persistent buffers are replaced by their
    # meta twins (shared ones by the same twin), everything else is copied, the model untouched.
    return copy.deepcopy(model, memo)


def _materialize(skeleton: nn.Module) -> None:
    """Replace meta parameters/buffers by uninitialised CPU tensors, keeping shared ones shared."""
    memo: dict[int, Tensor] = {}
    for module in skeleton.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(
                        torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad
                    )
                module._parameters[key] = memo[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                if id(b) not in memo:
                    memo[id(b)] = torch.empty_like(b, device="cpu")
                module._buffers[key] = memo[id(b)]


def _atomic_write(data: bytes, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def save_model(model: nn.Module, directory: str | os.PathLike[str]) -> ModelFiles:
    """Save ``model`` as ``directory/model.safetensors`` + ``directory/architecture.json``; ``model`` is not
    changed. Each file is written to a temporary name and renamed, so a crash never leaves half a file.

    See the module docstring (and :mod:`autoprune.weights_format`) for what each file holds and what is not
    supported; legacy ``torch.ao`` quantized layers raise ``TypeError`` (autoprune quantizes with torchao).
    """
    _check_saveable(model)
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            raise TypeError(f"module {name or '<root>'!r}: {type(module).__name__} (torch.ao quantization) cannot be "
                            "saved in the open format; quantize with autoprune.quantize.quantize_model (torchao)")
    directory = Path(directory)
    weights_path = directory / WEIGHTS_FILE
    skeleton_path = directory / SKELETON_FILE
    skeleton_bytes = _atomic_write(weights_format.architecture_bytes(model), skeleton_path)
    weights_bytes = _atomic_write(weights_format.weights_bytes(weights_format.model_tensors(model)), weights_path)
    return ModelFiles(weights_path=weights_path, skeleton_path=skeleton_path, weights_bytes=weights_bytes,
                      skeleton_bytes=skeleton_bytes)


def _save_model_legacy(model: nn.Module, directory: str | os.PathLike[str]) -> ModelFiles:
    """Save ``model`` in the legacy format (``weights.pt`` + pickled ``skeleton.pt``), what older autoprune
    wrote; kept so that tests make old-format trials with the very code that wrote them."""
    _check_saveable(model)
    directory = Path(directory)
    weights_path = directory / LEGACY_WEIGHTS_FILE
    skeleton_path = directory / LEGACY_SKELETON_FILE
    slots = _quantized_slots(model)
    skeleton = _meta_skeleton(model, slots)
    skeleton_bytes = _atomic_torch_save(skeleton, skeleton_path)
    weights_bytes = save_weights(_saveable_state(model, slots), weights_path)
    return ModelFiles(
        weights_path=weights_path,
        skeleton_path=skeleton_path,
        weights_bytes=weights_bytes,
        skeleton_bytes=skeleton_bytes,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digests(weights: bytes, skeleton: bytes) -> dict[str, str]:
    """The sha256 (hex) of a saved model's two files, from their bytes, by file name:
    ``{"model.safetensors": ..., "architecture.json": ...}``.

    The driver stores this as the trial's user attribute :data:`FILES_ATTR` when it writes the files;
    :func:`load_model` given it as ``expected`` refuses files that differ (a planted file could name code to
    run: a factory, or a legacy pickled skeleton)."""
    return {WEIGHTS_FILE: _sha256(weights), SKELETON_FILE: _sha256(skeleton)}


def _file_names(directory: Path) -> tuple[str, str]:
    """``(weights, architecture)`` file names in ``directory``: the open format's, or the legacy ones when only
    those are there (a trial of an older autoprune)."""
    if not (directory / WEIGHTS_FILE).exists() and (directory / LEGACY_WEIGHTS_FILE).exists():
        return LEGACY_WEIGHTS_FILE, LEGACY_SKELETON_FILE
    return WEIGHTS_FILE, SKELETON_FILE


def has_model_files(directory: str | os.PathLike[str], *, both: bool = False) -> bool:
    """Whether ``directory`` holds a saved model's weights file (with ``both``: its two files), either format.
    (A model whose architecture file alone is missing is reported by :func:`load_model`, naming the file.)"""
    directory = Path(directory)
    names = _file_names(directory)
    return all((directory / name).is_file() for name in (names if both else names[:1]))


def file_digests(directory: str | os.PathLike[str]) -> dict[str, str]:
    """The sha256 of the two files in ``directory`` by name (as :func:`digests`; legacy names for a legacy model)."""
    directory = Path(directory)
    return {name: _sha256((directory / name).read_bytes()) for name in _file_names(directory)}


def _read_checked(directory: Path, expected: Mapping[str, str] | None,
                  names: tuple[str, str] = (SKELETON_FILE, WEIGHTS_FILE)) -> dict[str, bytes]:
    """The bytes of both files, each checked against its digest in ``expected`` (when given); one-line errors."""
    from .errors import AutopruneError

    data = {}
    for name in names:
        path = directory / name
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "is missing"
            raise AutopruneError(f"model file {path} {what}: the trial's model files are incomplete "
                                 "(only complete trials have them; see 'autoprune front')")
        try:
            data[name] = path.read_bytes()
        except OSError as exc:
            raise AutopruneError(f"model file {path}: cannot read: {exc.strerror or exc}") from None
        if expected is None:
            continue
        want = expected.get(name)
        if not want:
            raise AutopruneError(f"model file {path}: the study stores no digest for it (written by an older "
                                 "autoprune, or not by this study's driver): refusing to load it, since loading "
                                 "the files may run code (a factory they name, a pickled skeleton)")
        got = _sha256(data[name])
        if got != want:
            raise AutopruneError(f"model file {path}: sha256 {got[:16]}..., expected {want[:16]}... as stored in "
                                 "the study when it was written: the file was changed or replaced since; refusing "
                                 "to load it, since loading the files may run code (a factory they name, a pickled "
                                 "skeleton)")
    return data


def load_model(directory: str | os.PathLike[str], expected: Mapping[str, str] | None = None,
               factory: Callable[[], nn.Module] | nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or by an older autoprune), on CPU, in eval mode.

    ``expected`` (:func:`digests` of the files as written; a trial's :data:`FILES_ATTR`): a file whose
    sha256 differs, or has no digest there, is refused with :class:`~autoprune.errors.AutopruneError`
    before anything is read. Always pass it for files in a work dir. ``None`` skips that check: only for
    files this process wrote itself, since an architecture file may name a model factory to call, and a
    legacy skeleton (or the pickled fallback of :mod:`autoprune.weights_format`) runs whatever code it holds.
    ``factory``: the dense model, or a callable returning it (the user's model factory); its modules are
    reused and resized; without it the one the architecture file records is used where needed.
    Missing, unreadable or truncated files are one-line :class:`~autoprune.errors.AutopruneError` s too.
    """
    from .errors import AutopruneError

    directory = Path(directory)
    names = _file_names(directory)
    data = _read_checked(directory, expected, names[::-1])
    if names[0] == WEIGHTS_FILE:
        try:
            arch = weights_format.read_architecture(data[SKELETON_FILE])
        except weights_format.FormatError as exc:
            raise AutopruneError(f"model file {directory / SKELETON_FILE}: cannot read the architecture "
                                 f"(damaged or truncated?): {exc}") from None
        try:
            tensors = weights_format.read_weights(data[WEIGHTS_FILE])
        except Exception as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise AutopruneError(f"model file {directory / WEIGHTS_FILE}: cannot read the weights (damaged or "
                                 f"truncated?): {type(exc).__name__}: {line}") from None
        try:
            return weights_format.rebuild(arch, tensors, factory)
        except Exception as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise AutopruneError(f"model files in {directory}: cannot rebuild the model: {type(exc).__name__}: "
                                 f"{line[:500]}") from None
    return _load_model_legacy(directory, data)


def _load_model_legacy(directory: Path, data: Mapping[str, bytes]) -> nn.Module:
    """The legacy format's reader: unpickle ``skeleton.pt``, load ``weights.pt`` (bytes already checked)."""
    from .errors import AutopruneError

    path = directory / LEGACY_SKELETON_FILE
    try:
        skeleton = torch.load(io.BytesIO(data[LEGACY_SKELETON_FILE]), map_location="cpu", weights_only=False)
    except Exception as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AutopruneError(f"model file {path}: cannot read the model's skeleton (damaged or truncated?): "
                             f"{type(exc).__name__}: {line}") from None
    if not isinstance(skeleton, nn.Module):
        raise AutopruneError(f"model file {path}: expected a pickled torch.nn.Module, got {type(skeleton).__name__}")
    _materialize(skeleton)
    path = directory / LEGACY_WEIGHTS_FILE
    try:
        weights = load_weights(path, data[LEGACY_WEIGHTS_FILE])
    except Exception as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AutopruneError(f"model file {path}: cannot read the weights (damaged or truncated?): "
                             f"{type(exc).__name__}: {line}") from None
    slots = {name: m for name, m in skeleton.named_modules() if isinstance(m, quantize.QuantizedLinearSlot)}
    layers = {}
    for name, slot in slots.items():
        weight = weights.pop(f"{name}.weight", None)
        bias = weights.pop(f"{name}.bias", None)
        if weight is None or not weight.is_quantized:
            raise ValueError(f"{directory}: quantized layer {name!r} has no quantized weight in the weights file")
        layers[name] = slot.build(weight, bias)
    try:
        skeleton.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        lines = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise AutopruneError(f"model files in {directory}: the weights do not fit the skeleton: {lines[:500]}"
                             ) from None
    leftover = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"{directory}: tensors missing from the weights file: {leftover}")
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, child, layer)
    return skeleton.eval()


def model_size_bytes(model: nn.Module) -> int:
    """Total bytes of ``save_model(model, ...)`` (weights + skeleton), via a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="autoprune-size-") as tmp:
        return save_model(model, tmp).total_bytes
