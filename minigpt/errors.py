"""Every exception minigpt raises on purpose, in one place.

`MinigptError` marks a *user* error: bad data, a bad flag or value, a damaged or mismatched
checkpoint, a failed download, a missing optional extra. The commands print such an error as
one line and exit 2 (`minigpt.cli.common.run`); anything else is a bug and keeps its traceback.
Each class also derives from the built-in exception a caller would expect (ValueError, OSError,
ImportError), so `except ValueError` keeps working.
"""

from __future__ import annotations


class MinigptError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(MinigptError, ValueError):
    """A flag, argument or configuration value that can't be used."""


class DataError(MinigptError, ValueError):
    """Data that can't be used: missing, empty, undecodable, or too short."""


class CheckpointError(MinigptError, ValueError):
    """A checkpoint that is missing, truncated, corrupt or of another shape."""


class DownloadError(MinigptError, OSError):
    """A file that could not be downloaded completely or did not match its checksum."""


class StorageError(MinigptError, OSError):
    """A write that failed for want of space or under a file-size limit (what was written before is intact)."""


class DirectoryInUse(MinigptError, OSError):
    """A run directory locked by another process."""


class NonFiniteLoss(MinigptError, ArithmeticError):
    """Training produced a NaN or infinite loss (the last good checkpoint is kept)."""


class MissingExtra(MinigptError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise `MissingExtra` naming `pip install 'minigpt[extra]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{purpose} needs the {module.split('.')[0]} package: "
                           f"pip install 'minigpt[{extra}]' ({e})") from e
