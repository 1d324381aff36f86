"""How the `trl-u2a` console reports a failure: a mistake in the user's input is one line, `trl-u2a <command>: error:
<message>`, with exit code 2 (as argparse reports a bad flag); a bug keeps its traceback. `trl-u2a --debug <command>`
or `TRL_U2A_DEBUG=1` shows the traceback of a user error too."""

from __future__ import annotations

import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable

DEBUG_ENV = "TRL_U2A_DEBUG"


class U2AUserError(ValueError):
    """An error in the user's input (an option, a file, a dataset's rows) whose message says what to change."""


# Raised for the user's input by U2A and by the libraries it hands the input to (TrainingArguments, datasets, yaml)
USER_ERROR_TYPES = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# Where a ValueError means that U2A passed a tensor or array of the wrong shape or dtype: a bug, not input
_NUMERIC_CODE = re.compile(r"[/\\](site|dist)-packages[/\\](torch|numpy)[/\\]")


def debug_enabled() -> bool:
    """Whether `TRL_U2A_DEBUG` asks for tracebacks of user errors too (any value but empty, 0, false or no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is about the user's input: a `U2AUserError`; a dataset hub that cannot be reached; a missing
    extra (an `ImportError` that says what to `pip install`); or a `ValueError`/`FileNotFoundError`/
    `NotADirectoryError`/`IsADirectoryError` not raised inside torch or numpy."""
    from trl_u2a.prepare_data import HubUnreachableError

    if isinstance(error, (U2AUserError, HubUnreachableError)):
        return True
    if isinstance(error, ImportError):
        return "pip install" in str(error)
    if not isinstance(error, USER_ERROR_TYPES):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return True
    return not _NUMERIC_CODE.search(frames[-1].filename)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (a library's message may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as `UserWarning: <message>`: Python's format adds the source line that raised it, which reads as
    stray output on a console."""
    return f"{category.__name__}: {message}\n"


def run_command(name: str, fn: Callable[[list[str]], object], argv: list[str], debug: bool = False) -> int:
    """Run subcommand `name` as `fn(argv)`; its exit code: 0, `fn`'s own integer code (or `SystemExit`'s), or 2 for
    a user error, which is printed as one line on stderr. Anything else (a bug, Ctrl-C) propagates with its
    traceback, and so does a user error with `debug` (or `TRL_U2A_DEBUG=1`). Warnings are shown without their
    source line."""
    shown_as = warnings.formatwarning
    warnings.formatwarning = warning_line
    try:
        result = fn(argv)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):  # argparse's --help and errors, already printed
            return exit_.code or 0
        raise
    except Exception as error:
        if debug or debug_enabled() or not is_user_error(error):
            raise
        print(f"trl-u2a {name}: error: {one_line(error)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown_as
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
