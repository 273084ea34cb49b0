"""Name -> builder registries with "did you mean" errors (backbones, heads, losses)."""
from __future__ import annotations

import copy
import difflib
import inspect
from typing import Any, Callable, Iterator

from seg.errors import ConfigError


class Registry:
    """Maps names used in ``hparam.py`` to builder callables.

    Example:
        >>> BACKBONES = Registry("backbone")
        >>> @BACKBONES.register("tiny_net")
        ... def tiny_net(**kwargs): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        self._defaults: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, defaults: dict[str, Any] | None = None
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` under ``name`` (default: the function's name), with the
        variant's ``defaults``: the options a run uses unless the user sets them (``defaults``)."""
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._builders:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._builders[key] = fn
            self._defaults[key] = copy.deepcopy(dict(defaults or {}))
            return fn
        return deco

    def defaults(self, name: str) -> dict[str, Any]:
        """A copy of the options registered with ``name`` (unknown names: ConfigError)."""
        self.get(name)
        return copy.deepcopy(self._defaults[name])

    def options(self, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The options a run builds ``name`` with: its registered defaults, ``overrides`` (the
        user's) merged over them key by key."""
        return {**self.defaults(name), **copy.deepcopy(dict(overrides or {}))}

    def get(self, name: str) -> Callable[..., Any]:
        """The builder registered as ``name``; unknown names raise a ConfigError with suggestions."""
        if name not in self._builders:
            raise ConfigError(unknown_name_message(self.kind, name, self._builders))
        return self._builders[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def check_options(fn: Callable[..., Any], kind: str, options: dict[str, Any]) -> None:
    """Raise a "did you mean" ConfigError for the first of ``options`` that ``fn`` does not take."""
    known = [p for p in inspect.signature(fn).parameters if p != "self"]
    for name in options:
        if name not in known:
            raise ConfigError(unknown_name_message(kind, name, known))


def unknown_name_message(kind: str, name: str, known: Any) -> str:
    """One-line error for an unknown option name, with close matches first."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Available: {', '.join(known)}"
