"""The error contract shared by ``train_seg.py``, ``infer_seg.py`` and ``python -m seg.evaluate``.

A user error (``seg.errors.UserError`` and its family: ``ConfigError``, ``DataError``) is printed as
one line ``error: <message>``, the message naming the file or the config field, and the exit status
is 2 (``--debug`` shows its traceback instead).  Anything else is a bug: it is not caught, so Python
prints the traceback and the exit status is 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from seg.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

UNSAFE_LOAD_HELP = ("also load checkpoint or pretrained-weight files that need full unpickling (weights_only=False). "
                    "Unpickling runs code stored in the file: use it only for files you trust")
#: ``--unsafe-load`` of commands that also take an export folder (``seg.export.load_export``)
UNSAFE_LOAD_EXPORT_HELP = (UNSAFE_LOAD_HELP + "; also needed to load an export folder (-m DIR): its network "
                           "is a TorchScript program, which runs code stored in the file")


def run_cli(body: Callable[[], int], debug: bool = False, prefix: str = "") -> int:
    """Run a command line's ``body`` under the error contract and return its exit status.

    Args:
        body: the command's work; returns its exit status.
        debug: re-raise user errors (full traceback) instead of the one-line message.
        prefix: put before the message (``[rank 1] `` under torchrun).
    """
    try:
        return body()
    except UserError as exc:
        if debug:
            raise
        print(f"{prefix}error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__


def add_common_flags(parser: argparse.ArgumentParser, unsafe_load: bool = False,
                     exports: bool = False) -> None:
    """``--debug`` (and, for commands that read checkpoints, ``--unsafe-load``; ``exports``: its
    help says that export folders need it too)."""
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of input errors instead of one line (and debug logging)")
    if unsafe_load:
        parser.add_argument("--unsafe-load", action="store_true",
                            help=UNSAFE_LOAD_EXPORT_HELP if exports else UNSAFE_LOAD_HELP)
