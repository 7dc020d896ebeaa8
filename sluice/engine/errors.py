"""The engine's errors: one root, each subclass one kind of failure.

    EngineError
    ├── ConfigError       bad or unsupported config.json / engine options
    ├── CheckpointError   missing, unexpected, mis-shaped tensor; corrupt file
    └── RequestError      a request the engine cannot serve (prompt too long, ...)

Messages are one line and name the offending thing, so callers can show them as is.
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class ConfigError(EngineError):
    """config.json or the engine options are invalid or unsupported."""


class CheckpointError(EngineError):
    """A checkpoint cannot be loaded (names the file or tensor at fault)."""


class RequestError(EngineError):
    """A request cannot be served by this engine as configured."""
