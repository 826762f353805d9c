"""`edgeops pki` as an operator uses it: certificates that chain to the fleet CA with the right names and usages,
private keys only the owner can read, a registry and ACL that follow issue / set-groups / revoke, a CRL that lists
every revoked serial, and one-line errors; private key files that others can read are refused everywhere."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeops.cli.main import main
from edgeops.errors import ConfigError, KeyFileError, OutputError
from edgeops.mqtt_client import new_mqtt_client
from edgeops.pki import (
    FLEET_IDENTITY,
    PkiLayout,
    init_pki,
    issue_client,
    issue_device,
    load_registry,
    revoke_device,
    set_groups,
)
from edgeops.signing import check_private_key_file, load_private_key

FLEET = "acme"
ROOT = f"edgeops/v1/{FLEET}"


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_pki(tmp_path / "pki", fleet=FLEET, broker_hosts=("broker.example", "localhost", "127.0.0.1"))
    return tmp_path / "pki"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(pki: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certificates_chain_to_the_ca_with_names_and_usages(pki: Path) -> None:
    layout = PkiLayout.of(pki)
    paths = issue_device(pki, "dev-1", groups=["canary", "eu"])
    ca = _cert(layout.ca_cert)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    for path, cn, purpose in [
        (paths.cert, "dev-1", ExtendedKeyUsageOID.CLIENT_AUTH),
        (layout.fleet_cert, FLEET_IDENTITY, ExtendedKeyUsageOID.CLIENT_AUTH),
        (layout.broker_cert, "broker.example", ExtendedKeyUsageOID.SERVER_AUTH),
    ]:
        cert = _cert(path)
        cert.verify_directly_issued_by(ca)  # raises unless signed by the CA's key
        assert _cn(cert) == cn and _eku(cert) == [purpose]
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    san = _cert(layout.broker_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert _cert(paths.ca_cert) == ca  # the device gets the CA to verify the broker with
    for key in (layout.ca_key, layout.broker_key, layout.fleet_key, paths.key):
        assert _mode(key) == 0o600, key
        check_private_key_file(key)
    assert b"PRIVATE KEY" not in layout.registry.read_bytes() + layout.acl.read_bytes()


def test_registry_and_acl_follow_issue_and_set_groups(pki: Path) -> None:
    issue_device(pki, "dev-1", groups=["canary", "eu"])
    issue_device(pki, "dev-2")
    doc = json.loads((pki / "devices.json").read_text())
    assert doc["fleet"] == FLEET and doc["devices"]["dev-1"]["groups"] == ["canary", "eu"]
    assert doc["devices"]["dev-1"]["serial"] == format(_cert(pki / "devices/dev-1/device.crt").serial_number, "x")
    assert doc["devices"]["dev-1"]["revoked"] is False and doc["devices"]["dev-1"]["not_after"].endswith("Z")
    acl = (pki / "acl").read_text()
    block = acl.split("user dev-1\n")[1].split("\n\n")[0].splitlines()
    assert block == [
        f"topic write {ROOT}/device/dev-1/state",
        f"topic write {ROOT}/device/dev-1/telemetry",
        f"topic write {ROOT}/device/dev-1/event",
        f"topic write {ROOT}/device/dev-1/ota",
        f"topic read {ROOT}/device/dev-1/cmd",
        f"topic read {ROOT}/group/canary/cmd",
        f"topic read {ROOT}/group/eu/cmd",
        f"topic read {ROOT}/release/#",
        f"topic read {ROOT}/trust/#",
    ]
    assert f"user {FLEET_IDENTITY}\ntopic readwrite {ROOT}/#\n" in acl
    assert [ln for ln in acl.splitlines() if ln.startswith("user ")] == [f"user {FLEET_IDENTITY}", "user dev-1",
                                                                        "user dev-2"]
    set_groups(pki, "dev-1", ["eu", "night"])
    acl = (pki / "acl").read_text()
    assert f"topic read {ROOT}/group/canary/cmd" not in acl and f"topic read {ROOT}/group/night/cmd" in acl
    assert load_registry(pki).devices["dev-1"].groups == ("eu", "night")


def test_reissue_needs_the_flag_and_revokes_the_old_certificate(pki: Path) -> None:
    first = _cert(issue_device(pki, "dev-1").cert)
    with pytest.raises(ConfigError, match=r"already has a certificate.*--reissue"):
        issue_device(pki, "dev-1")
    assert _cert(pki / "devices/dev-1/device.crt") == first  # nothing replaced
    second = _cert(issue_device(pki, "dev-1", reissue=True).cert)
    assert second.serial_number != first.serial_number
    crl = _crl(pki)
    assert crl.is_signature_valid(_cert(pki / "ca.crt").public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(first.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is None
    assert load_registry(pki).devices["dev-1"].serial == format(second.serial_number, "x")


def test_revoke_lists_the_serial_in_the_crl_and_drops_the_acl_block(pki: Path) -> None:
    assert len(list(_crl(pki))) == 0  # init writes an empty CRL
    serial = _cert(issue_device(pki, "dev-1", groups=["eu"]).cert).serial_number
    issue_device(pki, "dev-2")
    rec = revoke_device(pki, "dev-1")
    assert rec.revoked and load_registry(pki).devices["dev-1"].revoked
    crl = _crl(pki)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None and len(list(crl)) == 1
    assert crl.next_update_utc is not None and crl.next_update_utc >= _cert(pki / "ca.crt").not_valid_after_utc
    acl = (pki / "acl").read_text()
    assert "user dev-1" not in acl and "device/dev-1/" not in acl and "user dev-2" in acl
    with pytest.raises(ConfigError, match="already revoked"):
        revoke_device(pki, "dev-1")
    with pytest.raises(ConfigError, match="unknown device"):
        revoke_device(pki, "dev-9")
    with pytest.raises(ConfigError, match="revoked"):
        set_groups(pki, "dev-1", ["x"])


def test_names_cannot_cross_between_devices_and_host_identities(pki: Path) -> None:
    with pytest.raises(ConfigError, match="host identity"):
        issue_device(pki, FLEET_IDENTITY)  # would get the fleet service's ACL
    issue_client(pki, "ci")
    with pytest.raises(ConfigError, match="host identity"):
        issue_device(pki, "ci")
    issue_device(pki, "dev-1")
    with pytest.raises(ConfigError, match="is a device id"):
        issue_client(pki, "dev-1")
    for bad in ("a/b", "+", "#", ".hidden", ""):
        with pytest.raises(ConfigError, match="invalid device id"):
            issue_device(pki, bad)
    with pytest.raises(ConfigError, match="invalid group"):
        issue_device(pki, "dev-2", groups=["eu/#"])
    assert "user ci\ntopic readwrite" in (pki / "acl").read_text()
    assert _mode(pki / "clients/ci/client.key") == 0o600


def test_existing_ca_is_kept_unless_forced(pki: Path) -> None:
    ca = (pki / "ca.crt").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        init_pki(pki, fleet=FLEET)
    assert (pki / "ca.crt").read_bytes() == ca
    init_pki(pki, fleet=FLEET, force=True)
    assert (pki / "ca.crt").read_bytes() != ca


def test_mosquitto_conf_requires_client_certificates(pki: Path, tmp_path: Path) -> None:
    conf = (pki / "mosquitto.conf").read_text().splitlines()
    d = pki.resolve()
    for line in ("allow_anonymous false", "listener 8883", f"cafile {d}/ca.crt", f"certfile {d}/broker.crt",
                 f"keyfile {d}/broker.key", f"crlfile {d}/crl.pem", f"acl_file {d}/acl", "require_certificate true",
                 "use_identity_as_username true", "tls_version tlsv1.2"):
        assert line in conf
    init_pki(tmp_path / "p2", fleet=FLEET, port=9883, broker_dir=Path("/etc/mosquitto/edgeops"))
    conf2 = (tmp_path / "p2/mosquitto.conf").read_text()
    assert "listener 9883" in conf2 and "cafile /etc/mosquitto/edgeops/ca.crt" in conf2


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_output_and_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    code, out, _ = _run(capsys, "pki", "init", "--dir", d, "--fleet", FLEET, "--broker-host", "mqtt.acme.io",
                        "--json")
    doc = json.loads(out)
    assert code == 0 and doc["fleet"] == FLEET and doc["broker_hosts"] == ["mqtt.acme.io"] and doc["port"] == 8883
    assert "PRIVATE KEY" not in out
    code, out, _ = _run(capsys, "pki", "issue-device", "dev-1", "--dir", d, "--group", "eu", "--group", "canary",
                        "--json")
    doc = json.loads(out)
    assert code == 0 and doc["name"] == "dev-1" and doc["groups"] == ["eu", "canary"]
    assert Path(doc["key"]).is_file() and _mode(Path(doc["key"])) == 0o600 and "PRIVATE KEY" not in out
    code, out, _ = _run(capsys, "pki", "set-groups", "dev-1", "eu", "--dir", d, "--json")
    assert code == 0 and json.loads(out)["groups"] == ["eu"]
    code, out, _ = _run(capsys, "pki", "revoke-device", "dev-1", "--dir", d)
    assert code == 0 and "revoked dev-1" in out and "SIGHUP" in out
    code, out, _ = _run(capsys, "pki", "list", "--dir", d, "--json")
    listing = json.loads(out)
    assert listing["fleet"] == FLEET and [(r["name"], r["revoked"]) for r in listing["devices"]] == [("dev-1", True)]
    assert [r["name"] for r in listing["clients"]] == [FLEET_IDENTITY]

    for argv, message in [
        (("pki", "init", "--dir", d, "--fleet", FLEET), "already exists"),
        (("pki", "issue-device", "bad/id", "--dir", d), "invalid device id"),
        (("pki", "issue-device", "dev-1", "--dir", d), "already has a certificate"),
        (("pki", "list", "--dir", str(tmp_path / "none")), "not found"),
    ]:
        code, out, err = _run(capsys, *argv)
        assert code == 1 and out == "" and err.startswith("edgeops: error: ") and message in err
        assert len(err.strip().splitlines()) == 1, err


def test_private_keys_others_can_read_are_refused(pki: Path, keys_dir: Path, tmp_path: Path) -> None:
    paths = issue_device(pki, "dev-1")
    key_bytes = paths.key.read_bytes()
    paths.key.chmod(0o644)
    with pytest.raises(KeyFileError) as err:
        check_private_key_file(paths.key)
    assert "0644" in str(err.value) and f"chmod 600 {paths.key}" in str(err.value)
    assert key_bytes.decode().splitlines()[1] not in str(err.value)
    with pytest.raises(KeyFileError, match="chmod 600"):
        new_mqtt_client("c", tls=True, ca_certs=paths.ca_cert, cert_file=paths.cert, key_file=paths.key)
    paths.key.chmod(0o600)
    new_mqtt_client("c", tls=True, ca_certs=paths.ca_cert, cert_file=paths.cert, key_file=paths.key)
    signing = tmp_path / "signing.key"
    signing.write_bytes((keys_dir / "signing.key").read_bytes())
    signing.chmod(0o640)
    with pytest.raises(KeyFileError, match="mode 0640"):
        load_private_key(signing)
    (pki / "ca.key").chmod(0o604)
    with pytest.raises(KeyFileError, match=r"ca\.key"):
        issue_device(pki, "dev-2")


def test_passwords_stay_out_of_reprs(keys_dir: Path) -> None:
    from device_agent.mqtt_link import BrokerSettings
    from edgeops.fleet.service import ServiceConfig

    settings = BrokerSettings("h", 8883, tls=True, username="u", password="s3cret-pw")
    config = ServiceConfig(fleet=FLEET, broker_url="mqtts://h", db="x.db", release_dir=Path("r"),
                           command_key=load_private_key(keys_dir / "signing.key"), password="s3cret-pw")
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in repr(config)
