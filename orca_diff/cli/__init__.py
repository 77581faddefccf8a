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


def main() -> None:
    """The ``orca-diff`` console script."""
    try:
        from .main import main as run

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
