"""The few error types autoprune raises on purpose.

Every error a user can fix derives from :class:`AutopruneError`; the CLI turns
it into one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations


class AutopruneError(Exception):
    """An error the user can act on; its message says what to change."""


class ConfigError(AutopruneError):
    """The config file or an override is missing, malformed or inconsistent."""


class UnsupportedLayerError(AutopruneError):
    """A pruning method cannot handle a layer; the message names it and the fix."""


class StorageError(AutopruneError):
    """A study or tracking store cannot be opened or does not match the config."""
