"""``python -m orca_diff.cli``: the same as the ``orca-diff`` command."""

from . import main

main()
