"""Export a trial's pruned model with ``torch.export``: a file that loads with
torch alone, without autoprune or the model's class, checked against the model."""

from __future__ import annotations

import contextlib
import os
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


def trial_digests(config: SearchConfig, number: int) -> dict[str, str]:
    """The digests of trial ``number``'s model files stored in the study (``model_files.FILES_ATTR``);
    empty when the study stores none for it. Opens the study read-only: creates nothing."""
    from .errors import StorageError
    from .retry import safe_url, sqlite_file
    from .study import load_study, make_sampler, open_storage

    url = config.storage_url
    missing = sqlite_file(url)
    if missing is not None and not missing.is_file():
        raise StorageError(f"field 'study.storage': no study database at {missing}; run the search first")
    study = load_study(open_storage(url), config.study.name, make_sampler(config.study.sampler, config.study.seed))
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials:
        raise ConfigError(f"option '--trial': study {config.study.name!r} in {safe_url(url)} has no trial {number} "
                          f"(see 'autoprune front')")
    return dict(trials[0].user_attrs.get(model_files.FILES_ATTR) or {})


def load_trial_model(config: SearchConfig, number: int) -> torch.nn.Module:
    """The pruned, fine-tuned model of trial ``number`` from the study's work dir, after checking its files
    against the digests the study stored when they were written (a planted skeleton would run code)."""
    expected = trial_digests(config, number)
    import_factory(config.model.factory, config.base_dir, "model.factory")  # makes its class importable
    directory = trial_dir(config, number)
    if not (directory / model_files.WEIGHTS_FILE).is_file():
        raise ConfigError(f"option '--trial': no model files for trial {number} in {directory} "
                          f"(only complete trials have models; see 'autoprune front')")
    return model_files.load_model(directory, expected)


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


def export_trial(config: SearchConfig, number: int, out: Path) -> ExportReport:
    check_out_path(out)
    model = load_trial_model(config, number).eval()
    data_factory, _ = import_factory(config.data.factory, config.base_dir, "data.factory")
    _, val_loader = build_loaders(data_factory, config.data.kwargs, "data.factory")
    inputs = next(iter(val_loader))[0]
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
