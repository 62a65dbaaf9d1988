"""Open model files: safetensors weights plus a JSON description of the pruned architecture.

Depends on torch and safetensors only. A trial's model is two files that any tool can read without
unpickling anything (:mod:`autoprune.model_files` writes and reads them; this module holds the format):

``model.safetensors`` -- the tensors, in the safetensors format. Its header metadata (a string map, as
safetensors allows) holds ``format`` (``autoprune.safetensors``), ``version`` (``1``) and ``entries``: a
JSON object that says, for each state-dict entry (and each non-persistent buffer), in order, how it is
stored:

* ``{"dense": key}`` -- the tensor as is, under safetensors key ``key`` (the entry's own name);
* ``{"sparse": {"mask": key_m, "values": key_v, "shape": [...], "dtype": "float32"}}`` -- ``key_m`` is a
  uint8 tensor: one bit per element in row-major order, 8 per byte, first element in the most
  significant bit (``numpy.packbits(bitorder="big")``), padding 0, a bit is 1 when the element is not
  ``== 0``; ``key_v`` holds those elements in order. Zeros cost one bit; ``-0.0`` comes back as ``+0.0``.
  Chosen only when smaller: ``ceil(n / 8) + nnz * itemsize + SPARSE_OVERHEAD_BYTES < n * itemsize``;
* ``{"alias": other}`` -- the very same tensor as an earlier entry (tied weights), stored once;
* ``{"quantized": {...}, "parts": {part: entry}}`` -- a torchao int8 weight
  (:func:`autoprune.quantize.quantized_weight_parts`): its integer data (``qdata``, which may itself be a
  sparse entry: pruned zeros stay zero under symmetric int8), its scales, and its settings as JSON.

Keys of the extra tensors are ``name:mask``, ``name:values``, ``name:qdata``... (``:`` never appears in
a state-dict name that torch makes).

``architecture.json`` -- the pruned architecture as data: ``{"format": "autoprune.architecture",
"version": 1, "factory": ..., "modules": [...], "configs": [...], "fallback": ...}``. ``modules`` lists every module in
``named_modules`` order as ``{"name", "class": "package.module:Class", "attrs", "opaque", "params",
"buffers", "children"}`` (or ``{"name", "same_as": other}`` for a module shared under two names):
``attrs`` are the module's plain attributes -- exactly what pruning changes (Conv ``in_channels`` /
``out_channels`` / ``groups``, Linear ``in_features`` / ``out_features``, BatchNorm ``num_features``,
LayerNorm ``normalized_shape``, attention ``num_heads`` / ``head_dim`` / ``embed_dim`` / ``all_head_size``,
and ``class`` itself where a block became ``nn.Identity`` or attention a ``SlicedMultiheadAttention``);
``params`` / ``buffers`` name the tensors (``requires_grad``; persistent or not; ``null`` for a ``None``
slot), whose shapes are those in the safetensors file; ``children`` the sub-module slots in order.
``opaque`` lists attributes JSON cannot hold (a config object, a function outside torch, hooks, a class
that cannot be imported by name). ``configs`` describes each Hugging Face configuration object
(``PretrainedConfig``) the modules hold, once however many share it: ``{"class", "attrs", "held_by":
[[module, attribute], ...]}``, ``attrs`` being its plain attributes as data. Pruning changes some
(layer removal shrinks ``num_hidden_layers`` and ``layer_types``), and the object itself comes from the
template on rebuilding (below), so they are set back on it; otherwise the reloaded model would carry the
factory's values.

Rebuilding (no unpickling): each module is taken from the *template* -- the dense model from the user's
factory -- when it has a module of the same class under that name, otherwise created by class name
(``cls.__new__`` plus ``nn.Module.__init__``, never the class's own ``__init__``); its recorded attributes
are set, its tensors replaced by the file's (so the shapes are the pruned ones) and its children
re-attached; each recorded config's attributes are set on the object the rebuilt modules hold (attributes
not recorded, such as ones JSON cannot hold, keep the template's values). A template is needed only for
opaque attributes: ``factory`` records the model factory (``module:callable`` and JSON kwargs, remembered
by :func:`remember_factory` when autoprune built the model from a config) or the caller passes one. A model
with opaque attributes and no known factory (a model object given to ``autoprune.Search``, a class defined
in ``__main__``) cannot be rebuilt that way: then, for that model only, ``fallback`` holds the old pickled
skeleton (tensors stripped, base64) and a warning says so; loading it unpickles, so it is read only from
files whose digests match.
"""

