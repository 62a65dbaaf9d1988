"""Export a trial's pruned model with ``torch.export``: a file that loads with
torch alone, without autoprune or the model's class, checked against the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import model_files
from .config import SearchConfig
from .errors import AutopruneError, ConfigError
from .model_io import build_loaders, import_factory
from .search import trial_dir

#: Outputs of the exported program must match the trial's model this closely.
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExportReport:
    path: Path
    bytes: int
    max_abs_diff: float
    samples: int


def load_trial_model(config: SearchConfig, number: int) -> torch.nn.Module:
    """The pruned, fine-tuned model of trial ``number`` from the study's work dir."""
    import_factory(config.model.factory, config.base_dir, "model.factory")  # makes its class importable
    directory = trial_dir(config, number)
    if not (directory / model_files.WEIGHTS_FILE).is_file():
        raise ConfigError(f"option '--trial': no model files for trial {number} in {directory} "
                          f"(only complete trials have models; see 'autoprune front')")
    return model_files.load_model(directory)


def export_trial(config: SearchConfig, number: int, out: Path) -> ExportReport:
    model = load_trial_model(config, number).eval()
    data_factory, _ = import_factory(config.data.factory, config.base_dir, "data.factory")
    _, val_loader = build_loaders(data_factory, config.data.kwargs, "data.factory")
    inputs = next(iter(val_loader))[0]
    program = _export(model, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, out)
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
