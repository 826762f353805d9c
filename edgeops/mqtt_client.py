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

__all__ = ["new_mqtt_client"]


def new_mqtt_client(
    client_id: str,
    *,
    tls: bool,
    ca_certs: Path | None = None,
    username: str | None = None,
    password: str | None = None,
) -> mqtt.Client:
    """A paho 2.x MQTT 5 client (callback API version 2), with TLS against ``ca_certs`` (the system's CAs when
    None) when ``tls``, and the credentials when a user name is given. Nothing connects yet.

    Raises TransportError when the CA file cannot be loaded."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if tls:
        try:
            client.tls_set(ca_certs=str(ca_certs) if ca_certs else None)
        except (OSError, ssl.SSLError, ValueError) as exc:  # missing, unreadable or not a certificate
            raise TransportError(f"cannot set up TLS with CA {ca_certs}: {exc}") from exc
    if username:
        client.username_pw_set(username, password or None)
    return client