from __future__ import annotations

import base64
import copy
import importlib
import io
import json
import logging
import math
import pickle
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from . import quantize

log = logging.getLogger("autoprune")

WEIGHTS_FORMAT = "autoprune.safetensors"
ARCH_FORMAT = "autoprune.architecture"
VERSION = 1
SPARSE_OVERHEAD_BYTES = 160
"""Extra header bytes a sparse entry costs over a dense one in safetensors (a second key, two offsets and
the entry's description: about 120-150 bytes)."""
FACTORY_ATTR = "_autoprune_factory"

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # MSB first
_MANAGED = frozenset(nn.Module().__dict__)  # nn.Module's own bookkeeping: tensors, children, hooks
_OPAQUE = object()


class FormatError(ValueError):
    """A file that does not follow this format (damaged, or not written by autoprune)."""


# --------------------------------------------------------------------------- tensors


def pack_bits(bits: Tensor) -> Tensor:
    """A 1-D bool tensor as uint8, 8 per byte, first element in the most significant bit."""
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = bits.to(torch.uint8)
    return (padded.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a 1-D bool tensor."""
    return ((packed.reshape(-1).unsqueeze(1) >> _SHIFTS) & 1).view(-1)[:n].bool()


def _own_copy(t: Tensor) -> Tensor:
    """CPU, contiguous, its own storage: safetensors refuses tensors that share memory."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


def _encode(name: str, t: Tensor, out: dict[str, Tensor]) -> dict[str, Any]:
    if quantize.is_quantized_weight(t):
        parts, settings = quantize.quantized_weight_parts(t)
        return {"quantized": settings, "parts": {part: _encode(f"{name}:{part}", value, out)
                                                 for part, value in parts.items()}}
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"tensor {name!r}: {t.layout} / {t.dtype} tensors cannot be saved as safetensors")
    dense = _own_copy(t)
    n, itemsize = dense.numel(), dense.element_size()
    try:
        nonzero = dense.reshape(-1) != 0 if n else None
    except (RuntimeError, TypeError):  # a dtype without comparison
        nonzero = None
    if nonzero is not None:
        nnz = int(nonzero.sum().item())
        if (n + 7) // 8 + nnz * itemsize + SPARSE_OVERHEAD_BYTES < n * itemsize:
            out[f"{name}:mask"] = pack_bits(nonzero)
            out[f"{name}:values"] = dense.reshape(-1)[nonzero].clone()
            return {"sparse": {"mask": f"{name}:mask", "values": f"{name}:values", "shape": list(dense.shape),
                               "dtype": str(dense.dtype).removeprefix("torch.")}}
    out[name] = dense
    return {"dense": name}


