"""Export a trial's pruned model with ``torch.export``: a file that loads with
torch alone, without autoprune or the model's class, checked against the model."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AutopruneError, ConfigError
from .workspace import Workspace

#: Outputs of the exported program must match the trial's model this closely.
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExportReport:
    path: Path
    bytes: int
    max_abs_diff: float
    samples: int


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


def export_trial(workspace: Workspace, number: int, out: Path) -> ExportReport:
    """Write trial ``number``'s model to ``out`` with ``torch.export`` and check that the file gives the
    model's outputs on a validation batch."""
    check_out_path(out)
    model = workspace.load_trial_model(number).eval()
    inputs = next(iter(workspace.inputs.val_loader))[0]
    program = _export(model, inputs)
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, out)
    except (OSError, RuntimeError) as exc:  # e.g. a read-only file system, a full disk
        out.unlink(missing_ok=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AutopruneError(f"option '--out': cannot write {out}: {type(exc).__name__}: {line}") from None
    reloaded = torch.export.load(out).module()
    with torch.no_grad():
        expected, got = model(inputs), reloaded(inputs)
    diff = float((expected - got).abs().max())
    if diff > TOLERANCE:
        raise AutopruneError(f"exported model {out} differs from trial {number}'s model by {diff:.3e} "
                             f"(tolerance {TOLERANCE}); the file was written but should not be trusted")
    return ExportReport(out, out.stat().st_size, diff, inputs.shape[0])


def _export(model: torch.nn.Module, inputs: torch.Tensor) -> torch.export.ExportedProgram:
    """Export with a dynamic batch dimension, falling back to the fixed example shape."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        return torch.export.export(model, (inputs,), dynamic_shapes=({0: batch},))
    except Exception:  # some models specialise the batch size; a static export still works
        pass
    try:
        return torch.export.export(model, (inputs,))
    except Exception as exc:  # any failure becomes one clear message
        quantized = any("quantized" in type(m).__module__ for m in model.modules())
        hint = (" torch.export cannot trace int8 dynamically-quantized layers; export a trial without "
                "quantization, or load the trial's files with autoprune.model_files.load_model") if quantized else ""
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise AutopruneError(f"torch.export failed on this trial's model: {type(exc).__name__}: {first_line}.{hint}"
                             ) from None
