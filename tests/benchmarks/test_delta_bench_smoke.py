"""The delta benchmark's harness on a small synthetic case (no TensorFlow, a few seconds): every peer that is
installed round-trips byte-identically, a missing one is named with its install command, peak RSS is the
child's own, and a codec that is broken or loses to a peer is reported as missing its goal."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import delta_bench
from benchmarks.delta_tools import PEERS, TIME, PythonTool, make_tools, run_child

_COPY_CREATE = "import json, shutil, sys\nshutil.copyfile(sys.argv[2], sys.argv[3])\nprint(json.dumps({'seconds': 0}))"
_COPY_APPLY = "import shutil, sys\nshutil.copyfile(sys.argv[2], sys.argv[3])"
_WRONG_APPLY = "import shutil, sys\nshutil.copyfile(sys.argv[1], sys.argv[3])"  # writes OLD, not NEW


def _fake_codec(apply_code: str) -> PythonTool:
    """Stands in for edgeops: its 'patch' is NEW itself, so it always loses to a real delta tool on size."""
    return PythonTool("edgeops", "shutil", "pytest", _COPY_CREATE, apply_code, "import shutil, sys\n", "-", ())


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> delta_bench.Case:
    folder = tmp_path_factory.mktemp("delta-case")
    rng = random.Random(7)
    old = bytearray(rng.randbytes(256 * 1024))
    new = bytearray(old)
    for i in rng.sample(range(len(new)), 40):  # a fine-tune that touched a few bytes
        new[i] ^= 0x5A
    (folder / "old.bin").write_bytes(old)
    (folder / "new.bin").write_bytes(new)
    return delta_bench.Case("synthetic", "head", "bin", folder / "old.bin", folder / "new.bin")


def _run(case: delta_bench.Case, codec: PythonTool) -> dict[str, Any]:
    tools, unavailable = delta_bench.select_tools(list(PEERS), skip_slow=False)
    cases, _ = delta_bench.run_benchmark([case], {"edgeops": codec, **tools}, unavailable, progress=lambda _: None)
    return cases[0]


def test_installed_peers_round_trip_and_missing_ones_say_how_to_install(case: delta_bench.Case) -> None:
    doc = _run(case, _fake_codec(_COPY_APPLY))
    results = {r["tool"]: r for r in doc["results"]}
    assert list(results) == ["edgeops", *PEERS]
    ok_peers = [results[p] for p in PEERS if results[p]["status"] == "ok"]
    for name in PEERS:
        r = results[name]
        if r["status"] == "ok":
            assert r["identical"] is True
            assert r["patch_bytes"] < 16 * 1024, f"{name}: a 40-byte change should not cost {r['patch_bytes']} B"
            assert r["commands"]["create"] and r["commands"]["apply"]
        else:
            assert r["status"] == "missing" and "install" in r["note"], r
    assert ok_peers, "no peer could run: the benchmark would have nothing to compare with"
    assert min(r["ratio_to_best_peer"] for r in ok_peers) == 1.0
    assert results["edgeops"]["ratio_to_best_peer"] > 10  # a whole-file 'patch' shows as such


def test_a_codec_that_loses_on_size_misses_the_size_goal_and_says_where(case: delta_bench.Case) -> None:
    doc = _run(case, _fake_codec(_COPY_APPLY))
    goals = delta_bench.goals([doc])
    assert goals["size_vs_best_peer"]["passed"] is False
    assert "synthetic/head/bin" in goals["size_vs_best_peer"]["why"]
    assert goals["apply_memory_within_old_new_16mib"]["passed"] is (True if TIME.is_file() else None)
    assert goals["create_5x_faster_than_bsdiff4"]["passed"] is None  # no large model in this run
    text = delta_bench.case_table(doc) + "\n" + delta_bench.goals_text(goals)
    assert "MISS  size_vs_best_peer" in text and "x best peer" in text


def test_a_codec_whose_output_differs_from_new_is_a_mismatch(case: delta_bench.Case) -> None:
    doc = _run(case, _fake_codec(_WRONG_APPLY))
    ours = next(r for r in doc["results"] if r["tool"] == "edgeops")
    assert ours["status"] == "mismatch" and ours["identical"] is False
    assert delta_bench.goals([doc])["size_vs_best_peer"]["passed"] is False


def test_peak_rss_is_the_childs_own_not_the_benchmarks(case: delta_bench.Case) -> None:
    ballast = b"x" * (300 << 20)  # 300 MiB written, so resident in this process
    run = run_child([sys.executable, "-c", "pass"])
    assert run.returncode == 0
    if TIME.is_file():
        assert run.peak_kib is not None and run.peak_kib < 100 * 1024, run.peak_kib
    else:
        assert run.peak_kib is None  # reported as not measured rather than as this process's 300 MiB
    del ballast


def test_tools_report_a_missing_binary_with_the_apt_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    tools = make_tools()
    for name in ("zstd", "xdelta3"):
        assert f"apt-get install {name}" in (tools[name].missing() or "")
