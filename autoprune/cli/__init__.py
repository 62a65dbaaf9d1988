"""The ``autoprune`` command line: each command parses, calls the library (:class:`autoprune.Search`, or the
module behind it) and prints. An :class:`~autoprune.errors.AutopruneError` becomes one line on stderr and
exit code 2; everything else it prints goes to stdout. Heavy libraries (torch, MLflow, Ray) are imported
by the commands that use them, never for ``--help``.
"""

from __future__ import annotations

import logging
import sys

from . import db, inspect, search, sensitivity  # noqa: F401  (registers the commands)
from ._app import _storage_failure, _user_errors, app, err, out  # noqa: F401  (used by tests and helpers)
from .inspect import _port_free  # noqa: F401


def main() -> None:
    # MLflow and alembic announce every table they create; users want the search's own output. MLflow sets
    # its loggers' levels from MLFLOW_LOGGING_LEVEL when imported: ask for WARNING there instead of importing
    # MLflow here, which would cost seconds before even --help (a level the user set is kept).
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if "mlflow" in sys.modules:  # imported already (main() called in a process that uses MLflow)
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # transformers imports torchao, which warns on import for each CUDA-only kernel library a CPU machine cannot
    # load and makes torch warn about its enum registrations: noise to users of a causal-LM search (the int8
    # path autoprune uses needs neither). Their errors still show. (Ray workers do the same at start.)
    from ..worker_setup import quiet_import_warnings

    quiet_import_warnings()
    app()
