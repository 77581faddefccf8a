"""The ``orca-diff`` command line: a thin layer over the library (one module per topic)."""

from .main import cli, main

__all__ = ["cli", "main"]
