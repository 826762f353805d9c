"""Soak: N real agents for a long run at 1 Hz through a real mosquitto into the fleet service's SQLite store, with
one rollout through all of them, counting every message and following memory over time.

Issue 7's soak: 1,000 simulated agents for 30 minutes, telemetry at 1 Hz, one rollout, through real mosquitto into
SQLite; counts of messages sent, stored, duplicated and lost; the memory of the service and of one agent over time
(no growth). The parts are the fleet benchmark's (benchmarks/fleet_bench.py: the service in its own process, the
agents as ``device_agent.sim.FleetSim`` children of 25, loss counted exactly by (device, seq)), run differently:

- one more agent runs **alone** in its own FleetSim process (device ``solo0-000``), so that one agent's memory is
  a process's memory (the others share 25 to a process);
- the telemetry runs for ``--minutes``; after ``--rollout-at`` of it (a fraction, default 0.5) the v1 → v2 delta is
  approved and deployed to every agent (one phase) and followed to the end while telemetry goes on;
- the service, the broker, the solo agent and all the agents are sampled from /proc every second; the JSON keeps
  one point a minute (medians) and the **growth** of each: the median of the last ``--window`` minutes minus the
  median of the first ``--window`` minutes after the warm-up (``--warmup`` minutes), and a least-squares slope
  over the whole run after the warm-up (MB per hour). The rollout loads a second model in every agent (v2 next to
  v1 as fallback), so the agents' memory steps up once there: growth is reported for before and after it apart;
- at the end the agents stop (each flushes its spool), the ingest drains, and: sent (each spool's last seq minus
  what is still spooled), stored ((device, seq) rows), duplicates (copies the ingest dropped by their key) and
  lost (numbers neither stored nor spooled).

The agents' data dirs (slots, spools, transfer state) go to ``--agents-dir``, a tmpfs (/dev/shm) by default: a
thousand devices have a thousand disks, but on this machine their ~2,000 fsyncs a second (each message is synced
into the spool and synced out of it) land on one ext4 volume and saturate it — measured: I/O pressure 94 %, 80 %
of the CPU in the kernel, agents still starting after 6 minutes — which is not what the soak measures (the crash
matrix covers the agents' durability). The service's store, the broker and everything else stay on disk.

Writes the ``soak`` key of benchmarks/results/reliability.json (other harnesses own the other keys), prints a
table. Exit status 1 when a message was lost, the rollout did not converge, or the run could not be measured.
Run: ``.venv/bin/python benchmarks/chaos/soak.py`` (1,000 agents, 30 min: ~45 min with start-up and drain);
``--agents 50 --minutes 2 --warmup 0.5 --window 0.5`` checks the harness in ~4 min.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO, REPO / "benchmarks", REPO / "benchmarks" / "chaos"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import fleet_bench as fb  # noqa: E402
from common import RESULTS, update_section  # noqa: E402

from edgeops.errors import EdgeopsError  # noqa: E402
from edgeops.fleet.store import FleetStore, open_store  # noqa: E402
from edgeops.release_builder import build_release  # noqa: E402
from edgeops.signing import load_private_key  # noqa: E402

GROUPS = ("service", "broker", "solo", "agents")


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


def _slope_mb_per_h(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, MB) in MB per hour."""
    if len(points) < 3:
        return None
    ts = [t for t, _ in points]
    ms = [m for _, m in points]
    mt, mm = statistics.fmean(ts), statistics.fmean(ms)
    den = sum((t - mt) ** 2 for t in ts)
    if den == 0:
        return None
    return round(sum((t - mt) * (m - mm) for t, m in zip(ts, ms)) / den * 3600, 2)


