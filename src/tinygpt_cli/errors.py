"""The exceptions the library raises. `cli.main()` turns each into one red line and exit code 1.

Every message says what is wrong *and* what to do about it.
"""

from __future__ import annotations


class TinyGPTError(Exception):
    """Base class of every error tinygpt reports to a user."""


class ConfigError(TinyGPTError):
    """A preset, config file or override is invalid."""


class DataError(TinyGPTError):
    """An input corpus or token file is missing, empty, unreadable or inconsistent."""


class CheckpointError(TinyGPTError):
    """A run or checkpoint is missing, corrupted or not a tinygpt checkpoint."""


class GenerationError(TinyGPTError):
    """A generation request cannot be honoured (e.g. a prompt longer than the context)."""


class TrainingError(TinyGPTError):
    """Training cannot start or cannot continue."""
