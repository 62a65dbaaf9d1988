"""Export a trial's pruned model: a ``torch.export`` file that loads with torch alone, or an ONNX file
(``torch.onnx.export(..., dynamo=True)``) for deployment stacks (ONNX Runtime, TensorRT, OpenVINO...);
either without autoprune or the model's class, and checked against the model before it is reported.

The ONNX file is checked by running it, as written, in ONNX Runtime on validation batches (and on a batch
of one, which exercises the dynamic batch dimension) against the PyTorch model: the largest absolute
difference is reported, and one beyond :data:`ONNX_TOLERANCE` (relative to the outputs' magnitude) is an
error. Unstructured (masked zeros) and structured (shrunk) models export alike: both are plain modules.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from . import measure
from .errors import AutopruneError, ConfigError
from .workspace import Workspace

#: Outputs of the exported program must match the trial's model this closely.
TOLERANCE = 1e-5
#: ONNX Runtime's kernels differ from torch's (other summation orders, fused ops): its outputs must match the
#: model's within this, times the largest output magnitude when that is above 1.
ONNX_TOLERANCE = 1e-4
#: Validation batches an ONNX file is checked on (plus a batch of one).
CHECK_BATCHES = 4
FORMATS = ("torch", "onnx")


@dataclass(frozen=True)
class ExportReport:
    path: Path
    bytes: int
    max_abs_diff: float
    samples: int
    format: str = "torch"
    dynamic_batch: bool = True
    """False when the model specialises its batch size: the file then takes the example's batch size only."""


def check_out_path(out: Path) -> None:
    """``--out`` must name a file that can be written: not a directory, not under a file, in a writable
    directory (checked before anything is exported or created)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"option '--out': expected a file path, got {out}, which is a directory "
                          f"(e.g. --out {out / 'model.pt2'})")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"option '--out': cannot write {out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"option '--out': cannot write {out}: directory {parent} is not writable")
            break
    if out.exists() and not os.access(out, os.W_OK):
        raise ConfigError(f"option '--out': cannot write {out}: the file exists and is not writable")


def export_format(fmt: str | None, out: Path) -> str:
    """The format asked for (``--format``), or the one ``out``'s suffix names (``.onnx``: onnx, else torch)."""
    if fmt is None:
        return "onnx" if Path(out).suffix.lower() == ".onnx" else "torch"
    if fmt not in FORMATS:
        raise ConfigError(f"option '--format': expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def export_trial(workspace: Workspace, number: int, out: Path, fmt: str | None = None) -> ExportReport:
    """Write trial ``number``'s model to ``out`` in format ``fmt`` (:func:`export_format`) and check that the
    file gives the model's outputs on validation data."""
    fmt = export_format(fmt, out)
    check_out_path(out)
    model = workspace.load_trial_model(number).eval()
    loader = workspace.inputs.val_loader
    if fmt == "onnx":
        batches = [batch[0] for batch in islice(iter(loader), CHECK_BATCHES)]
        return export_onnx(model, batches, out, what=f"trial {number}'s model")
    inputs = next(iter(loader))[0]
    program, dynamic = _export(model, inputs)
    _write(out, lambda path: torch.export.save(program, path))
    reloaded = torch.export.load(out).module()
    with torch.no_grad():
        expected, got = model(inputs), reloaded(inputs)
    diff = float((expected - got).abs().max())
    if diff > TOLERANCE:
        raise AutopruneError(f"exported model {out} differs from trial {number}'s model by {diff:.3e} "
                             f"(tolerance {TOLERANCE}); the file was written but should not be trusted")
    return ExportReport(out, out.stat().st_size, diff, inputs.shape[0], "torch", dynamic)


def export_onnx(model: torch.nn.Module, batches: Sequence[torch.Tensor], out: Path, *,
                what: str = "the model") -> ExportReport:
    """Write ``model`` to ``out`` as ONNX (dynamic batch where the model allows, exported on ``batches[0]``)
    and check the written file in ONNX Runtime against the model on ``batches`` and a batch of one
    (:func:`check_onnx`); a mismatch is an :class:`AutopruneError` naming the difference."""
    out = Path(out)
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise ConfigError("option '--format': ONNX export needs a model whose input is one tensor; the validation "
                          f"data give {type(batches[0]).__name__ if batches else 'no batches'}")
    model = model.eval()
    try:
        data, dynamic = measure.onnx_bytes(model, batches[0])
    except ImportError as exc:
        raise AutopruneError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc}): "
                             "pip install 'autoprune[deploy]'") from None
    except Exception as exc:  # any failure becomes one clear message
        raise AutopruneError(f"torch.onnx.export failed on {what}: {type(exc).__name__}: {_first_line(exc)}."
                             f"{_quantized_hint(model)}") from None
    _write(out, lambda path: path.write_bytes(data))
    checked = list(batches) if dynamic else [b for b in batches if b.shape == batches[0].shape]
    if dynamic:
        checked.append(batches[0][:1])
    diff = check_onnx(measure.OnnxRuntimeModel(str(out)), model, checked, what=what, path=out)
    return ExportReport(out, out.stat().st_size, diff, sum(b.shape[0] for b in checked), "onnx", dynamic)


