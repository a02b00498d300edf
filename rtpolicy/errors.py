"""Expected errors (a bad dataset, checkpoint, bundle or config) and how every CLI reports them: one line
on stderr naming the file, key or value, exit status 2, no traceback. ``--traceback`` (or
``RTPOLICY_TRACEBACK=1``) keeps the traceback for a bug report."""

from __future__ import annotations

import contextlib
import os
import sys

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input from the user (a file, key or value); the message names it."""


def _expected(e: BaseException) -> bool:
    return isinstance(e, (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError))


def take_traceback_flag() -> None:
    """Remove ``--traceback`` from ``sys.argv`` (before Hydra or argparse reads it) and remember it."""
    if "--traceback" in sys.argv[1:]:
        sys.argv.remove("--traceback")
        os.environ["RTPOLICY_TRACEBACK"] = "1"


@contextlib.contextmanager
def reported():
    """Turn an expected error raised inside into one line on stderr and exit status 2."""
    try:
        yield
    except Exception as e:
        if os.environ.get("RTPOLICY_TRACEBACK") or not _expected(e):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


def run_cli(main, *args, **kwargs):
    """``main(*args, **kwargs)`` as a console entry point: expected errors are one line and exit 2."""
    take_traceback_flag()
    with reported():
        return main(*args, **kwargs)
