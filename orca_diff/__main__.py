"""``python -m orca_diff``: the same as the ``orca-diff`` command."""

from .cli import main

main()
