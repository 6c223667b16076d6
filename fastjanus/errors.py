"""Exceptions raised for bad input. Each message names the file, key, shape or value and says what to do.

Messages name the values a caller passed. The same check serves the Python API (`temperature=-1`) and the
command line (`--temperature -1`): messages are built with `arg(name)` and `setting(name, value)`, which
render as keyword arguments by default and as flags inside `cli_style()` (what `fastjanus` runs under).
"""
from __future__ import annotations

import contextvars
import re
from contextlib import contextmanager


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


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Terminal colour codes out (torch embeds them in some messages; they garble logs and files)."""
    return _ANSI.sub("", text)


# ------------------------------------------------------------------------- naming what the user passed
_CLI: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastjanus_cli_style", default=None)

# API keyword → command-line flag where the two are not simply `--` + dashes.
FLAGS = {"cfg_weight": "--cfg", "prompt": "--prompt", "image": "--image", "question": "--question",
         "model": "--model", "path": "--model"}
_CLI_VALUES = {"cuda_graphs": {True: "on", False: "off", "auto": "auto"}}


def arg(name: str) -> str:
    """`name` as the caller wrote it: the keyword argument, or under cli_style() the flag."""
    flags = _CLI.get()
    if flags is None:
        return name
    return flags.get(name) or FLAGS.get(name) or "--" + name.replace("_", "-")


def setting(name: str, value) -> str:
    """A value of `name` as the caller would write it: `device='cpu'`, or `--device cpu` on the command line."""
    if _CLI.get() is None:
        return f"{name}={value!r}"
    value = _CLI_VALUES.get(name, {}).get(value, value) if isinstance(value, (bool, str)) else value
    return f"{arg(name)} {value}"


def path_of(name: str, path) -> str:
    """A path the caller passed as `name`: the path itself, or under cli_style() `--flag path`."""
    return f"{arg(name)} {path}" if _CLI.get() is not None else str(path)


def cli_active() -> bool:
    return _CLI.get() is not None


@contextmanager
def cli_style(flags: dict[str, str] | None = None):
    """Render messages raised inside this block in command-line terms. `flags` maps an API name to the flag a
    command uses for it where that differs (`fastjanus bench` says --text-tokens for max_new_tokens)."""
    token = _CLI.set(dict(flags or {}))
    try:
        yield
    finally:
        _CLI.reset(token)
