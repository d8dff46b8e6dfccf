"""The errors loraforge shows to users: one clear message, never a traceback."""

from __future__ import annotations


class LoraforgeError(Exception):
    """Base class: the CLI prints the message and exits non-zero."""


class ConfigError(LoraforgeError):
    """A config file or override is invalid; the message lists every problem at once."""


class DataError(LoraforgeError):
    """Input data is invalid; the message names file, line and field for every problem found."""


class StageError(LoraforgeError):
    """A stage cannot run with what it was given (missing input artifact, unsupported option...)."""


class GateFailed(LoraforgeError):
    """A quality gate failed; the message is the one-line reason with the numbers."""
