"""What every ``cmn-*`` command shares: the error wrapper and validated argument types.

A command's ``main(argv)`` is wrapped with :func:`user_errors`: a :class:`cmn.errors.CMNError`
becomes one ``error: <file or flag>: <cause>`` line on stderr and exit status 2; Ctrl-C is
exit 130 with one line; a closed or full standard output is one line too. Anything else is a
bug in cmn and keeps its traceback.

The argument types check numbers at the command-line edge, so ``--batch-size 0`` is
argparse's one-line usage error (exit 2) rather than a failure deep inside.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Sequence
from typing import Callable, NoReturn, Optional, Protocol

from cmn.errors import CMNError


class Main(Protocol):
    """A wrapped command: ``main(argv=None)`` (``None`` reads ``sys.argv``), returning the exit status."""

    def __call__(self, argv: Optional[Sequence[str]] = None) -> int: ...


class UsageError(CMNError):
    """A command line argparse rejects (unknown flag, bad value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported like every other user error: one
    ``error: --flag: cause`` line and exit status 2 (through :func:`user_errors`), no usage
    block. ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):
            message = message[len("argument ") :]
        raise UsageError(f"{message} (see {self.prog} --help)")


class StdoutError(CMNError):
    """Standard output cannot be written (a full device, an I/O error)."""


class _GuardedStdout:
    """sys.stdout whose write errors name standard output (a closed pipe stays BrokenPipeError)."""

    def __init__(self, stream):
        self._stream = stream

    def _call(self, name: str, *args):
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(f"standard output: cannot write ({e.strerror or e})") from None

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def user_errors(main: Callable[[Optional[Sequence[str]]], int]) -> Main:
    """Turn user-facing errors into one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        real = sys.stdout
        sys.stdout = _GuardedStdout(real)
        try:
            code = main(argv)
            sys.stdout.flush()
            return code
        except CMNError as e:
            if isinstance(e, StdoutError):
                _quiet_stdout(real)
            _say(f"error: {e}")
            return 2
        except KeyboardInterrupt:
            _say("interrupted")
            return 130
        except BrokenPipeError:
            _quiet_stdout(real)
            return 0  # `cmn-generate ... | head` is not an error
        finally:
            sys.stdout = real

    return wrapper


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _quiet_stdout(stream) -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


# ---- argument types ---------------------------------------------------------------------
def _number(
    kind: type, lo: Optional[float], hi: Optional[float], lo_open: bool = False, hi_open: bool = False, what: str = ""
) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what}")
        return value

    parse.__name__ = "integer" if kind is int else "number"
    return parse


def int_range(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (either end optional)."""
    if lo is not None and hi is not None:
        what = f"between {lo} and {hi}"
    elif lo is not None:
        what = f">= {lo}"
    else:
        what = f"<= {hi}"
    return _number(int, lo, hi, what=what)  # type: ignore[return-value]


def positive_int(hi: Optional[int] = None) -> Callable[[str], int]:
    return int_range(1, hi)


def nonneg_int(hi: Optional[int] = None) -> Callable[[str], int]:
    return int_range(0, hi)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(float, 0.0, None, lo_open=True, what="> 0")(text)


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(float, 0.0, None, what=">= 0")(text)


def probability(text: str) -> float:
    """A number in [0, 1)."""
    return _number(float, 0.0, 1.0, hi_open=True, what="in [0, 1)")(text)


def unit_interval_open(text: str) -> float:
    """A number in (0, 1], e.g. a decay factor."""
    return _number(float, 0.0, 1.0, lo_open=True, what="in (0, 1]")(text)


def bounded(name: str) -> Callable[[str], float]:
    """The argparse type of a setting bounded in :data:`cmn.config.BOUNDS`."""
    from cmn.config import BOUNDS, describe_bounds

    lo, hi, lo_open, hi_open = BOUNDS[name]
    kind = int if isinstance(lo, int) else float
    return _number(kind, lo, hi, lo_open, hi_open, what=describe_bounds(name))


__all__ = [
    "ArgumentParser",
    "UsageError",
    "bounded",
    "int_range",
    "nonneg_float",
    "nonneg_int",
    "positive_float",
    "positive_int",
    "probability",
    "unit_interval_open",
    "user_errors",
]
