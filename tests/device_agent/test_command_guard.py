"""device_agent.command_guard: who, when and how often a signed fleet command may run (no sockets)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.command_guard import CommandGuard, MemoryNonceStore, NonceStore, SqliteNonceStore
from edgeops.errors import CommandRejected, StorageError
from edgeops.protocol import CommandName, RejectReason, sign_command

KEY = Ed25519PrivateKey.generate()
Store = MemoryNonceStore | SqliteNonceStore
NOW = 1_700_000_000.0


def _cmd(target: str = "device/pi-1", *, fleet: str = "acme", now: float = NOW, ttl_s: float = 300, **kw: Any) -> bytes:
    return sign_command(
        KEY, name=kw.pop("name", "status"), args={}, fleet=fleet, target=target, now=now, ttl_s=ttl_s, **kw
    )


def _guard(nonces: NonceStore | None = None, **kw: Any) -> CommandGuard:
    opts: dict[str, Any] = {"fleet": "acme", "device_id": "pi-1", "groups": ["canary", "eu"]} | kw
    return CommandGuard(keys=[KEY.public_key()], nonces=MemoryNonceStore() if nonces is None else nonces, **opts)


def _reason(guard: CommandGuard, raw: bytes, now: float = NOW) -> str:
    with pytest.raises(CommandRejected) as info:
        guard.check(raw, now=now)
    return info.value.reason


@pytest.fixture(params=["memory", "sqlite"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "memory":
        return MemoryNonceStore
    return lambda: SqliteNonceStore(tmp_path / "nonces.sqlite")


def test_accepts_a_command_for_this_device() -> None:
    cmd = _guard().check(_cmd(name="rollback"), now=NOW + 1)
    assert (cmd.name, cmd.target) == (CommandName.ROLLBACK, "device/pi-1")


def test_accepts_a_command_for_one_of_its_groups() -> None:
    assert _guard().check(_cmd("group/eu"), now=NOW).target == "group/eu"


def test_wrong_fleet() -> None:
    assert _reason(_guard(), _cmd(fleet="globex")) == RejectReason.WRONG_FLEET


@pytest.mark.parametrize("target", ["device/pi-2", "group/us", "device/canary", "group/pi-1"])
def test_other_device_or_group_is_wrong_target(target: str) -> None:
    assert _reason(_guard(), _cmd(target)) == RejectReason.WRONG_TARGET


def test_set_groups_changes_what_it_answers_to() -> None:
    guard = _guard()
    guard.set_groups(["us"])
    assert _reason(guard, _cmd("group/eu")) == RejectReason.WRONG_TARGET
    assert guard.check(_cmd("group/us"), now=NOW).target == "group/us"
    with pytest.raises(ValueError, match="group"):
        guard.set_groups(["a/#"])


def test_untrusted_signer_is_refused_before_anything_else() -> None:
    raw = sign_command(Ed25519PrivateKey.generate(), name="status", args={}, fleet="x", target="device/y", now=NOW)
    assert _reason(_guard(), raw) == RejectReason.UNTRUSTED_KEY


def test_expired() -> None:
    guard = _guard()
    assert _reason(guard, _cmd(ttl_s=300), now=NOW + 300) == RejectReason.EXPIRED
    assert guard.check(_cmd(ttl_s=300), now=NOW + 299.9).name is CommandName.STATUS


def test_not_yet_valid_beyond_the_clock_skew() -> None:
    guard = _guard(clock_skew_s=60)
    assert _reason(guard, _cmd(now=NOW + 61), now=NOW) == RejectReason.NOT_YET_VALID
    assert guard.check(_cmd(now=NOW + 59), now=NOW).issued_at == NOW + 59


def test_ttl_too_long() -> None:
    guard = _guard(max_ttl_s=3600)
    assert _reason(guard, _cmd(ttl_s=3601)) == RejectReason.TTL_TOO_LONG
    assert guard.check(_cmd(ttl_s=3600), now=NOW).expires_at == NOW + 3600


def test_replayed(store_factory: Callable[[], Store]) -> None:
    guard = _guard(store_factory())
    raw = _cmd()
    guard.check(raw, now=NOW)
    assert _reason(guard, raw, now=NOW + 1) == RejectReason.REPLAYED
    other_copy = _cmd("group/canary", nonce="0123456789abcdef")
    guard.check(other_copy, now=NOW)
    assert _reason(guard, _cmd(nonce="0123456789abcdef"), now=NOW) == RejectReason.REPLAYED


def test_a_rejected_command_does_not_use_up_its_nonce() -> None:
    guard = _guard()
    early = _cmd(now=NOW + 600, nonce="nonce-0000000001")
    assert _reason(guard, early, now=NOW) == RejectReason.NOT_YET_VALID
    assert guard.check(early, now=NOW + 600).nonce == "nonce-0000000001"


def test_replay_is_refused_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "nonces.sqlite"
    raw = _cmd(ttl_s=600)
    with SqliteNonceStore(path) as store:
        _guard(store).check(raw, now=NOW)
    with SqliteNonceStore(path) as reopened:
        assert _reason(_guard(reopened), raw, now=NOW + 10) == RejectReason.REPLAYED


def test_expired_nonces_are_pruned(store_factory: Callable[[], Store]) -> None:
    store = store_factory()
    guard = _guard(store, clock_skew_s=0)
    for i in range(50):
        guard.check(_cmd(now=NOW + i, ttl_s=10), now=NOW + i)
    assert len(store) <= 11  # only the commands of the last ttl are kept
    assert store.check_and_add("fresh-nonce-0001", NOW + 1000, NOW + 100)
    assert len(store) == 1


def test_store_reports_fresh_and_seen(store_factory: Callable[[], Store]) -> None:
    store = store_factory()
    assert store.check_and_add("a" * 16, NOW + 10, NOW) is True
    assert store.check_and_add("a" * 16, NOW + 10, NOW + 5) is False
    assert store.check_and_add("a" * 16, NOW + 30, NOW + 10) is True  # its entry expired at NOW + 10


def test_sqlite_store_is_safe_across_threads(tmp_path: Path) -> None:
    store = SqliteNonceStore(tmp_path / "nonces.sqlite")
    fresh: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        for i in range(40):
            ok = store.check_and_add(f"nonce-{i:012d}", NOW + 100, NOW)
            with lock:
                fresh.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert sum(fresh) == 40  # every nonce accepted exactly once


def test_sqlite_store_uses_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nonces.sqlite"
    SqliteNonceStore(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unwritable_or_corrupt_store_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nonce store"):
        SqliteNonceStore(tmp_path / "missing-dir" / "nonces.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="nonce store"):
        SqliteNonceStore(junk)


def test_closed_store_is_a_programming_error(tmp_path: Path) -> None:
    store = SqliteNonceStore(tmp_path / "nonces.sqlite")
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.check_and_add("b" * 16, NOW + 1, NOW)


@pytest.mark.parametrize(
    "kw",
    [{"fleet": "a+b"}, {"device_id": ""}, {"groups": ["x/y"]}, {"max_ttl_s": 0}, {"clock_skew_s": -1}],
)
def test_misconfigured_guard_is_a_value_error(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _guard(**kw)
    with pytest.raises(ValueError, match="key"):
        CommandGuard(fleet="acme", device_id="pi-1", groups=[], keys=[], nonces=MemoryNonceStore())
