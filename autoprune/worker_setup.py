"""What every Ray worker of a search does once, before its first trial (Ray's ``worker_process_setup_hook``).

A trial whose model holds a ``transformers`` module imports transformers while Ray unpickles the trial's
arguments, before any autoprune code of the trial runs; transformers imports torchao, which warns once per
CUDA-only kernel library that a CPU machine cannot load ("Failed to load ..._C_mxfp8..."), and makes torch
warn about its enum registrations. Ray forwards those lines to the user's terminal from every worker. The
driver's CLI quiets the same two loggers (:func:`autoprune.cli.main`); this does it in the workers, where
only a hook that runs at process start comes early enough. Errors of both libraries still show.

Standard library only: Ray imports this module in every worker process as it starts.
"""

from __future__ import annotations

import logging

#: Loggers whose warnings at import are noise for a search; set to ERROR in the driver's CLI and in workers.
NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_import_warnings() -> None:
    """Raise the import-noise loggers of :data:`NOISY_IMPORT_LOGGERS` to ERROR in this process."""
    for name in NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