def _decode(name: str, entry: Mapping[str, Any], stored: Mapping[str, Tensor]) -> Tensor:
    try:
        if "dense" in entry:
            return stored[entry["dense"]]
        if "quantized" in entry:
            parts = {part: _decode(f"{name}:{part}", sub, stored) for part, sub in entry["parts"].items()}
            return quantize.quantized_weight_from_parts(parts, entry["quantized"])
        sparse = entry["sparse"]
        mask, values = stored[sparse["mask"]], stored[sparse["values"]]
        shape = [int(s) for s in sparse["shape"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"weights entry {name!r}: malformed ({type(exc).__name__}: {exc})") from None
    if mask.dtype != torch.uint8 or str(values.dtype).removeprefix("torch.") != sparse["dtype"]:
        raise FormatError(f"weights entry {name!r}: mask must be uint8 and values {sparse['dtype']}")
    return scatter_bitmask(name, mask, values, shape)


def scatter_bitmask(name: str, mask: Tensor, values: Tensor, shape: Sequence[int]) -> Tensor:
    """The dense tensor of ``shape`` holding ``values`` where the packed bits of ``mask`` are set (zeros
    elsewhere); :class:`FormatError` naming entry ``name`` when the sizes do not agree. Shared by this format
    and the legacy pickled one (:mod:`autoprune.model_files`)."""
    n = math.prod(shape)
    if mask.numel() != (n + 7) // 8:
        raise FormatError(f"weights entry {name!r}: mask has {mask.numel()} bytes for {n} elements")
    bits = unpack_bits(mask, n)
    if int(bits.sum().item()) != values.numel():
        raise FormatError(f"weights entry {name!r}: {values.numel()} values for {int(bits.sum())} set bits")
    flat = torch.zeros(n, dtype=values.dtype)
    flat[bits] = values.reshape(-1)
    return flat.reshape(list(shape))


def _alias_key(t: Tensor) -> tuple[object, ...] | None:
    if type(t) not in (Tensor, nn.Parameter) or t.layout != torch.strided or t.numel() == 0:
        return id(t),  # tensor subclasses (quantized weights): tied only when the very same object
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def weights_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    """``tensors`` (a state dict plus non-persistent buffers) as a safetensors file (module docstring)."""
    stored: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    seen: dict[tuple[object, ...], str] = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state_dict[{name!r}] is {type(t).__name__}, not a Tensor")
        key = _alias_key(t)
        if key in seen:
            entries[name] = {"alias": seen[key]}
            continue
        seen[key] = name
        entries[name] = _encode(name, t, stored)
    metadata = {"format": WEIGHTS_FORMAT, "version": str(VERSION), "entries": json.dumps(entries)}
    return st_save(stored, metadata=metadata)


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte length, then JSON)."""
    if len(data) < 8:
        raise FormatError("too short for a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError("not a safetensors file")
    return header.get("__metadata__") or {}


def is_weights_file(data: bytes) -> bool:
    """Whether ``data`` is a safetensors file in this format (rather than the old ``torch.save`` zip)."""
    try:
        return read_metadata(data).get("format") == WEIGHTS_FORMAT
    except FormatError:
        return False


def read_weights(data: bytes) -> dict[str, Tensor]:
    """A state dict (plus non-persistent buffers) from :func:`weights_bytes`; tied entries are one object."""
    metadata = read_metadata(data)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise FormatError("not an autoprune safetensors weights file")
    if metadata.get("version") != str(VERSION):
        raise FormatError(f"unsupported weights format version {metadata.get('version')!r} (reads {VERSION})")
    try:
        entries = json.loads(metadata["entries"])
        stored = st_load(data)
    except Exception as exc:
        raise FormatError(f"{type(exc).__name__}: {exc}") from None
    out: dict[str, Tensor] = {}
    for name, entry in entries.items():
        if isinstance(entry, dict) and "alias" in entry:
            if entry["alias"] not in out:
                raise FormatError(f"entry {name!r} aliases unknown entry {entry['alias']!r}")
            out[name] = out[entry["alias"]]
        elif isinstance(entry, dict):
            out[name] = _decode(name, entry, stored)
        else:
            raise FormatError(f"entry {name!r}: expected an object, got {type(entry).__name__}")
    return out


# --------------------------------------------------------------------------- attribute values as JSON


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(path: str) -> Any:
    module_name, _, qualname = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _importable(obj: Any) -> bool:
    path = f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', '')}"
    if "<locals>" in path or path.startswith(("__main__:", "None:")):
        return False
    try:
        return _resolve(path) is obj
    except Exception:
        return False


def _to_json(value: Any) -> Any:
    """``value`` as JSON (tagged where JSON has no such type), or :data:`_OPAQUE`."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, torch.Size | tuple | list):
        items = [_to_json(v) for v in value]
        if any(v is _OPAQUE for v in items):
            return _OPAQUE
        tag = "__size__" if isinstance(value, torch.Size) else "__tuple__" if isinstance(value, tuple) else None
        return {tag: items} if tag else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _to_json(v) for k, v in value.items()}
        return _OPAQUE if any(v is _OPAQUE for v in items.values()) else {"__dict__": items}
    if callable(value) and str(getattr(value, "__module__", "")).startswith("torch") and _importable(value):
        return {"__ref__": f"{value.__module__}:{value.__qualname__}"}  # e.g. F.relu of a Transformer layer
    return _OPAQUE


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, inner), = value.items()
    if tag == "__float__":
        return float(inner)
    if tag == "__dtype__":
        return getattr(torch, inner)
    if tag == "__device__":
        return torch.device(inner)
    if tag == "__size__":
        return torch.Size(_from_json(inner))
    if tag == "__tuple__":
        return tuple(_from_json(inner))
    if tag == "__dict__":
        return {k: _from_json(v) for k, v in inner.items()}
    if tag == "__ref__" and inner.startswith("torch"):
        return _resolve(inner)
    raise FormatError(f"unknown attribute value {value!r}")


