"""Update trust without a broker: the TUF checks (edgeops.trust), the repository (edgeops.trust_repo) and the
device's trust store (device_agent.trust_client) on real metadata signed with real keys."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from device_agent.trust_client import TrustClient
from edgeops.errors import ConfigError, ReleaseRejected
from edgeops.release import Payload, PayloadKind, ReleaseMetadata, sign_release
from edgeops.signing import load_private_key
from edgeops.trust import COMMANDS_ROLE, TrustSession, check_release, role_keys, trust_topics
from edgeops.trust_repo import TrustRepo, init_repo

FLEET = "acme"
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def repo(tmp_path: Path) -> TrustRepo:
    r = init_repo(tmp_path / "trust", fleet=FLEET, now=NOW)
    r.publish_timestamp(key(r, "timestamp"), now=NOW)
    return r


def key(repo: TrustRepo, name: str) -> Ed25519PrivateKey:
    return load_private_key(repo.keys_dir / f"{name}.key")


def session(repo: TrustRepo, *, now: dt.datetime = NOW, root: int = 1) -> TrustSession:
    s = TrustSession(repo.root_bytes(root), now=now)
    s.update_roots({v: repo.root_bytes(v) for v in repo.root_versions()})
    return s


def current(repo: TrustRepo) -> dict[str, Any]:
    return {r: repo.role_bytes(r) for r in ("timestamp", "snapshot", "targets")}


def reason(fn: Any) -> str:
    with pytest.raises(ReleaseRejected) as info:
        fn()
    return info.value.reason


def resign(raw: bytes, *keys: Ed25519PrivateKey, **changes: Any) -> bytes:
    md = Metadata.from_bytes(raw)
    for name, value in changes.items():
        setattr(md.signed, name, value)
    md.signatures.clear()
    for k in keys:
        md.sign(CryptoSigner(k), append=True)
    return md.to_bytes(JSONSerializer(compact=True))


def release_bytes(repo: TrustRepo, version: str = "1.1.0") -> tuple[str, bytes]:
    import hashlib

    data = b"artifact " + version.encode()
    digest = hashlib.sha256(data).hexdigest()
    full = Payload(digest[:16], PayloadKind.FULL, digest, len(data), (hashlib.sha256(data).digest(),))
    rid = f"m-{version}-rpi4"
    meta = ReleaseMetadata(rid, FLEET, "m", version, "rpi4", 0.0, digest, len(data), 1024, (full,))
    return rid, sign_release(key(repo, "targets"), meta)


def test_fresh_metadata_verifies_and_names_the_fleet_roles(repo: TrustRepo) -> None:
    state = session(repo).refresh(**current(repo))
    assert state.root_version == 1 and state.expires == NOW + dt.timedelta(days=1)
    commands = role_keys(state.root_meta, COMMANDS_ROLE)
    pub = key(repo, "commands").public_key()
    assert [k.public_bytes_raw() for k in commands] == [pub.public_bytes_raw()]


def test_a_release_is_trusted_only_with_the_listed_bytes(repo: TrustRepo) -> None:
    rid, raw = release_bytes(repo)
    assert reason(lambda: check_release(session(repo).refresh(**current(repo)), rid, raw)) == "not-in-targets"
    repo.add_release(rid, raw, key(repo, "targets"), now=NOW)
    repo.publish_timestamp(key(repo, "timestamp"), now=NOW)
    state = session(repo).refresh(**current(repo))
    assert check_release(state, rid, raw).version == "1.1.0"
    _, other = release_bytes(repo, "1.2.0")
    assert reason(lambda: check_release(state, rid, other)) == "metadata-mismatch"


def test_root_threshold_and_rotation_chain(repo: TrustRepo) -> None:
    new = Ed25519PrivateKey.generate()
    with pytest.raises(ConfigError, match="signed by 1/2"):
        repo.rotate(COMMANDS_ROLE, [new.public_key()], [key(repo, "root-1")], now=NOW)
    assert repo.root_versions() == [1]
    v2 = repo.rotate(COMMANDS_ROLE, [new.public_key()], [key(repo, "root-1"), key(repo, "root-3")], now=NOW)
    assert v2 == 2
    # a hand-made root v3 with one good signature: refused, v2 stays
    forged = resign(repo.root_bytes(2), key(repo, "root-1"), version=3)
    s = TrustSession(repo.root_bytes(1), now=NOW)
    assert reason(lambda: s.update_roots({2: repo.root_bytes(2), 3: forged})) == "untrusted-metadata"
    assert s.root.version == 2
    # a gap in the chain stops it: v3 without v2 is not applied
    s = TrustSession(repo.root_bytes(1), now=NOW)
    assert s.update_roots({3: forged}) == [] and s.root.version == 1
    # new root keys must sign too
    new_roots = [Ed25519PrivateKey.generate() for _ in range(2)]
    with pytest.raises(ConfigError, match="would not be trusted"):
        repo.rotate("root", [k.public_key() for k in new_roots], [key(repo, "root-1"), key(repo, "root-2")],
                    threshold=2, now=NOW)
    v3 = repo.rotate("root", [k.public_key() for k in new_roots],
                     [key(repo, "root-1"), key(repo, "root-2"), *new_roots], threshold=2, now=NOW)
    assert session(repo).root.version == v3 == 3


def test_expiry_blocks_updates(repo: TrustRepo) -> None:
    later = NOW + dt.timedelta(days=1, seconds=1)
    assert reason(lambda: session(repo, now=later).refresh(**current(repo))) == "expired-metadata"
    repo.publish_timestamp(key(repo, "timestamp"), now=later)
    assert session(repo, now=later).refresh(**current(repo)).root_version == 1
    much_later = NOW + dt.timedelta(days=366)  # root and targets expired too
    assert reason(lambda: session(repo, now=much_later).refresh(**current(repo))) == "expired-metadata"


def test_rollback_and_mix_and_match_of_metadata(repo: TrustRepo) -> None:
    old = current(repo)
    rid, raw = release_bytes(repo)
    repo.add_release(rid, raw, key(repo, "targets"), now=NOW)
    repo.publish_timestamp(key(repo, "timestamp"), now=NOW)
    new = current(repo)
    trusted = session(repo).refresh(**new)
    local = {"timestamp": trusted.timestamp, "snapshot": trusted.snapshot, "targets": trusted.targets}
    # an older timestamp over a newer trusted one
    assert reason(lambda: session(repo).refresh(**{**new, "timestamp": old["timestamp"]}, local=local)) == (
        "metadata-rollback"
    )
    # the current timestamp with the previous snapshot or targets: not what it names
    assert reason(lambda: session(repo).refresh(**{**new, "snapshot": old["snapshot"]})) == "metadata-mismatch"
    assert reason(lambda: session(repo).refresh(**{**new, "targets": old["targets"]})) == "metadata-mismatch"
    # nothing received at all
    assert reason(lambda: session(repo).refresh(timestamp=None, snapshot=None, targets=None)) == "missing-metadata"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(role=st.sampled_from(["timestamp", "snapshot", "targets", "root"]), data=st.binary(max_size=600),
       cut=st.integers(min_value=0, max_value=4000))
def test_hostile_bytes_are_refused_with_a_reason(repo: TrustRepo, role: str, data: bytes, cut: int) -> None:
    genuine = repo.root_bytes(1) if role == "root" else repo.role_bytes(role) or b""
    for raw in (data, genuine[:cut] + data, genuine.replace(b'"version":1', b'"version":' + data[:8])):
        try:
            if role == "root":
                TrustSession(repo.root_bytes(1), now=NOW).update_roots({2: raw})
            else:
                session(repo).refresh(**{**current(repo), role: raw})
        except ReleaseRejected:
            pass


def test_device_store_keeps_floors_across_restarts(repo: TrustRepo, tmp_path: Path) -> None:
    topics = trust_topics(FLEET)
    clock = lambda: NOW.timestamp()  # noqa: E731
    data = tmp_path / "device"
    first = current(repo)
    repo.publish_timestamp(key(repo, "timestamp"), now=NOW + dt.timedelta(seconds=60))
    client = TrustClient(data, FLEET, repo.root_path(1), clock=clock)
    for role in ("targets", "snapshot", "timestamp"):
        client.handle(getattr(topics, role), repo.role_bytes(role) or b"")
    client.refresh()
    # restarted: the stored timestamp is the floor, the older one a broker replays is refused
    restarted = TrustClient(data, FLEET, repo.root_path(1), clock=clock)
    for role in ("targets", "snapshot", "timestamp"):
        restarted.handle(getattr(topics, role), first[role])
    assert reason(restarted.refresh) == "metadata-rollback"
    # roots are followed as they arrive, stored, and the keys in force change
    new = Ed25519PrivateKey.generate()
    repo.rotate(COMMANDS_ROLE, [new.public_key()], [key(repo, "root-2"), key(repo, "root-3")], now=NOW)
    seen: list[int] = []
    restarted.on_root = seen.append
    restarted.handle(topics.root(2), repo.root_bytes(2))
    assert seen == [2] and restarted.command_keys()[0].public_bytes_raw() == new.public_key().public_bytes_raw()
    assert TrustClient(data, FLEET, repo.root_path(1), clock=clock).root_version == 2
    # a damaged stored root: the device starts over from its provisioning root (and will follow the chain again)
    (data / "trust" / "root.json").write_bytes(b"{damaged")
    assert TrustClient(data, FLEET, repo.root_path(1), clock=clock).root_version == 1


def test_forged_roots_neither_block_nor_spam_the_chain(repo: TrustRepo, tmp_path: Path) -> None:
    topics = trust_topics(FLEET)
    rejected: list[str] = []
    client = TrustClient(tmp_path / "device", FLEET, repo.root_path(1), clock=lambda: NOW.timestamp(),
                         on_reject=lambda what, reason, detail: rejected.append(reason))
    forged = resign(repo.root_bytes(1), Ed25519PrivateKey.generate(), version=2)
    for version in range(2, 200):  # a broker floods root topics with versions no one signed
        client.handle(topics.root(version), forged)
    assert client.root_version == 1 and set(rejected) == {"untrusted-metadata"} and len(rejected) == 1
    new = Ed25519PrivateKey.generate()
    repo.rotate(COMMANDS_ROLE, [new.public_key()], [key(repo, "root-1"), key(repo, "root-2")], now=NOW)
    client.handle(topics.root(2), repo.root_bytes(2))  # the genuine v2 still gets through
    assert client.root_version == 2


def test_a_bad_provisioning_root_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "root.json"
    bad.write_text('{"signed": {}, "signatures": []}')
    with pytest.raises(ConfigError, match="not valid root metadata"):
        TrustClient(tmp_path / "d", FLEET, bad)
    with pytest.raises(ConfigError, match="cannot read"):
        TrustClient(tmp_path / "d2", FLEET, tmp_path / "missing.json")
