"""The ``orca-diff`` command line: a thin layer over the library (one module per topic).

``main`` imports the commands itself, inside its Ctrl-C guard: an interrupt while Python loads
click, numpy and the command modules (a second or so on a cold disk) is one line and exit 130,
never a traceback. ``cli`` (the click group) is loaded on first use.
"""

import os
import sys

# Before numpy loads: make/apply/verify make no BLAS call, and numpy's OpenBLAS worker threads
# spin for ~50 ms of CPU after start-up, a core taken from the coder threads of a small apply.
# Not for `train` (torch may use OpenBLAS for its matmuls on some platforms), nor over a user's
# own setting.
if "train" not in sys.argv[1:]:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

#: The exit code of an interrupted command (128 + SIGINT), as errors.InterruptedError_ has it.
_INTERRUPTED = 130
_START_UP_LINE = b"orca-diff: interrupted during start-up; nothing was done\n"


def _interrupted_at_start(signum, frame) -> None:  # noqa: ARG001 - a signal handler's signature
    os.write(2, _START_UP_LINE)
    os._exit(_INTERRUPTED)


def _as_command() -> bool:
    """Whether this import is the start of the ``orca-diff`` command (the console script, or
    ``python -m orca_diff[.cli]``, during which ``sys.argv[0]`` is still "-m"), not a library
    or test import (which must keep Python's own Ctrl-C behaviour)."""
    name = os.path.basename(sys.argv[0] if sys.argv else "")
    if name == "-m":  # `python -m X`: only when X is this package (sys.orig_argv: Python >= 3.10)
        orig = list(getattr(sys, "orig_argv", []))
        return "-m" in orig[:-1] and orig[orig.index("-m") + 1] in ("orca_diff", "orca_diff.cli")
    return name in ("orca-diff", "orca-diff.exe")


# Ctrl-C while the command is still loading (click, numpy, the command modules): one line and 130,
# never a traceback. Python's own handler is put back as the command starts (main below), so that
# the command's interrupt handling (rerun to resume) applies from there on.
if _as_command():
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_at_start)


def main() -> None:
    """The ``orca-diff`` console script."""
    import signal

    try:
        from .main import main as run

        if signal.getsignal(signal.SIGINT) is _interrupted_at_start:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        run()
    except KeyboardInterrupt:  # during start-up (imports); the group handles it once a command runs
        try:
            sys.stderr.write("orca-diff: interrupted during start-up; nothing was done\n")
        finally:
            os._exit(_INTERRUPTED)


def __getattr__(name: str):
    if name == "cli":
        from .main import cli

        return cli
    raise AttributeError(name)


__all__ = ["cli", "main"]