def memory_figures(samples: list[fb.Sample], t0: float, t1: float, args: argparse.Namespace,
                   t_rollout: tuple[float, float] | None) -> dict[str, Any]:
    """Per group: RSS a minute (medians), and growth before / after the rollout (see the module docstring)."""
    run = [s for s in samples if t0 <= s.t <= t1]
    out: dict[str, Any] = {"per_minute": [], "growth": {}}
    minutes = int((t1 - t0) // 60) + 1
    for m in range(minutes):
        inside = [s for s in run if t0 + 60 * m <= s.t < t0 + 60 * (m + 1)]
        if inside:
            out["per_minute"].append({"minute": m, **{g: _median([s.rss_mb.get(g, 0.0) for s in inside])
                                                      for g in GROUPS},
                                      "machine_available_mb": _median([s.mem_available_mb for s in inside])})
    spans = {"whole": (t0 + 60 * args.warmup, t1)}
    if t_rollout is not None:
        spans = {"before_rollout": (t0 + 60 * args.warmup, t_rollout[0]), "after_rollout": (t_rollout[1] + 60, t1)}
    for name, (a, b) in spans.items():
        part = [s for s in run if a <= s.t <= b]
        w = 60 * args.window
        if not part or b - a < 2 * w:
            out["growth"][name] = {"note": f"span of {b - a:.0f} s is shorter than two windows of {w:.0f} s"}
            continue
        g: dict[str, Any] = {"seconds": round(b - a, 1)}
        for group in GROUPS:
            first = [s.rss_mb.get(group, 0.0) for s in part if s.t <= a + w]
            last = [s.rss_mb.get(group, 0.0) for s in part if s.t >= b - w]
            f, la = _median(first), _median(last)
            g[group] = {"first_mb": f, "last_mb": la,
                        "growth_mb": round(la - f, 2) if f is not None and la is not None else None,
                        "slope_mb_per_h": _slope_mb_per_h([(s.t - a, s.rss_mb.get(group, 0.0)) for s in part])}
        out["growth"][name] = g
    return out


def soak(ctx: fb.Ctx, n: int, args: argparse.Namespace) -> dict[str, Any]:
    work = ctx.work / f"soak-{n}"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "fleet.db"
    agents = (args.agents_dir or work) / f"agents-{n}"
    broker = fb.start_broker(work / "mosquitto", fb.FLEET_BROKER_QUEUE)
    sampler = fb.Sampler()
    sampler.set_group("broker", [fb.broker_pid(broker)])
    sims: fb.Sims = []
    service = fb.ServiceProc(work, broker=broker.url, db=db, releases=ctx.work / "releases",
                             key=ctx.arts.command_key, workers=args.workers, rate=args.rate, burst=4 * args.rate)
    out: dict[str, Any] = {"agents": n + 1}
    store: FleetStore | None = None
    try:
        service.start()
        store = open_store(str(db), busy_timeout_s=120.0)
        sampler.set_group("service", [service.pid])
        sampler.start()
        t_start = time.time()
        solo = fb.start_sims(ctx, 1, broker.url, agents, work / "sim-logs", prefix_base="solo")
        sims = list(solo)
        sampler.set_group("solo", [p.pid for p, _, _ in solo])
        batch = args.per_process * args.start_batch
        for i, first in enumerate(range(0, n, batch)):  # a batch of processes at a time: a thousand agents loading
            more = fb.start_sims(ctx, min(batch, n - first), broker.url, agents, work / "sim-logs",  # models at once
                                 prefix_base=f"b{i}x")  # overload 2 cores into keep-alive timeouts
            sims += more
            sampler.set_group("agents", [p.pid for p, _, _ in sims])
            fb.wait_sims_ready(more, 120 + 1.5 * batch)
            fb.say(f"soak {n + 1}: {min(first + batch, n) + 1} agents started")
        fb.wait_sims_ready(sims, 120)
        online = fb.wait_online(store, n + 1, 60 + 0.1 * n)
        out["start"] = {"processes": len(sims), "online": online, "all_online_s": round(time.time() - t_start, 1)}
        fb.say(f"soak {n + 1}: {online} agents online after {out['start']['all_online_s']} s")
        if online < n + 1:
            raise fb.BenchError(f"only {online} of {n + 1} agents came online")
        time.sleep(fb.SETTLE_S)
        t0 = time.time()
        c0 = fb.ingest_totals(service.status())
        t_end = t0 + 60 * args.minutes
        t_rollout: tuple[float, float] | None = None
        if not args.no_rollout:
            fb._watch(sims, max(0.0, t0 + 60 * args.minutes * args.rollout_at - time.time()))
            fb.say(f"soak {n + 1}: rollout after {(time.time() - t0) / 60:.1f} min")
            r = out["rollout"] = fb.rollout(ctx, store, service, n + 1)
            t_rollout = (r["t_deploy"], time.time())
            r.pop("timeline", None)
            fb.say(f"soak {n + 1}: rollout {r['statuses']} in {r['converge_s']} s; {r['chunks_published']} "
                   f"publishes for {r['chunks']} chunks")
        while time.time() < t_end:
            fb._watch(sims, min(60.0, t_end - time.time()))
            last = sampler.samples[-1] if sampler.samples else None
            if last is not None:
                fb.say(f"soak {n + 1}: {(time.time() - t0) / 60:.1f} min; RSS service "
                       f"{last.rss_mb.get('service', 0):.0f} MB, solo agent {last.rss_mb.get('solo', 0):.1f} MB, "
                       f"agents {last.rss_mb.get('agents', 0):.0f} MB, broker {last.rss_mb.get('broker', 0):.1f} MB")
        t1 = time.time()
        c1 = fb.ingest_totals(service.status())
        out["window"] = {"minutes": round((t1 - t0) / 60, 2),
                         "received_per_s": round((c1.get("received", 0) - c0.get("received", 0)) / (t1 - t0), 1),
                         "stored_per_s": round((c1.get("stored", 0) - c0.get("stored", 0)) / (t1 - t0), 1),
                         "resources": sampler.window(t0, t1)}
        out["memory"] = memory_figures(sampler.samples, t0, t1, args, t_rollout)
        out["stop_s"] = fb.stop_sims(ctx, sims, n + 1)
        out["drain"] = fb.wait_drained(service)
        counters = out["ingest_counters"] = fb.ingest_totals(service.stop())
        loss = out["loss"] = fb.count_loss(db, agents)
        loss["duplicates_dropped_by_ingest"] = counters.get("duplicates", 0)
        loss["rate_limited"] = counters.get("rate_limited", 0)
        out["telemetry_delay"] = fb.telemetry_delay(db, t0, t1)
        fb.say(f"soak {n + 1}: sent {loss['sent']}, stored {loss['stored']}, duplicates "
               f"{loss['duplicates_dropped_by_ingest']}, lost {loss['lost']}")
    finally:
        sampler.stop()
        if store is not None:
            store.close()
        for proc, _, _ in sims:
            if proc.poll() is None:
                fb.stop_process(proc, 60)
        if service.proc is not None and service.proc.poll() is None:
            fb.stop_process(service.proc, 60)
        broker.stop()
        if not args.keep:
            shutil.rmtree(agents, ignore_errors=True)
    return out


def print_table(r: dict[str, Any]) -> None:
    loss, mem = r.get("loss", {}), r.get("memory", {})
    print(f"\nsoak: {r['agents']} agents, {r.get('window', {}).get('minutes')} min at 1 Hz "
          f"({r.get('window', {}).get('stored_per_s')} rows/s stored)")
    print(f"  messages: sent {loss.get('sent')}, stored {loss.get('stored')}, duplicates (dropped by the ingest) "
          f"{loss.get('duplicates_dropped_by_ingest')}, lost {loss.get('lost')}, still spooled "
          f"{loss.get('still_spooled')}, spool dropped {loss.get('spool_dropped')}")
    ro = r.get("rollout")
    if ro:
        print(f"  rollout: {ro['statuses']} in {ro['converge_s']} s, {ro['chunks_published']} publishes for "
              f"{ro['chunks']} chunks")
    print(f"  {'memory (RSS MB)':<22}{'span':<16}{'first':>9}{'last':>9}{'growth':>9}{'MB/h':>9}")
    for span, g in mem.get("growth", {}).items():
        for group in GROUPS:
            x = g.get(group)
            if isinstance(x, dict):
                print(f"  {group:<22}{span:<16}{x['first_mb']!s:>9}{x['last_mb']!s:>9}{x['growth_mb']!s:>9}"
                      f"{x['slope_mb_per_h']!s:>9}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--agents", type=int, default=999, help="agents in shared processes (default 999; +1 solo)")
    p.add_argument("--minutes", type=float, default=30.0, help="telemetry window (default 30)")
    p.add_argument("--rollout-at", type=float, default=0.5, help="fraction of the window before the rollout")
    p.add_argument("--no-rollout", action="store_true")
    p.add_argument("--warmup", type=float, default=3.0, help="minutes left out of the growth figures (default 3)")
    p.add_argument("--window", type=float, default=3.0, help="minutes compared at each end (default 3)")
    p.add_argument("--interval", type=float, default=1.0, help="telemetry interval (s, default 1)")
    p.add_argument("--per-process", type=int, default=fb.PER_PROCESS)
    p.add_argument("--start-batch", type=int, default=2, help="FleetSim processes started together (default 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate", type=float, default=5.0)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--rollout-timeout", type=float, default=600.0)
    p.add_argument("--latency-budget-factor", type=float, default=100.0)
    p.add_argument("--agents-dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                   help="where the agents' data dirs go (default /dev/shm: see the module docstring)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--work", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.phases = [1.0]
    work = args.work or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    t_run = time.monotonic()
    try:
        ctx = fb.Ctx(args, work.resolve(), fb.build_artifacts(fb.CACHE))
        key = load_private_key(ctx.arts.release_key)
        ctx.release = build_release(ctx.arts.v2, [ctx.arts.v1], fleet=fb.FLEET, key=key, store=ctx.work / "releases",
                                    chunk_size=args.chunk_size)
        result: dict[str, Any] = {"machine": fb.machine(), "config": {
            "agents": args.agents + 1, "minutes": args.minutes, "interval_s": args.interval,
            "rollout_at": None if args.no_rollout else args.rollout_at, "per_process": args.per_process,
            "ingest_workers": args.workers, "warmup_min": args.warmup, "window_min": args.window,
            "agents_dir": str(args.agents_dir or work)}}
        try:
            result.update(soak(ctx, args.agents, args))
        except (fb.BenchError, EdgeopsError) as exc:
            result["error"] = str(exc)
        result["notes"] = ctx.notes
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - t_run, 1)
    update_section("soak", result, args.out)
    if "error" in result:
        print(f"soak not measured: {result['error']}", file=sys.stderr)
        return 1
    print_table(result)
    print(f"\nwrote the soak section of {args.out} ({result['seconds']} s)")
    bad = result["loss"]["lost"] > 0 or (not args.no_rollout and not result.get("rollout", {}).get("converged"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
