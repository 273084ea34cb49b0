"""User-facing errors: one line naming the file and the problem."""
from __future__ import annotations

import os


class UserError(Exception):
    """An error caused by the user's input or configuration, shown as one line (exit status 2)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class DataError(UserError):
    """A problem with an input image or label file."""


class ConfigError(UserError):
    """A problem with the configuration (hparam.py, --set, --config)."""
