"""Errors users see. Each names where the problem is (file, line, field) and what to do."""

from __future__ import annotations

import functools


class CurateError(Exception):
    """Base class for errors that stop a run with a clear message (no traceback needed)."""


class ConfigError(CurateError):
    """The flow YAML is invalid: unknown key, bad value, missing file."""


class IngestError(CurateError):
    """An input cannot be read at all (missing, empty, wrong format declared, undecodable)."""


class MissingDependency(CurateError):
    """An optional dependency of one step is not installed."""

    def __init__(self, step: str, module: str, install: str):
        super().__init__(
            f"{step} needs the Python package '{module}', which is not installed. Install it with: {install}"
        )


class RecordError(ValueError):
    """One input row is invalid. It is quarantined, never dropped silently.

    ``error_class`` is a short machine-readable reason (``missing_field``, ``unknown_role``, …),
    ``field`` the path of the offending field inside the row (``conversations[3].from``).
    """

    def __init__(self, error_class: str, message: str, field: str | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.field = field
        self.message = message


class StageError(CurateError):
    """A stage failed more rows than its error budget allows."""


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    """Whether ``module`` imports (tried once per process; a broken install counts as absent): for choosing a default,
    where :func:`require` is for a step that needs the module."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import means: not usable here
        return False
    return True


def require(module: str, step: str, install: str | None = None):
    """Import an optional dependency of a step, or raise a MissingDependency naming the install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only where the package is absent
        raise MissingDependency(step, module, install or f"pip install {module}") from exc