# --------------------------------------------------------------------------- architecture


def remember_factory(model: nn.Module, factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Note on ``model`` the factory call that built it, so that its trials' files can be rebuilt from it
    (kept when the model is copied or sent to a Ray worker); skipped when it cannot be named as data."""
    spec = {"spec": f"{getattr(factory, '__module__', '')}:{getattr(factory, '__qualname__', '')}",
            "kwargs": _to_json(dict(kwargs))}
    if _importable(factory) and spec["kwargs"] is not _OPAQUE:
        model.__dict__[FACTORY_ATTR] = spec


def _module_record(name: str, module: nn.Module) -> dict[str, Any]:
    attrs, opaque = {}, []
    for key, value in module.__dict__.items():
        if key in (FACTORY_ATTR, "extra_repr"):  # extra_repr: torchao's repr of an int8 Linear, cosmetic
            continue
        if key in _MANAGED and key != "training":
            if key not in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set") and value:
                opaque.append(key)  # hooks: only a template has them
            continue
        encoded = _to_json(value)
        if encoded is _OPAQUE:
            opaque.append(key)
        else:
            attrs[key] = encoded
    if not _importable(type(module)):
        opaque.append("<class>")
    return {
        "name": name, "class": _class_path(type(module)), "attrs": attrs, "opaque": opaque,
        "params": {k: None if p is None else p.requires_grad for k, p in module._parameters.items()},
        "buffers": {k: None if b is None else k not in module._non_persistent_buffers_set
                    for k, b in module._buffers.items()},
        "children": {k: c is not None for k, c in module._modules.items()},
    }


def _walk(module: nn.Module, name: str, seen: dict[int, str], out: list[dict[str, Any]]) -> None:
    if id(module) in seen:
        out.append({"name": name, "same_as": seen[id(module)]})
        return
    seen[id(module)] = name
    out.append(_module_record(name, module))
    for key, child in module._modules.items():
        if child is not None:
            _walk(child, f"{name}.{key}" if name else key, seen, out)


def _is_config(value: Any) -> bool:
    """Whether ``value`` is a Hugging Face ``PretrainedConfig`` (``PreTrainedConfig`` in transformers 5), known
    by its class name: this module does not import transformers."""
    return any(c.__name__.lower() == "pretrainedconfig" for c in type(value).__mro__)


def _config_records(model: nn.Module) -> list[dict[str, Any]]:
    """Each configuration object the modules of ``model`` hold, once: its class, its plain attributes as data
    (those JSON cannot hold are left out) and every ``[module, attribute]`` that holds it."""
    records: list[dict[str, Any]] = []
    by_id: dict[int, dict[str, Any]] = {}
    for name, module in model.named_modules():
        for key, value in module.__dict__.items():
            if key in _MANAGED or not _is_config(value):
                continue
            if id(value) not in by_id:
                attrs = {k: encoded for k, v in vars(value).items() if (encoded := _to_json(v)) is not _OPAQUE}
                by_id[id(value)] = {"class": _class_path(type(value)), "attrs": attrs, "held_by": []}
                records.append(by_id[id(value)])
            by_id[id(value)]["held_by"].append([name, key])
    return records


def _restore_configs(records: list[dict[str, Any]], modules: Mapping[str, nn.Module]) -> None:
    """Set each recorded config's attributes on the object the rebuilt modules hold (the template's, which has
    the factory's values: a removed decoder layer's ``num_hidden_layers`` would otherwise come back)."""
    done: set[int] = set()
    for record in records:
        attrs = {key: _from_json(value) for key, value in record["attrs"].items()}
        for module_name, key in record["held_by"]:
            target = modules[module_name].__dict__.get(key) if module_name in modules else None
            if target is None or id(target) in done or not _is_config(target):
                continue
            done.add(id(target))
            target.__dict__.update(attrs)  # as they were read: from the object's __dict__, no setters


def _stripped_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer replaced by ``None`` (their data live in the
    weights file), for the pickled fallback."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None:
                memo[id(t)] = None
    skeleton = copy.deepcopy(model, memo)
    for module in skeleton.modules():
        module.__dict__.pop("extra_repr", None)  # torchao's repr of an int8 Linear: a partial, not picklable
    return skeleton


def _pickled(obj: object) -> bytes:
    """``torch.save`` bytes of ``obj``; a class defined in a notebook or script (``__main__``) cannot be pickled
    by reference where it is not importable (a Ray worker): then cloudpickle stores it by value."""
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
    except (pickle.PicklingError, AttributeError, TypeError):
        import cloudpickle

        buffer = io.BytesIO()
        torch.save(obj, buffer, pickle_module=cloudpickle)
    return buffer.getvalue()


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` plus its non-persistent buffers (which a rebuilt model needs too)."""
    tensors = dict(model.state_dict())
    for module_name, module in model.named_modules():
        for key in module._non_persistent_buffers_set:
            buffer = module._buffers.get(key)
            if buffer is not None:
                tensors[f"{module_name}.{key}" if module_name else key] = buffer
    return tensors


