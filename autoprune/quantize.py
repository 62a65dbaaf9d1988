"""Int8 quantization of Linear layers, applied after pruning and fine-tuning, through torchao.

What it does: the weight of every ``nn.Linear`` (exact type; ``nn.MultiheadAttention``'s packed
``out_proj`` is a subclass and is left alone) becomes a torchao ``Int8Tensor`` with
``Int8DynamicActivationInt8WeightConfig``: int8 weights with one *symmetric* scale per output row
(per-row, zero point 0), activations quantized to int8 on the fly, bias kept in float32. The layers
stay ``nn.Linear`` (torchao swaps the weight tensor, not the module), so the model keeps its classes
and its architecture file. Convolutions, norms and embeddings stay float.

Symmetric quantization maps a weight that pruning set to 0.0 to the integer 0: it stays a zero, and
the open weights file (:mod:`autoprune.weights_format`) stores it as one bit. Quantization may add
zeros (weights smaller than half a step round to 0); it never removes one.

Why torchao: torch deprecated ``torch.ao.quantization`` (eager ``quantize_dynamic``) in favour of the
separate ``torchao`` package; torchao 0.18.0 installs beside torch 2.13 (CPU) and its int8 path runs
there. Measured cost (benchmarks/RESULTS.md): on the CPU torchao's int8 Linear runs as a tensor
subclass in eager mode, without the fbgemm kernels torch.ao had, so it is slower than float at small
batches; ``space.quantize: search`` lets the search keep it only where its size pays.

Files written by older autoprune hold ``torch.ao`` dynamically quantized Linear layers
(``QuantizedLinearSlot`` in their skeleton); :mod:`autoprune.model_files` still loads them, with torch's
own legacy classes, and :func:`quiet` silences torch's two known deprecation warnings around that.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import AutopruneError

__all__ = [
    "QuantizedLinearSlot",
    "check_available",
    "is_quantized_linear",
    "is_quantized_weight",
    "parameter_counts",
    "quantize_model",
    "quantized_linears",
    "quantized_weight_from_parts",
    "quantized_weight_parts",
    "quiet",
]

_KNOWN_WARNINGS = (
    r"(?s).*torch\.ao\.quantization is deprecated.*",
    r"(?s).*quantized tensor creation functions.*deprecated.*",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch's two known deprecation warnings about eager-mode quantization (only these)."""
    with warnings.catch_warnings():
        for pattern in _KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def _dynamic_linear_type() -> type[nn.Module] | None:
    try:
        from torch.ao.nn.quantized.dynamic import Linear
    except ImportError:  # pragma: no cover - a torch without eager quantization
        return None
    return Linear


def _torchao() -> Any:
    """``torchao.quantization``, imported quietly (it logs that its CUDA-only extensions do not load on a CPU)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as ao
    except Exception as exc:
        raise AutopruneError(f"int8 quantization needs the torchao package (pip install torchao), which does not "
                             f"import here: {type(exc).__name__}: {exc}; set space.quantize: never") from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return ao


def check_available() -> None:
    """Raise :class:`AutopruneError` unless torchao imports beside this torch and quantizes a Linear layer."""
    ao = _torchao()
    probe = nn.Linear(8, 4)
    try:
        ao.quantize_(probe, _config(ao))
        probe(torch.zeros(1, 8))
    except Exception as exc:
        raise AutopruneError(f"torchao {getattr(sys.modules.get('torchao'), '__version__', '?')} cannot quantize "
                             f"a Linear layer with torch {torch.__version__} here: {type(exc).__name__}: {exc}; "
                             "set space.quantize: never") from None


def _config(ao: Any) -> Any:
    # set_inductor_config=False: quantizing must not change torch.compile's global settings
    return ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def is_quantized_weight(t: object) -> bool:
    """Whether ``t`` is a torchao int8 weight (checked without importing torchao)."""
    return type(t).__name__ == "Int8Tensor" and type(t).__module__.startswith("torchao.")


def is_quantized_linear(module: object) -> bool:
    """A Linear layer with a torchao int8 weight, or a legacy ``torch.ao`` dynamically quantized Linear."""
    if isinstance(module, nn.Linear) and is_quantized_weight(module.weight):
        return True
    linear = _dynamic_linear_type() if "torch.ao.nn.quantized" in type(module).__module__ else None
    return linear is not None and isinstance(module, linear)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The int8 quantized Linear layers of ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if is_quantized_linear(module)}


def quantized_weight_parts(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torchao int8 weight as plain tensors (``qdata``, ``scale``, the optional ones it has) and its
    settings as JSON, so that it is stored as data (:mod:`autoprune.weights_format`)."""
    parts = {name: getattr(t, name) for name in [*t.tensor_data_names, *t.optional_tensor_data_names]
             if getattr(t, name, None) is not None}
    act = t.act_quant_kwargs
    settings = {"class": "torchao.Int8Tensor", "block_size": [int(b) for b in t.block_size],
                "dtype": str(t.dtype).removeprefix("torch."), "reduce_range": bool(t.reduce_range),
                "act": None if act is None else {
                    "granularity": type(act.granularity).__name__,
                    "granularity_fields": dataclasses.asdict(act.granularity)
                    if dataclasses.is_dataclass(act.granularity) else {},
                    "mapping_type": act.mapping_type.name, "reduce_range": bool(act.reduce_range)}}
    return parts, settings


