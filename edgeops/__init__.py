"""edgeops: build, sign and ship ML models to edge fleets.

The light core — :mod:`edgeops.errors`, :mod:`edgeops.signing`, :mod:`edgeops.manifest`,
:mod:`edgeops.artifact`, :mod:`edgeops.atomic_file`, :mod:`edgeops.runtime` — imports only the standard library,
numpy and cryptography (and an inference runtime, lazily), so the device agent can use it. Everything else in
this package is host/fleet side.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
