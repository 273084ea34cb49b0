"""A private random stream: an iterator whose every step runs on its own saved RNG states.

torchio transforms and samplers, torch's ``DataLoader`` shuffling and worker seeds all draw from the
*global* Python, NumPy and torch generators.  The training loop draws from the same generators between
two batches (dropout, point sampling), so a loader that used them directly would yield batches that
depend on the model.  ``SeededStream`` swaps in its own states around each ``next()`` and swaps the
caller's back afterwards: the batches depend on the seed alone, and the caller's generators are left
exactly as they were.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def _get_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def seeded_states(seed: int) -> dict[str, Any]:
    """Python, NumPy and torch CPU generator states seeded from ``seed`` (globals left untouched)."""
    saved = _get_states()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return _get_states()
    finally:
        _set_states(saved)


@contextlib.contextmanager
def private_rng(states: dict[str, Any]) -> Iterator[None]:
    """Run the block on ``states`` (updated in place when it ends), then restore the caller's states."""
    saved = _get_states()
    _set_states(states)
    try:
        yield
    finally:
        states.update(_get_states())
        _set_states(saved)


class SeededStream(Iterator[T]):
    """Iterator over ``factory()`` whose construction and every step run on RNG states seeded by ``seed``.

    Args:
        factory: builds the underlying iterator (called lazily, on the first ``next``).
        seed: seed of the private generators.
    """

    def __init__(self, factory: Callable[[], Iterator[T]], seed: int) -> None:
        self._factory = factory
        self._states = seeded_states(seed)
        self._it: Iterator[T] | None = None

    def __iter__(self) -> "SeededStream[T]":
        return self

    def __next__(self) -> T:
        with private_rng(self._states):
            if self._it is None:
                self._it = self._factory()
            return next(self._it)
