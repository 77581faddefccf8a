"""Build hook for the optional C extension ``orca_diff._entropy`` (pyproject.toml holds the metadata).

The extension makes the ``ans`` codec fast (decode >= 1 GB/s per core); without a C compiler
``pip install .`` still succeeds and orca-diff uses the identical pure-numpy coder
(``orca_diff/entropy.py``), only slower.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Report, rather than fail on, a missing or failing compiler."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure leaves the numpy path
            print(f"warning: orca_diff._entropy not built ({exc}); using the pure-numpy coder", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: {ext.name} not built ({exc}); using the pure-numpy coder", file=sys.stderr)


args = ["/O2"] if sys.platform == "win32" else ["-O3", "-std=c99"]
setup(
    ext_modules=[Extension("orca_diff._entropy", ["orca_diff/_entropy.c"], extra_compile_args=args, optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
