"""The one error tree of edgeops.

Every failure a user can cause or meet is an :class:`EdgeopsError`; the CLI turns one into a single line and a
non-zero exit. A caller's misuse of an API (wrong argument type, calling out of order) is a plain
``RuntimeError``/``TypeError`` instead, so that a bug never looks like an attack or a bad model.

::

    EdgeopsError
    ├── UntrustedInput            bytes from a file or the network that fail a check
    │   ├── ArtifactFormatError   not a well-formed edgeops artifact (truncated, extra bytes, bad header)
    │   ├── SignatureError        missing signature, wrong key, signature does not match
    │   ├── IntegrityError        a file's bytes do not match the sha256 the signed manifest names
    │   ├── ProfileMismatch       an artifact built for another hardware profile than the device's
    │   ├── DowngradeError        an artifact not newer than what the device has run (anti-rollback)
    │   ├── CommandRejected       a fleet command that is malformed, unsigned, forged, expired or replayed
    │   ├── DeltaFormatError      a delta patch that is malformed, truncated or made for another base file
    │   ├── ReleaseRejected       OTA input refused (release metadata, chunk, repair request); has a reason code
    │   ├── RequestError          a malformed inference request (shape, dtype, size)
    │   └── TelemetryRejected     a device's state, telemetry or event message the fleet ingest cannot store
    ├── KeyFileError              a signing/public key file is missing, unreadable or not Ed25519
    ├── ProfileError              unknown profile, malformed profile TOML, unknown pass or option
    ├── BuildError                the compiler could not produce a valid artifact
    │   ├── ModelLoadError        corrupt model file or unknown model format
    │   ├── UnsupportedOpError    an op the profile's target cannot run (names the op and the profile)
    │   ├── DataError             calibration/eval/train data missing, unreadable or of the wrong shape
    │   └── GateFailure           the built artifact missed a budget (names the profile and the figure)
    ├── OutputError               the output folder cannot be written
    ├── ConfigError               agent.toml is missing or invalid
    ├── HealthGateFailed          a new model failed its health gate on the device (load, golden, latency)
    ├── StorageError              something cannot be persisted (disk full, read-only dir, database unavailable)
    ├── TransportError            the broker cannot be reached (the agent keeps serving and spools)
    └── RolloutError              a deployment the fleet cannot start (unknown release, empty group, no match)

``edgeops.runtime.RuntimeUnavailable`` (an EdgeopsError) is raised when a model's runtime is missing or cannot
load the model.
"""

from __future__ import annotations

__all__ = [
    "ArtifactFormatError",
    "BuildError",
    "CommandRejected",
    "ConfigError",
    "DataError",
    "DeltaFormatError",
    "DowngradeError",
    "EdgeopsError",
    "GateFailure",
    "HealthGateFailed",
    "IntegrityError",
    "KeyFileError",
    "ModelLoadError",
    "OutputError",
    "ProfileError",
    "ProfileMismatch",
    "ReleaseRejected",
    "RequestError",
    "RolloutError",
    "SignatureError",
    "StorageError",
    "TelemetryRejected",
    "TransportError",
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


class ProfileMismatch(UntrustedInput):
    """The artifact was built for another hardware profile than the device's."""


class DowngradeError(UntrustedInput):
    """The artifact's version is not newer than the highest version this device has accepted."""


class CommandRejected(UntrustedInput):
    """A fleet command failed a check; ``reason`` is a short code that goes on the event topic."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"command rejected ({reason}){': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail


class DeltaFormatError(UntrustedInput):
    """A delta patch is malformed or truncated, or does not fit the base file it is applied to."""


class ReleaseRejected(UntrustedInput):
    """OTA input failed a check; ``reason`` is a short code (see ``edgeops.release.OtaReason``) for events."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"release rejected ({reason}){': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail


class RequestError(UntrustedInput):
    """An inference request that does not fit the model (names, shape, dtype, size)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status the local API answers with (400, 413, 415)


class TelemetryRejected(UntrustedInput):
    """A device message the fleet side refuses to store; ``reason`` is a short code for the ingest counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"telemetry rejected ({reason}){': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail


class ConfigError(EdgeopsError):
    """The agent configuration is missing or invalid (names the file and the key)."""


class HealthGateFailed(EdgeopsError):
    """A model failed the device's health gate; ``check`` is "load", "golden" or "latency"."""

    def __init__(self, message: str, *, check: str) -> None:
        super().__init__(message)
        self.check = check


class StorageError(EdgeopsError):
    """Data could not be persisted: disk full, a read-only or missing directory, or a database that is down or
    locked (the fleet ingest backs off and retries)."""


class TransportError(EdgeopsError):
    """The MQTT broker cannot be reached or refused the connection."""


class RolloutError(EdgeopsError):
    """A deployment or rollout operation the fleet refuses: unknown release, empty group, nothing to roll back,
    an operation the rollout's state does not allow (resume a finished rollout...)."""