def architecture_bytes(model: nn.Module) -> bytes:
    """``model``'s architecture as JSON (module docstring), with the pickled fallback when it needs one."""
    records: list[dict[str, Any]] = []
    _walk(model, "", {}, records)
    factory = model.__dict__.get(FACTORY_ATTR)
    opaque = {r["name"]: r["opaque"] for r in records if r.get("opaque")}
    fallback = None
    if opaque and factory is None:
        where = ", ".join(f"{name or '<root>'} ({', '.join(keys)})" for name, keys in list(opaque.items())[:3])
        log.warning("model files: %s cannot be described as data and no model factory is known (a model given as "
                    "an object?): its architecture is also stored as a pickled skeleton, which loading unpickles",
                    where)
        fallback = {"reason": f"not describable as data: {where}",
                    "pickled_skeleton": base64.b64encode(_pickled(_stripped_skeleton(model))).decode("ascii")}
    arch = {"format": ARCH_FORMAT, "version": VERSION, "factory": factory, "modules": records,
            "configs": _config_records(model), "fallback": fallback}
    return json.dumps(arch, indent=None, separators=(",", ":"), allow_nan=False).encode()


def read_architecture(data: bytes) -> dict[str, Any]:
    try:
        arch = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not JSON: {exc}") from None
    if not isinstance(arch, dict) or arch.get("format") != ARCH_FORMAT:
        raise FormatError("not an autoprune architecture file")
    if arch.get("version") != VERSION:
        raise FormatError(f"unsupported architecture format version {arch.get('version')!r} (reads {VERSION})")
    return arch


def needs_unpickling(arch: Mapping[str, Any]) -> bool:
    return bool(arch.get("fallback"))


