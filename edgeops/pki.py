"""The fleet's PKI: one offline CA, a broker certificate, one client certificate per device and per host identity,
a revocation list, and the mosquitto ACL and listener configuration that bind each certificate to its topics.

Layout of the PKI directory (default ``./pki``)::

    ca.key  ca.crt            the fleet CA (ECDSA P-256; keyCertSign + cRLSign; path length 0)
    broker.key  broker.crt    the broker's server certificate (serverAuth; SAN = the broker host names/addresses)
    fleet.key  fleet.crt      the fleet service's client identity, CN ``edgeops-fleet`` (clientAuth)
    devices.json              the registry: fleet, devices (groups, serial, not_after, revoked), host clients
    crl.pem                   the CA's revocation list (every revoked serial)
    acl                       mosquitto 2.0 ``acl_file``: one ``user`` block per live identity, nothing else
    mosquitto.conf            a TLS listener that requires a client certificate (absolute paths into this dir)
    devices/<id>/             device.key, device.crt, ca.crt: what one device needs
    clients/<name>/           client.key, client.crt, ca.crt: an operator / CI identity

Guarantees: every key is ECDSA P-256 and every certificate and CRL is signed with SHA-256; private keys are
PKCS#8 PEM files created with mode 0600 (they are never printed, logged or put in an error message); every file
is replaced atomically, so a crash leaves the old or the new version; the registry, the CRL and the ACL are
rewritten together after each change. The broker identifies a client by its certificate's CN
(``use_identity_as_username``), so an identity name is unique across devices and host clients, and a device can
never take a host identity's name. The ACL denies everything not granted (mosquitto's default once an
``acl_file`` is set).

It does not run or signal the broker: mosquitto 2.0 re-reads the ACL and the CRL on SIGHUP (new connections);
a restart also drops a revoked identity's open connection.

Raises: :class:`OutputError` (a file cannot be written, a CA exists), :class:`ConfigError` (a bad name, an unknown
or duplicate identity, a malformed registry), :class:`KeyFileError` (the CA key or certificate is missing or
unreadable).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeops.atomic_file import write_bytes_atomic
from edgeops.errors import ConfigError, KeyFileError, OutputError
from edgeops.protocol import TOPIC_ROOT, device_topics, group_cmd_topic, validate_segment
from edgeops.signing import check_private_key_file

__all__ = [
    "DEFAULT_PKI_DIR",
    "FLEET_IDENTITY",
    "IdentityRecord",
    "IssuedPaths",
    "PkiLayout",
    "Registry",
    "acl_text",
    "init_pki",
    "issue_client",
    "issue_device",
    "load_registry",
    "mosquitto_conf_text",
    "revoke_device",
    "set_groups",
    "write_acl",
]

DEFAULT_PKI_DIR = Path("pki")
FLEET_IDENTITY = "edgeops-fleet"  # the CN of the fleet service's certificate
REGISTRY_FORMAT = 1
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825  # broker, fleet, device and client certificates
_BACKDATE = dt.timedelta(minutes=5)  # notBefore in the past: a device clock a little behind still accepts it
_ROLES = ("fleet", "operator")


@dataclass(frozen=True)
class PkiLayout:
    """The files of a PKI directory (paths; nothing is read)."""

    directory: Path
    ca_key: Path
    ca_cert: Path
    broker_key: Path
    broker_cert: Path
    fleet_key: Path
    fleet_cert: Path
    registry: Path
    crl: Path
    acl: Path
    mosquitto_conf: Path

    @classmethod
    def of(cls, directory: Path) -> PkiLayout:
        d = Path(directory)
        names = ("ca.key", "ca.crt", "broker.key", "broker.crt", "fleet.key", "fleet.crt", "devices.json",
                 "crl.pem", "acl", "mosquitto.conf")
        return cls(d, *(d / n for n in names))


@dataclass(frozen=True)
class IssuedPaths:
    """What an identity needs: its key (mode 0600), its certificate and the CA certificate to verify the broker."""

    key: Path
    cert: Path
    ca_cert: Path


@dataclass(frozen=True)
class IdentityRecord:
    """One certificate identity of the registry (a device, or a host client when ``role`` is set)."""

    name: str
    serial: str  # hex
    not_after: str  # ISO 8601 UTC
    revoked: bool = False
    groups: tuple[str, ...] = ()  # devices only
    role: str | None = None  # host clients only: "fleet" or "operator"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"serial": self.serial, "not_after": self.not_after, "revoked": self.revoked}
        if self.role is None:
            doc["groups"] = list(self.groups)
        else:
            doc["role"] = self.role
        return doc


@dataclass(frozen=True)
class Registry:
    """``devices.json``: the fleet, its identities and every revoked serial (what the CRL lists)."""

    fleet: str
    devices: dict[str, IdentityRecord]
    clients: dict[str, IdentityRecord]
    revoked_serials: tuple[str, ...] = ()
    crl_number: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REGISTRY_FORMAT,
            "fleet": self.fleet,
            "devices": {k: v.to_json() for k, v in sorted(self.devices.items())},
            "clients": {k: v.to_json() for k, v in sorted(self.clients.items())},
            "revoked_serials": list(self.revoked_serials),
            "crl_number": self.crl_number,
        }


# --- keys and certificates ---------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_bytes_atomic(path, pem, mode=0o600)  # created 0600 by mkstemp: never readable by others, even briefly


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_bytes_atomic(path, cert.public_bytes(serialization.Encoding.PEM))


def _mkdir(path: Path, mode: int = 0o700) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc.strerror}") from exc


def _load_ca(layout: PkiLayout) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    for path in (layout.ca_key, layout.ca_cert):
        if not path.is_file():
            raise KeyFileError(f"{path} not found: run `edgeops pki init --dir {layout.directory}` first")
    check_private_key_file(layout.ca_key)
    try:
        key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read the CA in {layout.directory}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"the CA in {layout.directory} is not an unencrypted PEM key and certificate") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{layout.ca_key} is not an ECDSA key")
    return key, cert


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int,
             not_after_cap: dt.datetime | None) -> x509.CertificateBuilder:
    now = _now()
    not_after = now + dt.timedelta(days=days)
    if not_after_cap is not None:
        not_after = min(not_after, not_after_cap)  # a leaf never outlives its CA
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _issue_leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, subject: x509.Name, *, days: int,
    usage: x509.ObjectIdentifier, san: Sequence[x509.GeneralName] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    b = (
        _builder(subject, ca_cert.subject, key.public_key(), days, ca_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _name(cn: str, fleet: str, unit: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"edgeops fleet {fleet}"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:@"):
                raise ConfigError(f"invalid broker host {host!r}: expected a DNS name or an IP address") from None
            out.append(x509.DNSName(host))
    return out


def _record(cert: x509.Certificate, name: str, **kw: Any) -> IdentityRecord:
    return IdentityRecord(name=name, serial=format(cert.serial_number, "x"), not_after=_iso(cert.not_valid_after_utc),
                          **kw)


# --- registry ----------------------------------------------------------------------------------------------------


def _bad(path: Path, detail: str) -> ConfigError:
    return ConfigError(f"{path}: malformed PKI registry ({detail})")


def _parse_record(path: Path, name: Any, doc: Any, *, device: bool) -> IdentityRecord:
    if not isinstance(name, str) or not isinstance(doc, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    serial, not_after, revoked = doc.get("serial"), doc.get("not_after"), doc.get("revoked")
    if not isinstance(serial, str) or not isinstance(not_after, str) or not isinstance(revoked, bool):
        raise _bad(path, f"{name!r} needs serial, not_after (strings) and revoked (boolean)")
    try:
        validate_segment(name, "identity")
        int(serial, 16)
        if device:
            groups = doc.get("groups")
            if not isinstance(groups, list):
                raise ValueError("groups must be a list")
            return IdentityRecord(name, serial, not_after, revoked,
                                  groups=tuple(validate_segment(g, "group") for g in groups))
    except ValueError as exc:
        raise _bad(path, f"{name!r}: {exc}") from None
    role = doc.get("role")
    if role not in _ROLES:
        raise _bad(path, f"{name!r}: role must be one of {', '.join(_ROLES)}")
    return IdentityRecord(name, serial, not_after, revoked, role=role)


def load_registry(directory: Path) -> Registry:
    """Read ``devices.json``. Raises ConfigError when it is missing or malformed."""
    path = PkiLayout.of(directory).registry
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run `edgeops pki init --dir {directory}` first") from None
    except (OSError, ValueError) as exc:
        raise _bad(path, str(exc).splitlines()[0]) from None
    if not isinstance(doc, dict) or doc.get("format") != REGISTRY_FORMAT:
        raise _bad(path, f"expected an object with format {REGISTRY_FORMAT}")
    devices, clients, revoked = doc.get("devices"), doc.get("clients"), doc.get("revoked_serials")
    number = doc.get("crl_number")
    if not (isinstance(devices, dict) and isinstance(clients, dict) and isinstance(revoked, list)
            and all(isinstance(s, str) for s in revoked) and isinstance(number, int)):
        raise _bad(path, "devices/clients must be objects, revoked_serials a list of strings, crl_number an integer")
    try:
        fleet = validate_segment(doc.get("fleet"), "fleet")  # type: ignore[arg-type]
    except ValueError as exc:
        raise _bad(path, str(exc)) from None
    return Registry(
        fleet=fleet,
        devices={k: _parse_record(path, k, v, device=True) for k, v in devices.items()},
        clients={k: _parse_record(path, k, v, device=False) for k, v in clients.items()},
        revoked_serials=tuple(revoked),
        crl_number=number,
    )


def _save_registry(layout: PkiLayout, reg: Registry) -> None:
    write_bytes_atomic(layout.registry, (json.dumps(reg.to_json(), indent=2) + "\n").encode())


# --- CRL, ACL, broker configuration ------------------------------------------------------------------------------


def _write_crl(layout: PkiLayout, reg: Registry, ca_key: ec.EllipticCurvePrivateKey,
               ca_cert: x509.Certificate) -> None:
    """Sign a CRL listing every revoked serial. It stays valid as long as the CA (OpenSSL refuses every client
    once a CRL's nextUpdate has passed, so a short-lived CRL would lock the whole fleet out)."""
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1)))
        .add_extension(x509.CRLNumber(reg.crl_number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    for serial in reg.revoked_serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(now).build()
        )
    write_bytes_atomic(layout.crl, b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def _host_acl(fleet: str) -> list[str]:
    root = f"{TOPIC_ROOT}/{fleet}"
    return [f"topic readwrite {root}/#"]


def _device_acl(fleet: str, rec: IdentityRecord) -> list[str]:
    t = device_topics(fleet, rec.name)
    root = f"{TOPIC_ROOT}/{fleet}"
    lines = [f"topic write {topic}" for topic in (t.state, t.telemetry, t.event, t.ota)]
    lines.append(f"topic read {t.cmd}")
    lines += [f"topic read {group_cmd_topic(fleet, g)}" for g in rec.groups]
    lines += [f"topic read {root}/release/#", f"topic read {root}/trust/#"]
    return lines


def acl_text(reg: Registry) -> str:
    """The mosquitto 2.0 ``acl_file`` for ``reg``: a ``user`` block per live identity (revoked ones have none)."""
    out = [
        f"# edgeops fleet {reg.fleet}: mosquitto acl_file written by `edgeops pki` from devices.json (do not edit).",
        "# user = the client certificate's CN (use_identity_as_username true). What is not granted is denied.",
    ]
    for name, rec in sorted(reg.clients.items()):
        if not rec.revoked:
            out += ["", f"# {rec.role}", f"user {name}", *_host_acl(reg.fleet)]
    for name, rec in sorted(reg.devices.items()):
        if not rec.revoked:
            groups = ", ".join(rec.groups) or "none"
            out += ["", f"# device, groups: {groups}", f"user {name}", *_device_acl(reg.fleet, rec)]
    return "\n".join(out) + "\n"


def mosquitto_conf_text(layout: PkiLayout, port: int, broker_dir: Path | None = None) -> str:
    """A mosquitto 2.0 configuration: one TLS listener on ``port`` requiring a client certificate from the CA,
    the certificate's CN as user name, the CRL and the ACL. Paths are absolute: ``broker_dir`` (where the broker
    host keeps ca.crt, broker.crt/.key, crl.pem and acl) or else the PKI directory, resolved (mosquitto resolves
    relative paths against its working directory, not the configuration file's)."""
    d = Path(broker_dir) if broker_dir is not None else layout.directory.resolve()
    if not d.is_absolute():
        raise ConfigError(f"the broker's directory must be an absolute path, got {str(d)!r}")
    return "\n".join([
        "# edgeops fleet broker (mosquitto 2.0), written by `edgeops pki init`. Paths are absolute.",
        "# Add persistence, logging and limits in your own file (e.g. with include_dir).",
        "# The ACL and the CRL are re-read on SIGHUP; restart to also drop a revoked identity's open connection.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {d / layout.acl.name}",
        "",
        f"listener {port}",
        f"cafile {d / layout.ca_cert.name}",
        f"certfile {d / layout.broker_cert.name}",
        f"keyfile {d / layout.broker_key.name}",
        f"crlfile {d / layout.crl.name}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        "",
    ])


def write_acl(directory: Path) -> Path:
    """Regenerate ``acl`` from ``devices.json``; returns its path. Raises ConfigError, OutputError."""
    layout = PkiLayout.of(directory)
    write_bytes_atomic(layout.acl, acl_text(load_registry(directory)).encode())
    return layout.acl


def _commit(layout: PkiLayout, reg: Registry, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None) -> None:
    _save_registry(layout, reg)
    if ca is not None:
        _write_crl(layout, reg, *ca)
    write_bytes_atomic(layout.acl, acl_text(reg).encode())


# --- operations --------------------------------------------------------------------------------------------------


def _segment(value: str, what: str) -> str:
    try:
        return validate_segment(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _positive_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"days must be a positive integer, got {days!r}")


def init_pki(
    directory: Path,
    *,
    fleet: str,
    broker_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = DEFAULT_CA_DAYS,
    port: int = 8883,
    force: bool = False,
    broker_dir: Path | None = None,
) -> PkiLayout:
    """Create the CA (valid ``days``), the broker certificate (SAN = ``broker_hosts``), the fleet identity, an empty
    registry, the CRL, the ACL and ``mosquitto.conf`` (a TLS listener on ``port``; its file paths point into
    ``broker_dir`` when given, for a broker host that gets copies of the broker's files) in ``directory``.

    With ``force`` an existing PKI is replaced by a new CA: every certificate issued before stops working.
    Raises OutputError when a CA exists (and not ``force``) or a file cannot be written; ConfigError for a bad
    fleet name, host, port or lifetime."""
    layout = PkiLayout.of(directory)
    fleet = _segment(fleet, "fleet")
    _positive_days(days)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port must be within 1..65535, got {port!r}")
    hosts = list(dict.fromkeys(broker_hosts))
    if not hosts:
        raise ConfigError("at least one broker host is needed (the broker certificate's names)")
    san = _san(hosts)
    conf = mosquitto_conf_text(layout, port, broker_dir)
    if not force and (layout.ca_key.exists() or layout.ca_cert.exists()):
        raise OutputError(f"{layout.ca_cert} already exists (refusing to replace a fleet CA; --force replaces it "
                          "and invalidates every certificate it issued)")
    _mkdir(layout.directory)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"edgeops fleet {fleet}"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"edgeops {fleet} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), days, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_days = min(days, DEFAULT_LEAF_DAYS)
    broker_key, broker_cert = _issue_leaf(ca_key, ca_cert, _name(hosts[0], fleet, "broker"), days=leaf_days,
                                          usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    fleet_key, fleet_cert = _issue_leaf(ca_key, ca_cert, _name(FLEET_IDENTITY, fleet, "fleet"), days=leaf_days,
                                        usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write_key(layout.ca_key, ca_key)
    _write_cert(layout.ca_cert, ca_cert)
    _write_key(layout.broker_key, broker_key)
    _write_cert(layout.broker_cert, broker_cert)
    _write_key(layout.fleet_key, fleet_key)
    _write_cert(layout.fleet_cert, fleet_cert)
    reg = Registry(fleet=fleet, devices={}, clients={FLEET_IDENTITY: _record(fleet_cert, FLEET_IDENTITY, role="fleet")})
    _commit(layout, reg, (ca_key, ca_cert))
    write_bytes_atomic(layout.mosquitto_conf, conf.encode())
    return layout


def _write_identity(
    layout: PkiLayout, paths: IssuedPaths, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *, replace: bool
) -> None:
    _mkdir(paths.key.parent)
    if not replace and (paths.key.exists() or paths.cert.exists()):
        raise OutputError(f"{paths.key} already exists (refusing to overwrite a private key)")
    _write_key(paths.key, key)
    _write_cert(paths.cert, cert)
    if paths.ca_cert != layout.ca_cert:
        try:
            write_bytes_atomic(paths.ca_cert, layout.ca_cert.read_bytes())
        except OSError as exc:
            raise KeyFileError(f"cannot read {layout.ca_cert}: {exc.strerror}") from exc


def _revoked_with(reg: Registry, old: IdentityRecord | None) -> tuple[tuple[str, ...], bool]:
    """The revoked serials once ``old`` (being replaced) is revoked, and whether that changed the list."""
    if old is None or old.revoked or old.serial in reg.revoked_serials:
        return reg.revoked_serials, False
    return (*reg.revoked_serials, old.serial), True


def issue_device(
    directory: Path,
    device_id: str,
    *,
    groups: Sequence[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
    out: Path | None = None,
    reissue: bool = False,
) -> IssuedPaths:
    """Issue ``device_id``'s certificate (CN = the id, clientAuth) and key, record it with its ``groups`` and
    regenerate the ACL. Files: ``device.key`` (0600), ``device.crt``, ``ca.crt`` in ``out`` (default
    ``devices/<id>``). An id already in the registry needs ``reissue``, which revokes the old serial (CRL).

    Raises ConfigError for a bad or taken id or group, OutputError, KeyFileError (no CA)."""
    layout = PkiLayout.of(directory)
    device_id = _segment(device_id, "device id")
    clean_groups = tuple(dict.fromkeys(_segment(g, "group") for g in groups))
    _positive_days(days)
    reg = load_registry(directory)
    if device_id in reg.clients:
        raise ConfigError(f"{device_id!r} is the name of a host identity ({reg.clients[device_id].role}), "
                          "not usable as a device id")
    old = reg.devices.get(device_id)
    if old is not None and not reissue:
        raise ConfigError(f"device {device_id!r} already has a certificate (serial {old.serial}); re-issue it with "
                          "--reissue, which revokes the old one")
    ca = _load_ca(layout)
    key, cert = _issue_leaf(*ca, _name(device_id, reg.fleet, "device"), days=days,
                            usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    folder = Path(out) if out is not None else layout.directory / "devices" / device_id
    paths = IssuedPaths(folder / "device.key", folder / "device.crt", folder / "ca.crt")
    _write_identity(layout, paths, key, cert, replace=reissue)
    revoked, changed = _revoked_with(reg, old)
    devices = {**reg.devices, device_id: _record(cert, device_id, groups=clean_groups)}
    new = Registry(reg.fleet, devices, reg.clients, revoked, reg.crl_number + changed)
    _commit(layout, new, ca if changed else None)
    return paths


def issue_client(
    directory: Path,
    name: str,
    *,
    role: str = "operator",
    days: int = DEFAULT_LEAF_DAYS,
    out: Path | None = None,
    reissue: bool = False,
) -> IssuedPaths:
    """Issue a host identity (``operator`` for CLI/CI, ``fleet`` for a service) with the fleet service's access
    (read and write the whole fleet's topics). Files: ``client.key`` (0600), ``client.crt``, ``ca.crt`` in ``out``
    (default ``clients/<name>``; the fleet identity ``edgeops-fleet`` is renewed in place as fleet.key/fleet.crt).

    Raises ConfigError for a bad name or role, a device's name, or an existing identity without ``reissue``."""
    layout = PkiLayout.of(directory)
    name = _segment(name, "client name")
    if role not in _ROLES:
        raise ConfigError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")
    _positive_days(days)
    reg = load_registry(directory)
    if name in reg.devices:
        raise ConfigError(f"{name!r} is a device id, not usable as a host identity")
    old = reg.clients.get(name)
    if old is not None and not reissue:
        raise ConfigError(f"client {name!r} already has a certificate (serial {old.serial}); re-issue it with "
                          "--reissue, which revokes the old one")
    ca = _load_ca(layout)
    key, cert = _issue_leaf(*ca, _name(name, reg.fleet, role), days=days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    if name == FLEET_IDENTITY and out is None:
        paths = IssuedPaths(layout.fleet_key, layout.fleet_cert, layout.ca_cert)
    else:
        folder = Path(out) if out is not None else layout.directory / "clients" / name
        paths = IssuedPaths(folder / "client.key", folder / "client.crt", folder / "ca.crt")
    _write_identity(layout, paths, key, cert, replace=reissue)
    revoked, changed = _revoked_with(reg, old)
    clients = {**reg.clients, name: _record(cert, name, role=role)}
    new = Registry(reg.fleet, reg.devices, clients, revoked, reg.crl_number + changed)
    _commit(layout, new, ca if changed else None)
    return paths


def set_groups(directory: Path, device_id: str, groups: Sequence[str]) -> IdentityRecord:
    """Replace a device's groups (the group cmd topics it may read) and regenerate the ACL; returns the record.
    Raises ConfigError for an unknown or revoked device or a bad group name, OutputError."""
    reg = load_registry(directory)
    old = reg.devices.get(device_id)
    if old is None:
        raise ConfigError(f"unknown device {device_id!r} (see `edgeops pki list`)")
    if old.revoked:
        raise ConfigError(f"device {device_id!r} is revoked")
    clean = tuple(dict.fromkeys(_segment(g, "group") for g in groups))
    rec = IdentityRecord(old.name, old.serial, old.not_after, old.revoked, groups=clean)
    _commit(PkiLayout.of(directory), Registry(reg.fleet, {**reg.devices, device_id: rec}, reg.clients,
                                             reg.revoked_serials, reg.crl_number), None)
    return rec


def revoke_device(directory: Path, name: str) -> IdentityRecord:
    """Revoke a device (or a host client) by name: its serial goes into ``crl.pem`` (a new CRL number) and its ACL
    block is dropped. After a SIGHUP the broker denies it every topic (ACL) and refuses new TLS handshakes with it
    (CRL); a restart also drops its open connection. Raises ConfigError for an unknown or already revoked identity,
    KeyFileError (no CA), OutputError."""
    layout = PkiLayout.of(directory)
    reg = load_registry(directory)
    old = reg.devices.get(name) or reg.clients.get(name)
    if old is None:
        raise ConfigError(f"unknown device {name!r} (see `edgeops pki list`)")
    if old.revoked:
        raise ConfigError(f"{name!r} is already revoked (serial {old.serial})")
    ca = _load_ca(layout)
    rec = IdentityRecord(old.name, old.serial, old.not_after, True, groups=old.groups, role=old.role)
    devices, clients = dict(reg.devices), dict(reg.clients)
    (clients if old.role is not None else devices)[name] = rec
    revoked, _ = _revoked_with(reg, old)
    _commit(layout, Registry(reg.fleet, devices, clients, revoked, reg.crl_number + 1), ca)
    return rec
