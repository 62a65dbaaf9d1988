"""Int8 dynamic quantization of Linear layers, applied after pruning and fine-tuning (torch only).

What it does: every ``nn.Linear`` (exact type; ``nn.MultiheadAttention``'s packed
``out_proj`` is a subclass and is left alone) becomes a dynamically quantized Linear
(``torch.ao.nn.quantized.dynamic.Linear``): weights stored as ``qint8``, one scale per
tensor, activations quantized on the fly at run time, bias kept in float32. Convolutions,
norms and embeddings stay float: dynamic quantization covers Linear layers only.

It is torch's own ``torch.ao.quantization.quantize_dynamic`` with the default dynamic
qconfig, whose weight observer is *symmetric* per-tensor ``qint8`` (zero point 0), so a
weight that pruning set to 0.0 is quantized to the integer 0 and stays a zero: the
sparse weights file (:mod:`autoprune.model_files`) stores it as one bit. Quantization
may add zeros (weights smaller than half a step round to 0); it never removes one.

Torch deprecation: torch 2.13 still ships ``torch.ao.quantization`` and the quantized
kernels (x86/fbgemm, qnnpack) and they work, but it warns that the API moves to the
separate ``torchao`` package and that quantized tensor creation functions will be
removed. Those two known warnings are silenced *locally* (only around the calls here
and in :mod:`autoprune.model_files`), so a search does not print them once per trial;
any other warning still shows. :func:`check_available` turns a torch without the API
or without a quantized engine into a clear error before a search starts.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .errors import AutopruneError

__all__ = [
    "QuantizedLinearSlot",
    "check_available",
    "is_quantized_linear",
    "parameter_counts",
    "quantize_model",
    "quantized_linears",
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


def check_available() -> None:
    """Raise :class:`AutopruneError` unless this torch can quantize and run int8 dynamic Linear layers."""
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None or _dynamic_linear_type() is None:
        raise AutopruneError(
            f"int8 quantization needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
            "does not have; set space.quantize: never"
        )
    engine = torch.backends.quantized.engine
    if engine in (None, "none"):
        raise AutopruneError(
            f"torch {torch.__version__} has no quantized engine on this CPU "
            f"(supported: {torch.backends.quantized.supported_engines}); set space.quantize: never"
        )


def is_quantized_linear(module: object) -> bool:
    linear = _dynamic_linear_type()
    return linear is not None and isinstance(module, linear)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The dynamically quantized Linear layers of ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if is_quantized_linear(module)}


def quantize_model(model: nn.Module, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """An int8 dynamically quantized copy of ``model`` (eval mode); ``model`` is not changed.

    ``nn.TransformerEncoderLayer``'s fused fast path reads its Linear layers' float ``weight``
    tensors, which quantized layers do not have: it is switched off on the copy's layers (the
    regular path computes the same). With ``example_inputs`` the quantized copy is run once, and
    a failure (some other module reading a Linear's ``weight`` directly) raises a clear error.

    Raises :class:`AutopruneError` when quantization is unavailable or the model has no
    ``nn.Linear`` to quantize (asking for it would then be a dead option).
    """
    check_available()
    if not any(type(m) is nn.Linear for m in model.modules()):
        raise AutopruneError("quantize: the model has no nn.Linear layer; int8 dynamic quantization "
                             "covers Linear layers only (set space.quantize: never)")
    was_training = model.training
    model.eval()
    try:
        with quiet():
            quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    finally:
        model.train(was_training)
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

    ``measure.count_parameters`` sees only ``nn.Parameter`` objects, and a quantized Linear
    keeps its weight in packed params. A quantized weight element counts as zero when its
    integer equals the zero point (0 here): what the weights file stores as a zero.
    """
    total = non_zero = 0
    for p in model.parameters():
        total += p.numel()
        non_zero += int(torch.count_nonzero(p.detach()).item())
    for module in quantized_linears(model).values():
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