def _template(arch: Mapping[str, Any], factory: Callable[[], nn.Module] | nn.Module | None) -> nn.Module | None:
    if isinstance(factory, nn.Module):
        return copy.deepcopy(factory)
    if factory is not None:
        return factory()
    needed = any(r.get("opaque") for r in arch["modules"])
    recorded = arch.get("factory")
    if not needed or not recorded:
        return None
    target = _resolve(recorded["spec"])
    model = target(**_from_json(recorded["kwargs"]))
    if not isinstance(model, nn.Module):
        raise FormatError(f"factory {recorded['spec']} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _fresh(record: Mapping[str, Any], template: nn.Module | None) -> nn.Module:
    name, cls_path = record["name"], record["class"]
    if template is not None:
        found = dict(template.named_modules(remove_duplicate=False)).get(name)
        if found is not None and _class_path(type(found)) == cls_path:
            return found
    if record.get("opaque"):
        where = f"module {name or '<root>'!r} ({cls_path})"
        raise FormatError(f"{where}: needs the model factory to be rebuilt ({', '.join(record['opaque'])} cannot be "
                          "stored as data) and " + ("the factory's model has no such module there" if template
                                                    is not None else "none is known: pass factory="))
    cls = _resolve(cls_path)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FormatError(f"module {name or '<root>'!r}: {cls_path} is not a torch.nn.Module class")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def rebuild(arch: Mapping[str, Any], tensors: dict[str, Tensor],
            factory: Callable[[], nn.Module] | nn.Module | None = None) -> nn.Module:
    """The model described by ``arch`` holding ``tensors`` (from :func:`read_weights`), on CPU.

    Unpickles the fallback skeleton when ``arch`` has one; callers check the files' digests first.
    """
    fallback = arch.get("fallback")
    if fallback:
        skeleton = torch.load(io.BytesIO(base64.b64decode(fallback["pickled_skeleton"])), weights_only=False)
        named = dict(skeleton.named_modules(remove_duplicate=False))
        modules = {r["name"]: named[r["name"]] for r in arch["modules"]}
    else:
        template = _template(arch, factory)
        modules = {}
        for record in arch["modules"]:
            modules[record["name"]] = (modules[record["same_as"]] if "same_as" in record
                                       else _fresh(record, template))
    unused = dict(tensors)
    params: dict[int, nn.Parameter] = {}

    def take(name: str) -> Tensor:
        if name not in tensors:
            raise FormatError(f"tensor {name!r} is missing from the weights file")
        unused.pop(name, None)
        return tensors[name]

    for record in arch["modules"]:
        if "same_as" in record:
            continue
        name, module = record["name"], modules[record["name"]]
        prefix = f"{name}." if name else ""
        for key in [k for k in module.__dict__ if k not in _MANAGED and k != FACTORY_ATTR
                    and k not in record["attrs"] and k not in record["opaque"]]:
            del module.__dict__[key]  # an attribute the pruned module no longer has
        for key, value in record["attrs"].items():
            module.__dict__[key] = _from_json(value)
        module._parameters, module._buffers, module._non_persistent_buffers_set = {}, {}, set()
        for key, requires_grad in record["params"].items():
            if requires_grad is None:
                module._parameters[key] = None
                continue
            t = take(prefix + key)
            if id(t) not in params:
                grad = requires_grad and not quantize.is_quantized_weight(t)
                params[id(t)] = nn.Parameter(t, requires_grad=grad)
            module._parameters[key] = params[id(t)]
        for key, persistent in record["buffers"].items():
            module._buffers[key] = None if persistent is None else take(prefix + key)
            if persistent is False:
                module._non_persistent_buffers_set.add(key)
        module._modules = {key: modules[prefix + key] if present else None
                           for key, present in record["children"].items()}
    if unused:
        raise FormatError(f"the weights file has tensors the architecture does not use: {sorted(unused)[:5]}")
    _restore_configs(arch.get("configs") or [], modules)  # files of an older autoprune have none
    return modules[""].eval()
