"""The operator's commands on a real SQLite fleet store (no broker needed: they record, the service acts):
`deploy --group`, `rollout list|status|pause|resume|abort`, `rollback`, `devices list|show|assign`,
`releases list|approve|reject` — what they print, what they record and what they refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeops.cli.main import main
from edgeops.fleet.model import DeviceRecord, ExecStatus, ReleaseRecord, RolloutStatus
from edgeops.fleet.store import open_store


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "fleet.db")
    store = open_store(path)
    for i in range(10):
        store.put_device(DeviceRecord(f"pi-{i:02d}", online=True, last_seen=1000.0, profile="rpi4", groups=("lab",),
                                      active_version="1.0.0"))
    store.put_device(DeviceRecord("gw-01", online=True, last_seen=1000.0, profile="x86-gateway", groups=("lab",)))
    store.put_release(ReleaseRecord("digits-2.0.0-rpi4", "digits", "2.0.0", "rpi4", 900.0, "ab" * 32, 1234,
                                    payloads=({"kind": "delta", "base_version": "1.0.0", "size": 99},),
                                    lineage={"source": {"sha256": "cd" * 32}}))
    store.close()
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_deploy_records_phases_and_lists_skipped_devices(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "lab", "--db", db)
    assert code == 1 and "pending approval" in err and "edgeops releases approve" in err
    assert run(capsys, "releases", "approve", "digits-2.0.0-rpi4", "--by", "alice", "--db", db)[0] == 0
    code, out, _ = run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "lab", "--canary", "10%",
                       "--phases", "50,100", "--max-failures", "20%", "--db", db)
    assert code == 0
    assert "10 device(s), phases 10%, 50%, 100%, max failures 20%" in out
    assert "skipped gw-01: profile x86-gateway" in out
    store = open_store(db)
    (rollout,) = store.list_rollouts()
    execs = {e.device_id: e for e in store.list_executions(rollout.rollout_id)}
    store.close()
    assert rollout.spec.phases == (0.1, 0.5, 1.0) and rollout.spec.max_failures == 0.2
    assert [execs[f"pi-{i:02d}"].phase for i in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert execs["gw-01"].status is ExecStatus.SKIPPED
    assert all(e.status is ExecStatus.QUEUED for d, e in execs.items() if d != "gw-01")


def test_pause_resume_abort_and_what_they_refuse(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "releases", "approve", "digits-2.0.0-rpi4", "--db", db)
    code, out, _ = run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "lab", "--json", "--db", db)
    rid = json.loads(out)["id"]
    assert run(capsys, "rollout", "resume", rid, "--db", db)[0] == 1  # not paused
    assert run(capsys, "rollout", "pause", rid, "--db", db)[1].strip() == f"rollout {rid}: paused"
    code, out, _ = run(capsys, "rollout", "status", rid, "--json", "--db", db)
    status = json.loads(out)
    assert status["status"] == "paused" and status["counts"]["queued"] == 10 and len(status["executions"]) == 11
    assert run(capsys, "rollout", "resume", rid, "--db", db)[1].strip() == f"rollout {rid}: running"
    assert run(capsys, "rollout", "abort", rid, "--db", db)[0] == 0
    code, _, err = run(capsys, "rollout", "pause", rid, "--db", db)
    assert code == 1 and "aborted" in err
    code, _, err = run(capsys, "rollout", "status", "r-nope", "--db", db)
    assert code == 1 and "unknown rollout" in err
    code, out, _ = run(capsys, "rollout", "list", "--db", db)
    assert rid in out and "aborted" in out


def test_a_new_rollout_supersedes_the_groups_older_one(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "releases", "approve", "digits-2.0.0-rpi4", "--db", db)
    first = json.loads(run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "lab", "--json",
                           "--db", db)[1])["id"]
    second = json.loads(run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "lab", "--json",
                            "--db", db)[1])
    assert second["superseded"] == [first]
    store = open_store(db)
    older = store.get_rollout(first)
    store.close()
    assert older is not None and older.status is RolloutStatus.ABORTED and second["id"] in older.reason


def test_refusals(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "deploy", "--release", "nope", "--group", "lab", "--db", db)
    assert code == 1 and "unknown release 'nope'" in err and "digits-2.0.0-rpi4" in err
    run(capsys, "releases", "reject", "digits-2.0.0-rpi4", "--by", "bob", "--db", db)
    code, _, err = run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "lab", "--db", db)
    assert code == 1 and "rejected by bob" in err
    run(capsys, "releases", "approve", "digits-2.0.0-rpi4", "--db", db)
    code, _, err = run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "empty", "--db", db)
    assert code == 1 and "no devices" in err
    code, _, err = run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "lab", "--phases", "50,20",
                       "--db", db)
    assert code == 2 and "rise" in err
    code, _, err = run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--group", "lab", "--broker",
                       "mqtt://x", "--db", db)
    assert code == 2 and "fleet service sends" in err
    code, _, err = run(capsys, "deploy", "--release", "digits-2.0.0-rpi4", "--device", "pi-01", "--db", db)
    assert code == 2 and "--fleet" in err and "--broker" in err
    code, _, err = run(capsys, "rollback", "--group", "lab", "--db", db)
    assert code == 1 and "no rollout" in err
    store = open_store(db)
    assert store.list_rollouts() == []  # nothing refused left a trace
    store.close()


def test_devices_and_releases_listing(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "devices", "assign", "gw-01", "--group", "gateways", "--db", db)[0] == 0
    code, out, _ = run(capsys, "devices", "list", "--group", "gateways", "--json", "--db", db)
    (gw,) = json.loads(out)
    assert gw["device_id"] == "gw-01" and gw["assigned_groups"] == ["gateways"] and gw["groups"] == ["lab"]
    code, out, _ = run(capsys, "devices", "list", "--db", db)
    assert code == 0 and len(out.splitlines()) == 11 and "gateways,lab" in out
    code, out, _ = run(capsys, "devices", "show", "pi-03", "--json", "--db", db)
    assert json.loads(out)["device"]["active_version"] == "1.0.0"
    code, _, err = run(capsys, "devices", "show", "nope", "--db", db)
    assert code == 1 and "unknown device" in err
    code, out, _ = run(capsys, "releases", "list", "--json", "--db", db)
    (rel,) = json.loads(out)
    assert rel["approval"] == "pending" and rel["lineage"]["source"]["sha256"] == "cd" * 32
    code, out, _ = run(capsys, "releases", "list", "--db", db)
    assert "digits-2.0.0-rpi4" in out and "Δ1.0.0 99 B" in out and "source cdcdcdcdcdcd" in out
