"""BENCHMARKS.md from the figures of one run."""

from __future__ import annotations

import math
import time
from importlib import metadata
from typing import Any

from bench import proc
from dispatcher.emulator.config import MAX_LIST_LIMIT

__all__ = ["dig", "write_report"]

NA = "n/a"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return NA
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _s(seconds: float | None) -> str:
    return NA if seconds is None else f"{seconds:.1f} s"


def _ratio(ours: float | None, peer: float | None, *, higher_is_better: bool) -> str:
    """How many times better ours is (>1: ours wins), as 'N.Nx better/worse'."""
    if ours is None or peer is None or ours <= 0 or peer <= 0:
        return NA
    better = ours / peer if higher_is_better else peer / ours
    return f"{better:.1f}x better" if better >= 1 else f"{1 / better:.1f}x worse"


def dig(results: dict[str, Any], *path: str) -> Any:
    """The value at `path` in the saved figures, or None where a part or figure is missing."""
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _mb(kb: float | None) -> str:
    return NA if kb is None else f"{kb / 1024:.1f} MB"


# What a session's watchdog may cost it: a thousand sessions' watchdogs within 2 GB.
WATCHDOG_TARGET_KB = 2048


def _target(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "**missed**")


def _unended(part: dict[str, Any]) -> str:
    """A drain's sessions that started and never ended, as a note to its figure."""
    n = dig(part, "drain", "unended")
    return f" ({n} started, never ended)" if n else ""


def _recovered(part: dict[str, Any], value: float | None) -> str:
    """A recovery figure, or `never` where the killed session did not run again."""
    never = dig(part, "recovery", "never")
    waited = dig(part, "recovery", "waited") or 0
    return f"never (waited {waited:.0f} s)" if never else _s(value)


