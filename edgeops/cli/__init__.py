"""The ``edgeops`` command line. Every :class:`EdgeopsError` becomes one line on stderr and exit status 1."""

from edgeops.cli.main import main

__all__ = ["main"]
