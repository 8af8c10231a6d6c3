"""Errors that vaelab raises for bad input.

Every message is one line that names the problem and the fix. The CLI turns
:class:`VaelabError` into ``vaelab: error: <message>`` and exit code 2, with
no traceback.
"""

from __future__ import annotations

__all__ = ["VaelabError", "ConfigError", "DataError", "CheckpointError", "describe_bad_values"]


class VaelabError(ValueError):
    """Base class for user-facing errors (bad input, bad files, bad options)."""


class ConfigError(VaelabError):
    """An unknown, missing or impossible configuration value."""


class DataError(VaelabError):
    """Data that cannot be read or does not fit what it is used for."""


class CheckpointError(VaelabError):
    """A checkpoint or run directory that cannot be loaded or written."""


def describe_bad_values(mask, values) -> str:
    """Return ``"<count> values, e.g. <first offending value>"`` for a boolean ``mask``.

    Args:
        mask: boolean tensor marking offending entries.
        values: tensor of the same shape holding the data.
    """
    count = int(mask.sum())
    first = values[mask].flatten()[0].item() if count else None
    return f"{count} value{'s' if count != 1 else ''}, e.g. {first!r}"
