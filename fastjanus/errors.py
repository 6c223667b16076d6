"""Exceptions raised for bad input. Each message names the file, key, shape or value and says what to do."""


class FastJanusError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(FastJanusError, ValueError):
    """config.json (or a preset) is malformed, unsupported or inconsistent."""


class CheckpointError(FastJanusError, ValueError):
    """Weights are missing, unreadable, truncated, or do not match the architecture."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A model directory or one of its files does not exist."""


class InputError(FastJanusError, ValueError):
    """A call argument (prompt, image, sampling option) is out of range."""
