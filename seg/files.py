"""Files written atomically and torch files read safely: the ground every writer and reader uses.

``write_atomic`` is the one place a file is written through a temporary and a rename: a crash never
leaves a half-written file under its final name.  ``torch_load`` is the one place a torch file is
read: ``weights_only=True`` (tensors, plain containers and ``SAFE_GLOBALS``), full unpickling only
when the caller opts in.  This module imports nothing of the project but ``seg.errors``.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from seg.errors import UserError

logger = logging.getLogger(__name__)

# The only non-tensor classes ``weights_only`` loading admits: NumPy's RNG state as checkpoints
# written before it was stored as a list held it (a uint32 array).  Arrays are rebuilt from raw
# bytes; no constructor of the file's choosing runs.
_numpy_core = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _numpy_core.multiarray._reconstruct]


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` the file under its final name in a hidden temporary sibling folder, then move
    what it wrote into place (detached data files, e.g. an export's networks, first; the named file
    last); the temporary folder is removed whatever happens.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp / path.name)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (a str as UTF-8) to ``path`` atomically (``write_atomic``)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return write_atomic(path, lambda tmp: tmp.write_bytes(raw))


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (``write_atomic``)."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return write_atomic(path, save)


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               unsafe_load: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors, plain containers and ``SAFE_GLOBALS``).

    A file that needs other Python objects raises a UserError naming them and the opt-in, unless
    ``unsafe_load``: then it is unpickled in full (which runs code stored in the file), with a warning.

    Raises:
        UserError: the file is unreadable, or needs full unpickling and ``unsafe_load`` is False.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = _unsafe_globals(path) or [_first_reason(exc)]
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...: unusable
        raise UserError(f"not a readable {what} ({type(exc).__name__}: {_first_reason(exc)})", path) from exc
    if not unsafe_load:
        raise UserError(f"cannot be loaded safely: it holds Python objects beyond tensors and plain "
                        f"data ({', '.join(needs[:3])}), and unpickling them can run arbitrary code. "
                        f"If you trust this file, load it with --unsafe-load (unsafe_load=True)", path)
    logger.warning("%s: unpickled in full (--unsafe-load); this runs code stored in the file", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"not a readable {what} ({type(exc).__name__}: {_first_reason(exc)})", path) from exc


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a zip-format torch file needs beyond the safe set ([] if unknown)."""
    safe = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in safe]
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be inspected
        return []


def _first_reason(exc: BaseException) -> str:
    """The informative line of a (possibly long, multi-line) torch.load error."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    hits = [l for l in lines if "GLOBAL" in l or "allowlisted" in l or "Unsupported" in l]
    return (hits or lines or [type(exc).__name__])[0][:300]


def to_plain(obj: Any) -> Any:
    """``obj`` as plain Python data (dict, list, tuple, str, int, float, bool, None; tensors kept):
    NumPy scalars and arrays, paths, enums and named tuples become their plain equivalents."""
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v) for v in obj]
        return tuple(items) if type(obj) is tuple else items
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    for kind in (bool, int, float, str):  # subclasses (IntEnum, StrEnum) pickle by class name
        if isinstance(obj, kind):
            return kind(obj)
    if obj is None or isinstance(obj, torch.Tensor):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (plain data only): {obj!r}")
