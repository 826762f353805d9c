"""The agent's configuration: ``agent.toml`` → :class:`AgentConfig` (a frozen value).

Every key is checked on load; an unknown key, a wrong type or a missing required key raises
:class:`ConfigError` naming the file and the key, so a typo never silently falls back to a default. Relative
paths are resolved against the config file's directory. The layout is documented in docs/agent.md.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeops.errors import ConfigError
from edgeops.protocol import parse_broker_url, validate_segment

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["AgentConfig", "ApiConfig", "BrokerConfig", "HealthConfig", "TelemetryConfig", "load_config"]


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive_s: int = 30
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    session_expiry_s: int = 86400  # the broker keeps our subscriptions and queued QoS 1 messages this long offline
    max_backoff_s: float = 30.0  # reconnect attempts back off exponentially from 1 s up to this


@dataclass(frozen=True)
class OtaConfig:
    max_download_bytes: int = 1024**3  # a release whose payload or target is larger is refused before download
    repair_idle_s: float = 2.0  # ask for missing chunks after this long without one arriving
    repair_min_interval_s: float = 2.0  # at most one repair request per this many seconds
    sync_every_chunks: int = 128  # fsync the download every N chunks (the flags are re-verified on resume)


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = 60.0  # seconds between telemetry messages
    spool_max_messages: int = 100_000  # oldest dropped (and counted) beyond this
    psi_warn: float = 0.1
    psi_alert: float = 0.25
    drift_min_samples: int = 200  # values per tensor before PSI is reported


@dataclass(frozen=True)
class ApiConfig:
    address: str = "127.0.0.1:8780"  # "HOST:PORT" or "unix:/path/to.sock"; "" disables the API
    max_request_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class HealthConfig:
    latency_runs: int = 20  # single-sample runs timed by the health gate
    latency_budget_factor: float = 1.0  # x the profile's latency_p95_ms budget
    max_error_rate: float = 0.2  # runtime errors / requests over the window that trigger a rollback
    error_window: int = 50  # requests
    min_errors: int = 5  # never roll back on fewer errors than this


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    fleet: str
    profile: str
    data_dir: Path
    trusted_keys: tuple[Path, ...]  # static-key mode; empty when trust_root names the keys
    command_keys: tuple[Path, ...]
    groups: tuple[str, ...] = ()
    threads: int | None = None  # overrides the manifest's runtime_config threads
    initial_artifact: Path | None = None
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    trust_root: Path | None = None  # [trust] root: the provisioning TUF root; then the root names every key
    source: Path | None = None  # the file it came from


def _take(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in doc:
        if default is ...:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return default
    value: Any = doc.pop(key)
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"{where}: {key!r} must be a number")
    if kind is float or kind == (int, float):
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key!r} must be a number")
        return float(value)
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _no_extra(doc: Mapping[str, Any], where: str) -> None:
    if doc:
        raise ConfigError(f"{where}: unknown key(s) {sorted(doc)}")


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _positive(value: float, key: str, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: {key!r} must be > 0")


def _section(doc: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    sec = doc.pop(name, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return dict(sec)


def _broker(doc: dict[str, Any], base: Path, where: str) -> BrokerConfig:
    w = f"{where} [broker]"
    url = _take(doc, "url", str, w, "mqtt://127.0.0.1:1883")
    try:
        parse_broker_url(url)
    except ValueError as exc:
        raise ConfigError(f"{w}: {exc}") from None
    files = {k: _take(doc, k, str, w, None) for k in ("ca_file", "cert_file", "key_file")}
    cfg = BrokerConfig(
        url=url,
        username=_take(doc, "username", str, w, None) or None,
        password=_take(doc, "password", str, w, None) or None,
        keepalive_s=_take(doc, "keepalive_s", int, w, 30),
        session_expiry_s=_take(doc, "session_expiry_s", int, w, 86400),
        max_backoff_s=_take(doc, "max_backoff_s", float, w, 30.0),
        **{k: _path(base, v) if v else None for k, v in files.items()},
    )
    _no_extra(doc, w)
    _positive(cfg.keepalive_s, "keepalive_s", w)
    if cfg.max_backoff_s < 1:
        raise ConfigError(f"{w}: 'max_backoff_s' must be >= 1")
    if cfg.session_expiry_s < 0:
        raise ConfigError(f"{w}: 'session_expiry_s' must be >= 0")
    return cfg


def _ota(doc: dict[str, Any], where: str) -> OtaConfig:
    w = f"{where} [ota]"
    d = OtaConfig()
    cfg = OtaConfig(
        max_download_bytes=_take(doc, "max_download_bytes", int, w, d.max_download_bytes),
        repair_idle_s=float(_take(doc, "repair_idle_s", (int, float), w, d.repair_idle_s)),
        repair_min_interval_s=float(_take(doc, "repair_min_interval_s", (int, float), w, d.repair_min_interval_s)),
        sync_every_chunks=_take(doc, "sync_every_chunks", int, w, d.sync_every_chunks),
    )
    _no_extra(doc, w)
    for key in ("max_download_bytes", "repair_idle_s", "repair_min_interval_s", "sync_every_chunks"):
        _positive(getattr(cfg, key), key, w)
    return cfg


def _telemetry(doc: dict[str, Any], where: str) -> TelemetryConfig:
    w = f"{where} [telemetry]"
    d = TelemetryConfig()
    cfg = TelemetryConfig(
        interval_s=_take(doc, "interval_s", float, w, d.interval_s),
        spool_max_messages=_take(doc, "spool_max_messages", int, w, d.spool_max_messages),
        psi_warn=_take(doc, "psi_warn", float, w, d.psi_warn),
        psi_alert=_take(doc, "psi_alert", float, w, d.psi_alert),
        drift_min_samples=_take(doc, "drift_min_samples", int, w, d.drift_min_samples),
    )
    _no_extra(doc, w)
    for key in ("interval_s", "spool_max_messages", "psi_warn", "psi_alert"):
        _positive(getattr(cfg, key), key, w)
    if cfg.psi_alert < cfg.psi_warn:
        raise ConfigError(f"{w}: psi_alert must be >= psi_warn")
    return cfg


def _api(doc: dict[str, Any], where: str) -> ApiConfig:
    w = f"{where} [api]"
    cfg = ApiConfig(
        address=_take(doc, "address", str, w, ApiConfig.address),
        max_request_bytes=_take(doc, "max_request_bytes", int, w, ApiConfig.max_request_bytes),
    )
    _no_extra(doc, w)
    _positive(cfg.max_request_bytes, "max_request_bytes", w)
    if cfg.address and not cfg.address.startswith("unix:") and cfg.address.rpartition(":")[0] == "":
        raise ConfigError(f"{w}: address must be HOST:PORT or unix:/path, got {cfg.address!r}")
    return cfg


def _health(doc: dict[str, Any], where: str) -> HealthConfig:
    w = f"{where} [health]"
    d = HealthConfig()
    cfg = HealthConfig(
        latency_runs=_take(doc, "latency_runs", int, w, d.latency_runs),
        latency_budget_factor=_take(doc, "latency_budget_factor", float, w, d.latency_budget_factor),
        max_error_rate=_take(doc, "max_error_rate", float, w, d.max_error_rate),
        error_window=_take(doc, "error_window", int, w, d.error_window),
        min_errors=_take(doc, "min_errors", int, w, d.min_errors),
    )
    _no_extra(doc, w)
    for key in ("latency_runs", "latency_budget_factor", "max_error_rate", "error_window", "min_errors"):
        _positive(getattr(cfg, key), key, w)
    return cfg


def _segment(value: str, what: str, where: str) -> str:
    try:
        return validate_segment(value, what)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_config(doc: Mapping[str, Any], base: Path, where: str) -> AgentConfig:
    """Build an AgentConfig from a parsed TOML document. Raises ConfigError."""
    d = dict(doc)
    trust = _section(d, "trust", where)
    trust_root = _take(trust, "root", str, f"{where} [trust]", None)
    _no_extra(trust, f"{where} [trust]")
    if trust_root is not None and ("trusted_keys" in d or "command_keys" in d):
        raise ConfigError(
            f"{where}: trusted_keys/command_keys are for static keys; with [trust] root the root names every key"
        )
    keys = _take(d, "trusted_keys", list, where, [] if trust_root else ...)
    cmd_keys = _take(d, "command_keys", list, where, keys)
    groups = _take(d, "groups", list, where, [])
    if trust_root is None and (not keys or not all(isinstance(k, str) for k in [*keys, *cmd_keys])):
        raise ConfigError(f"{where}: trusted_keys must be a non-empty list of key file paths (or set [trust] root)")
    initial = _take(d, "initial_artifact", str, where, None)
    threads = _take(d, "threads", int, where, None)
    cfg = AgentConfig(
        device_id=_segment(_take(d, "device_id", str, where), "device_id", where),
        fleet=_segment(_take(d, "fleet", str, where), "fleet", where),
        profile=_take(d, "profile", str, where),
        data_dir=_path(base, _take(d, "data_dir", str, where)),
        trusted_keys=tuple(_path(base, k) for k in keys),
        command_keys=tuple(_path(base, k) for k in cmd_keys),
        groups=tuple(_segment(str(g), "group", where) for g in groups),
        threads=threads,
        initial_artifact=_path(base, initial) if initial else None,
        broker=_broker(_section(d, "broker", where), base, where),
        telemetry=_telemetry(_section(d, "telemetry", where), where),
        api=_api(_section(d, "api", where), where),
        health=_health(_section(d, "health", where), where),
        ota=_ota(_section(d, "ota", where), where),
        trust_root=_path(base, trust_root) if trust_root else None,
        source=base / "agent.toml" if where == "<config>" else Path(where),
    )
    _no_extra(d, where)
    if threads is not None and threads < 1:
        raise ConfigError(f"{where}: 'threads' must be >= 1")
    return cfg


def load_config(path: Path) -> AgentConfig:
    """Read and check ``agent.toml``. Raises ConfigError (missing file, bad TOML, bad key)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(doc, path.resolve().parent, str(path))
