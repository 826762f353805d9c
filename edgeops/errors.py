"""The one error tree of edgeops.

Every failure a user can cause or meet is an :class:`EdgeopsError`; the CLI turns one into a single line and a
non-zero exit. A caller's misuse of an API (wrong argument type, calling out of order) is a plain
``RuntimeError``/``TypeError`` instead, so that a bug never looks like an attack or a bad model.

::

    EdgeopsError
    ├── UntrustedInput            bytes from a file or the network that fail a check
    │   ├── ArtifactFormatError   not a well-formed edgeops artifact (truncated, extra bytes, bad header)
    │   ├── SignatureError        missing signature, wrong key, signature does not match
    │   └── IntegrityError        a file's bytes do not match the sha256 the signed manifest names
    ├── KeyFileError              a signing/public key file is missing, unreadable or not Ed25519
    ├── ProfileError              unknown profile, malformed profile TOML, unknown pass or option
    ├── BuildError                the compiler could not produce a valid artifact
    │   ├── ModelLoadError        corrupt model file or unknown model format
    │   ├── UnsupportedOpError    an op the profile's target cannot run (names the op and the profile)
    │   ├── DataError             calibration/eval/train data missing, unreadable or of the wrong shape
    │   └── GateFailure           the built artifact missed a budget (names the profile and the figure)
    └── OutputError               the output folder cannot be written
"""

from __future__ import annotations

__all__ = [
    "ArtifactFormatError",
    "BuildError",
    "DataError",
    "EdgeopsError",
    "GateFailure",
    "IntegrityError",
    "KeyFileError",
    "ModelLoadError",
    "OutputError",
    "ProfileError",
    "SignatureError",
    "UnsupportedOpError",
    "UntrustedInput",
]


class EdgeopsError(Exception):
    """Base of every error edgeops raises on purpose."""


class UntrustedInput(EdgeopsError):
    """Input from outside (file, network) failed a check; never trust what came with it."""


class ArtifactFormatError(UntrustedInput):
    """The bytes are not a canonical edgeops artifact."""


class SignatureError(UntrustedInput):
    """The manifest signature is missing, made by another key, or does not match."""


class IntegrityError(UntrustedInput):
    """A file inside an artifact does not match the hash its signed manifest gives."""


class KeyFileError(EdgeopsError):
    """A key file is missing, unreadable or of the wrong kind."""


class ProfileError(EdgeopsError):
    """A hardware profile is unknown or invalid."""


class BuildError(EdgeopsError):
    """The compiler could not build a valid artifact for a profile."""

    def __init__(self, message: str, *, profile: str | None = None) -> None:
        super().__init__(message)
        self.profile = profile


class ModelLoadError(BuildError):
    """The model file is corrupt or of a format edgeops does not read."""


class UnsupportedOpError(BuildError):
    """The model uses an op the profile's target runtime cannot run."""

    def __init__(self, op: str, *, profile: str | None = None, detail: str = "") -> None:
        where = f" for profile {profile}" if profile else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(f"op {op!r} is not supported{where}{extra}", profile=profile)
        self.op = op


class DataError(BuildError):
    """Calibration, evaluation or training data is missing, unreadable or does not fit the model."""


class GateFailure(BuildError):
    """The artifact was built but missed one of its profile's budgets."""

    def __init__(self, message: str, *, profile: str, figure: str) -> None:
        super().__init__(message, profile=profile)
        self.figure = figure


class OutputError(EdgeopsError):
    """The output location cannot be created or written."""