def write_report(results: dict[str, Any], *, command: str) -> str:
    ours = results.get("ours", {})
    peer = results.get("peer", {})
    cap = results.get("capacity", {})
    sizes = results["sizes"]
    slots = sizes["slots"]
    rows: list[tuple[str, str, str, str, str]] = []

    def latency_rows(key: str, what: str, p50_target: float | None, p99_target: float | None,
                     peer_note: str = "") -> None:
        for q, target in (("p50", p50_target), ("p99", p99_target)):
            o, p = dig(ours, key, q), dig(peer, key, q)
            ok = None if target is None or o is None else o < target
            goal = "" if target is None else f"< {_ms(target)}: {_target(ok)}"
            rows.append((f"{what} {q}", _ms(o), _ms(p) + peer_note,
                         _ratio(o, p, higher_is_better=False), goal))

    latency_rows("dispatch_idle", "dispatch latency, idle fleet", 0.100, 1.0)
    rate = sizes["steady_rate"]
    latency_rows("dispatch_steady", f"dispatch latency, {rate:g} sessions/s arriving",
                 0.100, 1.0)
    o, p = dig(ours, "drain", "per_second"), dig(peer, "drain", "per_second")

    rows.append((f"drain throughput, backlog of {sizes['backlog']}, {slots} slots",
                 "" if o is None else f"{o:.1f} sessions/s{_unended(ours)}",
                 "" if p is None else f"{p:.1f} sessions/s{_unended(peer)}",
                 _ratio(o, p, higher_is_better=True), ""))
    latency_rows("stop", "stop latency (stop requested -> sandbox told)", None, 2.0,
                 peer_note=" (†)")
    o, p = dig(ours, "recovery", "p50"), dig(peer, "recovery", "p50")

    rows.append(("recovery (worker SIGKILLed -> session running again), p50",
                 _recovered(ours, o), _recovered(peer, p), _ratio(o, p, higher_is_better=False),
                 "" if o is None else f"< 10 s: {_target(o < 10)}"))
    for n in sizes["poll_fleets"]:
        o, p = dig(ours, f"poll_{n}", "polls_per_min"), dig(peer, f"poll_{n}", "polls_per_min")
        rows.append((f"poll load, idle fleet of {n} slot{'s' if n > 1 else ''} (polls/min)",
                     NA if o is None else f"{o:.0f}", NA if p is None else f"{p:.0f}",
                     _ratio(o, p, higher_is_better=False),
                     "independent of fleet size" if n == sizes["poll_fleets"][-1] else ""))
    for n in sizes["poll_fleets"]:
        o = dig(ours, f"poll_{n}", "requests_per_min")
        p = dig(peer, f"poll_{n}", "requests_per_min")
        rows.append((f"all Work API requests, idle fleet of {n} (per min)",
                     NA if o is None else f"{o:.0f}", NA if p is None else f"{p:.0f}",
                     _ratio(o, p, higher_is_better=False), ""))
    for series in cap.get("series", []):
        largest, ttl = series.get("largest_without_lapse"), series["ttl"]
        kept = next((st for st in series["steps"] if st["n"] == largest), None)
        rows.append((f"heartbeat capacity: leases one control worker keeps, TTL {ttl} s "
                     f"(a beat every {interval(ttl):g} s)",
                     NA if not largest or kept is None else
                     f"{largest:,} kept ({kept['beats_per_s']:.0f} beats/s)",
                     "n/a: under `--on-work` the poller never heartbeats; each sandbox beats "
                     "its own", "", "" if largest is None else
                     f"20,000: {_target(largest >= 20000)}"))
        stops = series.get("stops")
        if stops:
            met = stops["p99"] < 2 and not stops["unseen_after_60s"]
            pages = sizes.get("list_limit") or MAX_LIST_LIMIT
            rows.append((f"stop latency with {stops['held']:,} leases held (stop requested -> "
                         f"lease's stop flag; `list` pages of at most {pages:,}), p99",
                         _ms(stops["p99"]), "", "",
                         f"< 2000 ms: {_target(met)}"))
    for pool in ("threads", "prefork"):
        m = dig(ours, f"memory_{pool}")
        pm = dig(peer, "memory")
        if m is None:
            continue
        rows.append((f"memory per concurrent session, {pool} pool (worker, marginal)",
                     _mb(m["per_session_kb"]), _mb(pm and pm["per_session_kb"]), "",
                     "< 10 MB: " + _target(m["per_session_kb"] < 10240)
                     if pool == "threads" else ""))
        rows.append((f"  + our guardian's share per session, {pool} (RSS / PSS)",
                     f"{_mb(m['launcher_per_session_kb'])} / "
                     f"{_mb(m['launcher_pss_per_session_kb'])}", "none", "",
                     f"< {_mb(WATCHDOG_TARGET_KB)} RSS: "
                     + _target(m["launcher_per_session_kb"] < WATCHDOG_TARGET_KB)))
        rows.append((f"memory per slot, {pool} (worker RSS / PSS at {m['k']} sessions / slots)",
                     f"{_mb(m['per_slot_kb'])} / {_mb(m['per_slot_pss_kb'])}",
                     NA if pm is None else
                     f"{_mb(pm['per_slot_kb'])} / {_mb(pm['per_slot_pss_kb'])}",
                     _ratio(m["per_slot_kb"] + m["launcher_per_session_kb"],
                            pm and pm["per_slot_kb"], higher_is_better=False), ""))

    rows += _scale_rows(results)
    table = ["| figure | dispatcher | peer | dispatcher vs peer | our target |",
             "|---|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    machine = proc.machine()
    cap_rows = ["| TTL | leases | window | beats/s | max gap between beats | refused (4xx) "
                "| failed (5xx, dropped) | overdue at end | `list` calls/s | control worker CPU "
                "(per beat) | emulator CPU (per beat) | lapse | behind |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for series in cap.get("series", []):
        for st in series["steps"]:
            cap_rows.append(
                f"| {st['ttl']} s | {st['n']:,} | {st['window']:.0f} s | {st['beats_per_s']:.0f} "
                f"| {st['max_gap_s']:.1f} s | {st['refused']} | {st.get('failed', 0)} "
                f"| {st['overdue_now']} (oldest {st['max_overdue_s']:.1f} s) "
                f"| {st['list_per_s']:.1f} | {_per_beat(st, 'control_cpu_pct')} "
                f"| {_per_beat(st, 'emulator_cpu_pct')} "
                f"| {'**yes**' if st['lapsed'] else 'no'} "
                f"| {'**yes**' if st.get('behind') else 'no'} |")
    context = _context(results)
    errors = [f"* **{part} did not finish**: `{err}`" for part, err in
              results.get("errors", {}).items()]
    return "\n".join([
        "# Benchmarks: the dispatcher against the official worker",
        "",
        f"Generated by `{command}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(results.get('finished_at')))} "
        f"in {results['seconds'] / 60:.1f} minutes"
        + (" (**quick smoke run: tiny sizes, figures mean little**)" if results["quick"] else "")
        + ".",
        "",
        "**Figures depend on load.** Everything (Redis, the emulator, both fleets, their "
        "sandboxes and the benchmark itself) shares this machine's cores with other users; "
        f"load average {results['load_before'][0]:.2f} before the run, "
        f"{results['load_after'][0]:.2f} after. Re-run to compare, and compare ratios rather "
        "than absolute figures.",
        "",
        "## Machine and versions",
        "",
        f"* {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} memory, "
        f"Linux {machine['kernel']}, Python {machine['python']}",
        f"* dispatcher {_version('dispatcher')}, celery {_version('celery')}, "
        f"anthropic {_version('anthropic')} (the peer, unpatched), redis-py {_version('redis')}",
        "* reproduce: `.venv/bin/python -m bench` (this file), `.venv/bin/python -m bench "
        "--quick` (smoke run, about 4 minutes), `--json FILE` for the raw figures",
        "",
        "## Results",
        "",
        *errors,
        *([""] if errors else []),
        f"Both systems run **{slots} concurrent sessions** against **one emulator** in the same "
        "run, and both start the same fake session program "
        "(`dispatcher/emulator/fake_session.py`, work JSON on stdin, `ANTHROPIC_*` variables), "
        "whose own records give every sandbox-side time.",
        "",
        *table,
        "",
        "(†) The peer's sandbox is never signalled on a server stop: under `--on-work` the CLI "
        "does not heartbeat, so the spawned program (here the fake session in runner mode, as "
        "`ant beta:worker run` would be) learns of the stop from its own next heartbeat, every "
        f"ttl/2 = {results['emulator_default_ttl'] / 2:.0f} s on this emulator. The figure is "
        "stop requested -> that heartbeat's `stopping` answer; ours is stop requested -> "
        "SIGTERM received.",
        "",
        "Ratios read \"the dispatcher is N times better or worse than the peer\" on that figure.",
        "",
        *context,
        "",
        *_breakdown(results),
        *_burst(results),
        "## Heartbeat capacity, step by step",
        "",
        "One control-only worker (`-Q dispatcher.control -B`, threads pool) and no session "
        "worker, per TTL. The benchmark claims N items itself (ack, then a `NO_HEARTBEAT` beat "
        "asking for the TTL; `DISPATCHER_DESIRED_TTL_SECONDS` asks the same), records them in "
        "the dispatcher's registry as running sessions "
        "(`dispatcher.lease.registry.LeaseRegistry`), "
        "pulses them once a second as their supervisors would, and schedules their heartbeats "
        "due. Steps grow the same set of leases; each TTL has its own worker, environment and "
        "leases. A lapse is a lease whose gap between two successful beats (or since its last "
        "beat, at the end of the window) exceeds its TTL, or any refused beat, all as the "
        "emulator counts them when it answers (`GET /_emulator/environments/{env}/heartbeats`; "
        "the environment's heartbeats are left out of its request log); *behind*, a gap "
        "longer than the beat interval by more than a "
        "quarter of it or 2 s (a tick and a request), which means beats queue and gaps grow "
        "until leases lapse. A step is *kept* with neither; the series stops at the first that is "
        "not. CPU is user+system time from /proc over the window, of the "
        "process tree (100% = one core); per beat, it is that CPU over the beats in the window, "
        "all the process's work included (for the worker: the stop bridge, recovery, the "
        "poller and beat too)."
        + (f" Every heartbeat answer was delayed {cap['latency_ms']} ms (the emulator's "
           "latency fault)." if cap.get("latency_ms") else ""),
        "",
        *cap_rows,
        "",
        *([f"_{results['capacity_note']}_", ""] if results.get("capacity_note") else []),
        *_scale_sections(results),
        *_method(results),
    ]) + "\n"


def _scale_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    fair = results.get("fairness")
    if fair and "p99_ratio" in fair:
        rows.append((f"fairness: nine trickling environments' dispatch p99 while a tenth bursts "
                     f"{fair['burst']}, against alone", f"{fair['p99_ratio']:.2f}x "
                     f"(p50 {fair['p50_ratio']:.2f}x)", "", "",
                     f"within 2x: {_target(fair['p99_ratio'] <= 2 and fair['p50_ratio'] <= 2)}"))
        if fair.get("jain_mean") is not None:
            rows.append(("fairness: Jain's index of slot shares, ten environments backlogged "
                         "(mean / lowest sample)", f"{fair['jain_mean']:.3f} / "
                         f"{fair['jain_min']:.3f}", "", "",
                         f">= 0.9: {_target(fair['jain_mean'] >= 0.9)}"))
    th = results.get("thousand")
    if th and "n" in th:
        rows.append((f"{th['n']:,} sessions at once: started exactly once",
                     f"{th['started_once']:,} of {th['n']:,}", "", "",
                     f"all: {_target(th['started_once'] == th['n'])}"))
        gap = th.get("max_gap_between_beats_s")
        rows.append((f"{th['n']:,} sessions at once: largest gap between two beats of one "
                     f"lease (interval {th['heartbeat_interval_s']:g} s, TTL {th['ttl']} s)",
                     _s(gap), "", "", ""))
        rows.append((f"{th['n']:,} sessions at once: memory per session, worker + guardian "
                     "(RSS)", _mb(th["per_session_with_watchdog_kb"]), "", "", ""))
        rows.append((f"{th['n']:,} sessions at once: Redis memory per lease",
                     f"{th['redis_bytes_per_lease'] / 1024:.1f} KB", "", "", ""))
    return rows


# How the stop bridge's sweep spends a stop's time at scale: the rule and the costs per page
# and per item it is made of, which hold whatever a run's sizes (a run measures the latency).
STOP_SWEEP_TEXT = (
    "Where a stop's time goes: the stop bridge sweeps `list` (dispatcher/control/bridge.py, "
    "`scan_server_stops`) each second, its held leases' worth of pages back to back "
    "(`pages_per_tick`: ceil(held / page size)), for at most 0.8 s of the tick "
    "(`TICK_BUDGET_SHARE`), a longer sweep going on from its cursor next tick; past 1,000 held "
    "it asks pages of 1,000 (`LARGE_LIST_PAGE_SIZE`), and a server that refuses names its "
    "maximum, asked for an hour. A stop is seen when the sweep reaches its item: within one "
    "sweep plus a tick. So the sweep's time is the figure: its pages follow a cursor, each "
    "asked for as soon as the page before names it and read while that one is applied "
    "(`_scan`), so a pass takes about the longer of the server's time and the bridge's, not "
    "their sum. A page costs the server its time, the bridge its parse (`list_states`: each "
    "item's id, state and stop request, checked by hand, not a whole `Work` model: 25-40 µs "
    "of CPU an item) and a Redis call (its held items noted as seen: one ZMSCORE and one "
    "SADD, O(page)). The emulator answers a page in O(log n + page) (its sorted set read "
    "from the cursor's position, no sort, the records in one Lua reply, each projected to its "
    "public fields): about 2 ms of CPU a request "
    "plus 13 µs an item. A supervisor reads the raised flag within 0.2 s.")


def _scale_sections(results: dict[str, Any]) -> list[str]:
    """What the scale parts measured, and how (bench/scale.py, bench/scenarios.py)."""
    out: list[str] = []
    cap = results.get("capacity", {})
    for series in cap.get("series", []):
        st = series.get("stops")
        if st:
            out += ["## Stops with many leases held", "",
                    f"After the last capacity step (TTL {series['ttl']} s), {st['asked']} of the "
                    f"{st['held']:,} leases held were stopped on the server, one each 0.3 s, "
                    "picked evenly from the oldest to the newest: stop requested -> the lease's "
                    "stop flag raised (by the stop bridge's sweep of `list`, or a heartbeat "
                    "reply, whichever first; a running session's supervisor acts on the flag "
                    f"within 0.2 s). p50 {_ms(st['p50'])}, p99 {_ms(st['p99'])}; "
                    f"{st['unseen_after_60s']} not seen within 60 s.", "", STOP_SWEEP_TEXT, ""]
    fair = results.get("fairness")
    if fair and "p99_ratio" in fair:
        a, b = fair["trickle_alone"], fair["trickle_with_burst"]
        out += ["## Fairness across environments", "",
                f"One fleet ({fair['slots']} slots on two threads-pool session workers) serves "
                f"ten environments from one `DISPATCHER_ENVIRONMENTS_FILE`. Nine create "
                f"{fair['rate_per_env']:g} sessions/s each (of {fair['duration']:g} s) for "
                f"{fair['seconds']:g} s: alone, dispatch p50 {_ms(a['p50'])}, p99 "
                f"{_ms(a['p99'])}; the same while the tenth creates {fair['burst']} at once, "
                f"p50 {_ms(b['p50'])}, p99 {_ms(b['p99'])} ({fair['p50_ratio']:.2f}x and "
                f"{fair['p99_ratio']:.2f}x). The burst itself drained in "
                f"{_s(fair.get('burst_drained_s'))}"
                + (f", holding {fair['burst_mean_slots']:.1f} slots on average while the "
                   f"others trickled; {fair['arrived_to_full_fleet']} of their "
                   f"{fair['arrivals']} sessions arrived to a fleet with every slot held "
                   "(sampled every 50 ms)" if fair.get("burst_mean_slots") is not None else "")
                + (f"; `DISPATCHER_IDLE_HEADROOM_SECONDS` {fair['idle_headroom_seconds']:g}"
                   if fair.get("idle_headroom_seconds") is not None else "") + ".",
                "",
                f"Then each of the ten got {fair['backlog_per_env']} sessions at once, and the "
                f"slots each held were sampled every 0.5 s while all ten still had queued work "
                f"({fair['samples']} samples): Jain's index (sum x)^2 / (n sum x^2) of the "
                f"held slots, mean {_f3(fair.get('jain_mean'))}, lowest "
                f"{_f3(fair.get('jain_min'))}; of the mean shares "
                f"{_f3(fair.get('jain_of_mean_shares'))} (mean slots held, sorted: "
                f"{fair.get('mean_slots_held')}).", ""]
        if fair.get("breakdown"):
            from bench.breakdown import render
            out += ["Where the trickling sessions' start went, alone and beside the burst "
                    "(milliseconds since the step before, p50 / p99, and since creation): an "
                    "item that waited on the server for its poller to have room shows in "
                    "`poll_answered`, one that waited for a free pool thread in `received`.",
                    "", render(fair["breakdown"]), ""]
    th = results.get("thousand")
    if th and "n" in th:
        out += [f"## {th['n']:,} sessions at once", "",
                f"{th['environments']} environments, {th['workers']} threads-pool session "
                f"workers of {th['threads_per_worker']} threads; each sandbox a shell that "
                "notes its start and sleeps. All running after "
                f"{th['seconds_to_all_running']:.0f} s; {th['started_once']:,} started exactly "
                f"once, {th['started_twice_or_more']} more than once, {th['never_started']} "
                f"never. Heartbeats (TTL {th['ttl']} s, every {th['heartbeat_interval_s']:g} s) "
                f"over {th['window_s']:.0f} s with all running: {th['leases_beaten']:,} leases "
                f"beaten, the largest gap between two beats of one lease "
                f"{_s(th.get('max_gap_between_beats_s'))}. Memory: the session workers grew "
                f"{_mb(th['worker_rss_per_session_kb'])} RSS per session "
                f"({_mb(th['worker_pss_per_session_kb'])} PSS); their {th['guardians']} "
                f"guardians hold {_mb(th['guardian_rss_kb'])} in all, so "
                f"{_mb(th['per_session_with_watchdog_kb'])} per session with its watchdog "
                f"(the sleeping sandbox itself: {_mb(th['sandbox_rss_per_session_kb'])}). "
                f"Redis: {th['redis_bytes_per_lease'] / 1024:.1f} KB per lease (`MEMORY USAGE` "
                "of the fleet's keys, at full against idle, over the leases held)."
                + (f" CPU over the window, all running (1.0 = one core): the session workers "
                   f"{th['session_workers_cpu']:.2f} ({th['cpu_ms_per_session_second']:.2f} ms "
                   "a second per session: each worker process pulses all its leases in one round "
                   "trip every 0.2 s, dispatcher/session/supervision.py), the "
                   f"control worker {th['control_cpu']:.2f}, the emulator "
                   f"{th['emulator_cpu']:.2f}." if "session_workers_cpu" in th else "")
                + f" Load average at the end: {th['load'][0]:.1f}.", ""]
    return out


def _f3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def interval(ttl: int) -> float:
    """The dispatcher's beat interval for a TTL (dispatcher/control/heartbeat.py)."""
    from dispatcher.lease.machine import heartbeat_interval

    return heartbeat_interval(ttl)


def _per_beat(step: dict[str, Any], key: str) -> str:
    """'N% (M ms)': CPU share of a core, and CPU ms per beat."""
    pct, beats = step[key], step["beats_per_s"]
    return f"{pct:.0f}%" + (f" ({10 * pct / beats:.2f} ms)" if beats else "")


def _breakdown(results: dict[str, Any]) -> list[str]:
    from bench.breakdown import render

    out = []
    for part, title in (("ours", "dispatcher"), ("peer", "peer (as far as it shows from outside)")):
        figures = dig(results, part, "breakdown")
        if figures:
            out += [f"**{title}**", "", render(figures), ""]
    if not out:
        return []
    return [
        "## Where a session's start goes",
        "",
        "Each step of the dispatch measurements above (`python -m bench.breakdown` runs the "
        "same analysis on its own), from the `start path` lines both workers log "
        "(dispatcher/startpath.py), the emulator's request log and the sandbox's first record; "
        "milliseconds since the step before (p50 / p99) and since the session's creation "
        "(p50). Percentiles of each column are taken apart, so they do not add up exactly.",
        "",
        *out,
    ]


def _burst_cpu(rounds: list[dict[str, Any]], sessions: int) -> str | None:
    """Where a burst's CPU went, per session: the whole machine's (and how busy its cores
    were), then the fleet's workers, the emulator, the benchmark and the rest."""
    spent = [r["cpu"] for r in rounds if r.get("cpu")]
    if not spent:
        return None

    def mean_ms(pick: Any) -> float:
        return sum(pick(c) for c in spent) / len(spent) / sessions * 1000

    def role(c: dict[str, float], control: bool) -> float:
        return sum(v for k, v in c.items() if k.startswith("dispatcher-")
                   and k.endswith("-control") == control)

    cores = int(spent[0]["cores"])
    busy = sum(c["machine_busy_s"] for c in spent) / sum(c["wall_s"] * cores for c in spent)
    return (f"machine {mean_ms(lambda c: c['machine_busy_s']):.1f} ms ({busy:.0%} of its "
            f"{cores} cores busy): control worker {mean_ms(lambda c: role(c, True)):.1f}, "
            f"session workers {mean_ms(lambda c: role(c, False)):.1f}, emulator "
            f"{mean_ms(lambda c: c['emulator']):.1f}, the benchmark "
            f"{mean_ms(lambda c: c['benchmark']):.1f}, the rest (Redis, the broker, the "
            f"sandboxes, the kernel) {mean_ms(lambda c: c['rest']):.1f}")


def _burst(results: dict[str, Any]) -> list[str]:
    """The burst part (`--only burst`): a burst into as many free slots, and a big backlog."""
    part = results.get("burst")
    if not part:
        return []
    sizes = results["sizes"]
    slots, backlog = sizes.get("burst", 100), sizes.get("big_backlog", 1000)
    rows = ["| figure | dispatcher | peer | dispatcher vs peer | our target |",
            "|---|---|---|---|---|"]
    for key, sandbox in (("burst_shell", "shell sandbox"), ("burst", "fake session program")):
        b = part.get(key)
        if not b:
            continue
        flat = b["flatness"]
        rows.append(f"| burst of {slots} into {slots} free slots ({sandbox}), created -> "
                    f"started p50 | {_ms(b['p50'])} | | | |")
        rows.append(f"| same, p99 (p99/p50 = {flat:.2f}) | {_ms(b['p99'])} | | "
                    f"| p99 within 1.5x of p50: {_target(flat <= 1.5)} |")
        for i, r in enumerate(b.get("rounds", []), 1):
            rows.append(f"| &nbsp;&nbsp;round {i}: p50 / p99 (created in "
                        f"{_ms(r['create_seconds'])}) | {_ms(r['p50'])} / {_ms(r['p99'])} "
                        "| | | |")
        cpu = _burst_cpu(b.get("rounds", []), slots)
        if cpu:
            rows.append(f"| &nbsp;&nbsp;CPU per session, first creation -> every sandbox "
                        f"started (mean of the rounds) | {cpu} | | | |")
    o = dig(part, "drain_big", "per_second")
    p = dig(part, "peer_drain_big", "per_second")
    if o is not None or p is not None:
        rows.append(f"| drain throughput, backlog of {backlog:,}, {slots} slots "
                    f"| {NA if o is None else f'{o:.1f} sessions/s'} "
                    f"| {NA if p is None else f'{p:.1f} sessions/s'} "
                    f"| {_ratio(o, p, higher_is_better=True)} | |")
    return [
        "## A burst, and a big backlog",
        "",
        f"One dispatcher fleet of {slots} slots (a control worker and two threads session "
        f"workers); {slots} sessions created at once ({sizes.get('burst_duration', 3):g} s "
        f"each, so the burst fills the fleet), {sizes.get('burst_rounds', 3)} rounds, pooled; "
        f"then a backlog of {backlog:,} sessions of 0.1 s drained by the same slots, and by "
        f"{slots} peer processes in the same run. The burst runs twice, on a fleet of its own "
        "each: first each sandbox a shell that writes the fake session's `started` and "
        "`exited` records itself (bench/scenarios.py, `SHELL_SESSION`), which shows the "
        "fleet's own spread; then the fake session program (`python -S fake_session.py`), "
        f"whose {slots} interpreters starting at once on this machine's cores are most of the "
        "spread. The drain, ours and the peer's, runs the fake session program on both sides.",
        "",
        *rows,
        "",
    ]


def _context(results: dict[str, Any]) -> list[str]:
    from bench.analysis import findings

    return findings(results)


def _method(results: dict[str, Any]) -> list[str]:
    from bench.analysis import method

    return method(results)
