"""Exceptions hamacho raises; each message says what was wrong and how to fix it."""

from __future__ import annotations


class HamachoError(Exception):
    """Base class for every error a user can fix; the CLI prints it as one line."""

    exit_code = 1


class UsageError(HamachoError):
    """A command was called with arguments that cannot work together."""

    exit_code = 2


class UnknownModelError(HamachoError, KeyError):
    """No registered plugin provides the requested model name."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(HamachoError):
    """A plugin failed to load, or two plugins conflict."""


class ConfigError(HamachoError):
    """A configuration key or value is invalid."""

    exit_code = 2


class DataError(HamachoError):
    """An image, mask or dataset folder cannot be used."""


class NotAnImageError(DataError):
    """A file is in no image format PIL recognises."""


class TooManyPixelsError(DataError):
    """An image has more pixels than data.max_pixels allows (a decompression-bomb guard)."""


class BackboneError(HamachoError):
    """A backbone or one of its layers cannot be built."""


class WeightsUnavailableError(BackboneError):
    """Pretrained backbone weights are neither cached locally nor downloadable."""


class ArtifactError(HamachoError):
    """A saved model artifact is missing, truncated, tampered with or of another version."""


class ResourceError(HamachoError):
    """A step would need more memory than the machine has."""


def one_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, whitespace collapsed (else its type name)."""
    for line in str(exc).splitlines():
        if line.strip():
            return " ".join(line.split())
    return type(exc).__name__


class OutputError(HamachoError):
    """A run folder or output file cannot be written (bad path, read-only, disk full, locked)."""