def quantized_weight_from_parts(parts: dict[str, torch.Tensor], settings: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`quantized_weight_parts`: the same int8 weight, bit for bit."""
    if settings.get("class") != "torchao.Int8Tensor":
        raise ValueError(f"unknown quantized weight class {settings.get('class')!r}")
    ao = _torchao()
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    act = settings.get("act")
    kwargs = None
    if act is not None:
        granularity = getattr(ao, act["granularity"])(**act.get("granularity_fields", {}))
        kwargs = QuantizeTensorToInt8Kwargs(granularity=granularity, mapping_type=ao.MappingType[act["mapping_type"]],
                                            reduce_range=act["reduce_range"])
    return ao.Int8Tensor(parts.pop("qdata"), parts.pop("scale"), list(settings["block_size"]),
                         getattr(torch, settings["dtype"]), **parts, act_quant_kwargs=kwargs,
                         reduce_range=settings["reduce_range"])


def quantize_model(model: nn.Module, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """An int8 quantized copy of ``model`` (eval mode, torchao, module docstring); ``model`` is not changed.

    ``nn.TransformerEncoderLayer``'s fused fast path reads its Linear layers' float ``weight``
    tensors: it is switched off on the copy's layers (the regular path computes the same). With
    ``example_inputs`` the quantized copy is run once, and a failure (some other module reading a
    Linear's ``weight`` directly) raises a clear error.

    Raises :class:`AutopruneError` when quantization is unavailable or the model has no
    ``nn.Linear`` to quantize (asking for it would then be a dead option).
    """
    ao = _torchao()
    if not any(type(m) is nn.Linear for m in model.modules()):
        raise AutopruneError("quantize: the model has no nn.Linear layer; int8 dynamic quantization "
                             "covers Linear layers only (set space.quantize: never)")
    quantized = copy.deepcopy(model).eval()
    with torch.no_grad():
        ao.quantize_(quantized, _config(ao), filter_fn=lambda module, _: type(module) is nn.Linear)
    for module in quantized.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(
            is_quantized_linear(getattr(module, name, None)) for name in ("linear1", "linear2")
        ):
            module.activation_relu_or_gelu = 0  # only gates the fast path; forward uses .activation
    quantized.eval()
    if example_inputs is not None:
        try:
            with torch.no_grad():
                quantized(example_inputs)
        except Exception as error:
            raise AutopruneError(f"quantize: the int8 model no longer runs ({type(error).__name__}: {error}); a "
                                 "module reads a Linear layer's weight directly; set space.quantize: never") from error
    return quantized


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(total, non_zero)`` parameter elements, counting quantized Linear weights and biases too.

    A torchao int8 weight element counts as zero when its integer is 0 (symmetric: zero point 0),
    what the weights file stores as a zero; a legacy ``torch.ao`` quantized Linear keeps its weight in
    packed params, which ``parameters()`` does not see, and is counted from them.
    """
    total = non_zero = 0
    for p in model.parameters():
        data = p.qdata if is_quantized_weight(p) else p.detach()
        total += data.numel()
        non_zero += int(torch.count_nonzero(data).item())
    for module in quantized_linears(model).values():
        if isinstance(module, nn.Linear):
            continue  # torchao: counted above
        weight, bias = module._weight_bias()
        ints = weight.int_repr()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            zero = weight.q_zero_point()
        else:
            shape = [1] * ints.dim()
            shape[weight.q_per_channel_axis()] = -1
            zero = weight.q_per_channel_zero_points().view(shape)
        total += ints.numel()
        non_zero += int((ints.to(torch.int64) != zero).sum().item())
        if bias is not None:
            total += bias.numel()
            non_zero += int(torch.count_nonzero(bias.detach()).item())
    return total, non_zero


class QuantizedLinearSlot(nn.Module):
    """Stands in a saved skeleton where a quantized Linear was (its packed weights cannot live on
    the meta device); :func:`autoprune.model_files.load_model` replaces it by the real layer."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, dtype: str = "torch.qint8") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = has_bias
        self.dtype = dtype

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("QuantizedLinearSlot is a placeholder in a saved skeleton; load the model with "
                           "autoprune.model_files.load_model")

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """The quantized Linear this slot stands for, holding ``weight`` (a qint8 tensor) and ``bias``."""
        linear = _dynamic_linear_type()
        if linear is None:  # pragma: no cover
            raise AutopruneError(f"this torch {torch.__version__} cannot rebuild quantized Linear layers")
        if tuple(weight.shape) != (self.out_features, self.in_features) or (bias is None) == self.has_bias:
            raise ValueError(f"quantized Linear {self.out_features}x{self.in_features} (bias={self.has_bias}) got "
                             f"weight {tuple(weight.shape)} and bias {None if bias is None else tuple(bias.shape)}")
        with quiet():
            module = linear(self.in_features, self.out_features, bias_=self.has_bias, dtype=weight.dtype)
            module.set_weight_bias(weight, bias)
        return module.eval()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, {self.dtype}"