def check_onnx(session: measure.OnnxRuntimeModel, reference: torch.nn.Module, batches: Sequence[torch.Tensor], *,
               tolerance: float = ONNX_TOLERANCE, what: str = "the model", path: Path | None = None) -> float:
    """The largest absolute difference between ONNX Runtime's outputs (``session``) and ``reference``'s on
    ``batches``; raises :class:`AutopruneError` when outputs differ in number or shape, or by more than
    ``tolerance`` times the largest output magnitude (at least 1)."""
    where = f"ONNX file {path}" if path is not None else "the ONNX model"
    worst, allowed = 0.0, tolerance
    with torch.no_grad():
        for inputs in batches:
            expected = [t.detach().float().cpu().numpy() for t in torch.utils._pytree.tree_leaves(reference(inputs))
                        if isinstance(t, torch.Tensor)]
            got = session(inputs)
            if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
                raise AutopruneError(f"{where} gives outputs of shapes {[g.shape for g in got]} on a batch of "
                                     f"{inputs.shape[0]}; {what} gives {[e.shape for e in expected]}")
            for g, e in zip(got, expected, strict=True):
                if e.size:
                    diff = float(abs(g.astype(e.dtype) - e).max())
                    worst = max(worst, diff if diff == diff else float("inf"))  # NaN: never a match
                    allowed = max(allowed, tolerance * float(abs(e).max()))
    if not worst <= allowed:  # NaN too
        samples = sum(b.shape[0] for b in batches)
        raise AutopruneError(f"{where} run in ONNX Runtime differs from {what} by up to {worst:.3e} on {samples} "
                             f"validation samples (tolerance {allowed:.1e}); the file was written but should not "
                             f"be trusted")
    return worst


def _write(out: Path, write: Callable[[Path], object]) -> None:
    """``write(out)``, creating missing parent directories; on failure the file and directories it created are
    removed and the error is one line naming ``--out``."""
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(out)
    except (OSError, RuntimeError) as exc:  # e.g. a read-only file system, a full disk
        out.unlink(missing_ok=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AutopruneError(f"option '--out': cannot write {out}: {type(exc).__name__}: {line}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def _quantized_hint(model: torch.nn.Module) -> str:
    if not any("quantized" in type(m).__module__ for m in model.modules()):
        return ""
    return (" torch.export cannot trace int8 dynamically-quantized layers; export a trial without "
            "quantization, or load the trial's files with autoprune.model_files.load_model")


def _export(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.export.ExportedProgram, bool]:
    """Export with a dynamic batch dimension, falling back to the fixed example shape; says which."""
    try:
        return measure.export_program(model, inputs)
    except Exception as exc:  # any failure becomes one clear message
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise AutopruneError(f"torch.export failed on this trial's model: {type(exc).__name__}: {first_line}."
                             f"{_quantized_hint(model)}") from None
