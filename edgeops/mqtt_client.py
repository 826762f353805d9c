"""The host side's paho client factory: one place that makes an MQTT 5 client with TLS and credentials.

The CLI (``command send``, ``deploy``), the release server, the fleet controller and the ingest workers all
start from :func:`new_mqtt_client` and add their own callbacks and limits. The device has its own adapter
(``device_agent.mqtt_link``), which does not import the host side.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeops.errors import TransportError
from edgeops.signing import check_private_key_file

__all__ = ["new_mqtt_client"]


def new_mqtt_client(
    client_id: str,
    *,
    tls: bool,
    ca_certs: Path | None = None,
    username: str | None = None,
    password: str | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> mqtt.Client:
    """A paho 2.x MQTT 5 client (callback API version 2), with TLS against ``ca_certs`` (the system's CAs when
    None) when ``tls``, a client certificate for mutual TLS when ``cert_file`` is given (its key in ``key_file``,
    or in ``cert_file`` itself), and the credentials when a user name is given. Nothing connects yet.

    Raises TransportError when a certificate or key is given without TLS or one of the files cannot be loaded;
    KeyFileError when the key file is missing or readable or writable by group or others."""
    if (cert_file or key_file) and not tls:
        raise TransportError("a client certificate needs a TLS broker URL (mqtts://)")
    if key_file is not None and cert_file is None:
        raise TransportError("a client key was given without its certificate")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if tls:
        if cert_file is not None:
            check_private_key_file(key_file or cert_file)
        try:
            client.tls_set(
                ca_certs=str(ca_certs) if ca_certs else None,
                certfile=str(cert_file) if cert_file else None,
                keyfile=str(key_file) if key_file else None,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:  # missing, unreadable, not a certificate, key mismatch
            what = f"CA {ca_certs}" + (f", certificate {cert_file}, key {key_file or cert_file}" if cert_file else "")
            raise TransportError(f"cannot set up TLS with {what}: {_reason(exc)}") from exc
    if username:
        client.username_pw_set(username, password or None)
    return client


def _reason(exc: BaseException) -> str:
    """An OpenSSL/OS error as one short line (never file contents)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
