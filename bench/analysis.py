"""The prose of BENCHMARKS.md: what explains each figure, where we miss or lose, and how each
figure was taken. Figures are interpolated; the explanations cite the dispatcher code."""

from __future__ import annotations

from typing import Any

from bench.report import dig
from dispatcher.lease.machine.running import PULSE_STALE_SECONDS

__all__ = ["findings", "method"]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _step(side: dict[str, Any], batch: str, step: str, key: str) -> float | None:
    """One figure of the breakdown (milliseconds), if it was measured."""
    rows = dig(side, "breakdown", batch) or []
    row = next((r for r in rows if r["step"] == step), None)
    return None if row is None else row.get(key)


def _msf(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _dispatch(ours: dict[str, Any], peer: dict[str, Any], rate: float) -> list[str]:
    figures = [(f"{what} {q}", dig(ours, key, q), dig(peer, key, q))
               for what, key in (("idle", "dispatch_idle"), (f"at {rate:g}/s", "dispatch_steady"))
               for q in ("p50", "p99")]
    slower = [name for name, o, p in figures if o is not None and p is not None and o > p]
    measured = [f for f in figures if f[1] is not None and f[2] is not None]
    verdict = (f"We are slower than the peer on {', '.join(slower)}: see below why."
               if slower else "We are at most the peer's on every one of them."
               if measured else "")

    def path(batch: str) -> str:
        acked = _step(ours, batch, "acked", "since_created_p50")
        spawned = _step(ours, batch, "spawned", "since_created_p50")
        peer_acked = _step(peer, batch, "ack_answered", "since_created_p50")
        own = _step(ours, batch, "sandbox_started", "p50")
        peer_own = _step(peer, batch, "sandbox_started", "p50")
        polled = _step(ours, batch, "poll_answered", "since_created_p99")
        peer_polled = _step(peer, batch, "poll_answered", "since_created_p99")
        extra = None if acked is None or spawned is None else spawned - acked
        return (f"{batch} (p50 since creation): ours had its ack answered after {_msf(acked)}, "
                f"the peer after {_msf(peer_acked)}; ours then took {_msf(extra)} more until "
                f"its command was spawned (the record, the publish, the broker hop, the "
                f"pool's pick-up, the lease reads and the running mark), where the peer forks "
                f"at once. The sandbox's own start then took {_msf(own)} for ours (from the "
                f"spawn) and {_msf(peer_own)} for the peer (its fork included). The emulator "
                f"answered the poll within {_msf(polled)} of creation for ours, "
                f"{_msf(peer_polled)} for the peer (p99)")

    paths = [path(b) for b in ("idle", "steady")
             if dig(ours, "breakdown", b) and dig(peer, "breakdown", b)]
    busier = [b for b in ("idle", "steady")
              if (_step(ours, b, "sandbox_started", "p50") or 0)
              > 1.2 * (_step(peer, b, "sandbox_started", "p50") or float("inf"))]
    if busier:
        paths.append(
            f"{' and '.join(busier).capitalize()}, the same sandbox took longer to start under "
            "ours: while it starts, our fleet does more beside it on the same two cores (this "
            "session's first heartbeat, answered by the emulator and recorded by the control "
            "worker; the running sessions' supervisors pulsing every 0.2 s; the stop bridge "
            "listing the environment every second while leases are held), where the peer's "
            "processes only wait on their sandboxes")
    return [
        "**Dispatch latency.** "
        + "; ".join(f"{name}: ours {_ms(o)}, the peer's {_ms(p)}" for name, o, p in figures)
        + f". {verdict}",
        "",
        "How a session starts: one poller per environment always has a long poll outstanding "
        "while a slot is free (a run lasts `POLL_RUN_SECONDS` = 60 s and hands its lock to its "
        "successor without a gap, dispatcher/control/poller.py), so the emulator answers it "
        "the moment the session is created. `poller.claim` reads the lease and its history "
        "(one Redis round trip), sends the ack and, while it is in flight, creates the lease "
        "record already dispatched and publishes the session task (up to 16 claims of an "
        "environment side by side); the session starts only once the ack's answer proves the "
        "lease (`MarkProven`; dispatcher/lease/machine/claiming.py), and metrics are counted "
        "at the end in one write. A session worker with a free thread takes the message at "
        "once (no prefetch, early ack), reads the lease, work item and its drain flag in one "
        "round trip, waits for the proof if it came first, marks the attempt running (one Lua "
        "call) and spawns the command "
        "itself (dispatcher/session/sandbox.py): no interpreter start is on the path. The "
        "peer acks and forks the command: fewer steps, but each of its 10 processes sleeps 1 "
        "to 3 s after an empty poll (`_poller.py`, `_jitter(1.0, 3.0)`), so now and then no "
        "poll is outstanding when a session arrives.",
        "",
        *([("The breakdown (next section) shows where the milliseconds go. "
            + "; ".join(paths)
            + ". The sandbox's own start is a Python program's (`python -S fake_session.py`), "
            "the same for both and most of the total; on a loaded machine it varies most. What "
            "ours adds to the peer's path is the registry writes, the broker hop and the pool's "
            "pick-up, against the peer's 1 to 3 s gaps between polls."), ""] if paths else []),
    ]


def findings(results: dict[str, Any]) -> list[str]:
    ours, peer = results.get("ours", {}), results.get("peer", {})
    cap = results.get("capacity", {})
    ttl = results.get("emulator_default_ttl")
    slots = results["sizes"]["slots"]
    out = ["## What the figures say, and why", ""]

    out += _dispatch(ours, peer, results["sizes"]["steady_rate"])

    dr, pr = dig(ours, "drain", "per_second"), dig(peer, "drain", "per_second")
    out += [
        "**Drain throughput.** "
        f"Ours {_f(dr)} sessions/s against the peer's {_f(pr)} with {slots} slots each"
        + (" (we lose)" if dr is not None and pr is not None and dr < pr else "")
        + ". Two things bound ours: (1) one poller run per environment (a Redis lock, "
        "`_take_lock`) polls one item a round trip, its claims (ack, record, publish) in "
        "threads beside it, up to `CLAIMS_IN_FLIGHT` = 16, and side-by-side polls only once "
        "the queue shows a burst (`queue_busy`); the peer has N pollers in parallel; (2) a slot "
        "is only free once its lease is released: the supervision hub sees the exit within "
        "`SUPERVISE_INTERVAL_SECONDS` = 0.2 s (dispatcher/session/supervision.py), then the "
        "attempt posts `stop(force)` and deletes the lease (dispatcher/lease/executor.py, "
        "`release`); a full fleet's poller sees the slot within `FULL_FLEET_RECHECK_SECONDS` = "
        "50 ms (dispatcher/control/poller.py, `_wait_for_room`). "
        "The peer's processes claim in parallel but lose about 1.5 s between sessions: the "
        "sandbox force-stops its item on exit (as `ant beta:worker run` and the SDK's "
        "`handle_item` do), then the poller's `auto_stop` posts its graceful stop, gets 409, "
        "and the SDK client retries the 409 twice with backoff (`max_retries` = 2, "
        "0.5 s initial delay; `_base_client.py` treats 409 as retryable) before the poller "
        "ignores it. That is the published behaviour, so it is measured as is.",
        "",
    ]

    st99, pst99 = dig(ours, "stop", "p99"), dig(peer, "stop", "p99")
    out += [
        "**Stop latency.** "
        f"Ours p99 {_ms(st99)}"
        + (" (target 2 s met)" if st99 is not None and st99 < 2 else " (**target 2 s missed**)")
        + f"; the peer's p99 {_f(pst99)} s. The stop bridge (dispatcher/control/bridge.py, "
        "`scan_server_stops`) lists the environment's items every second (its held leases' "
        "worth of pages back to back: see Stops with many leases held) and raises the lease's "
        "stop flag; the session's "
        "supervisor reads it within 0.2 s and signals the "
        "sandbox's process group. The peer cannot do better than its sandbox's heartbeat "
        f"interval: under `--on-work` nobody else talks to the server about the item, and "
        f"the sandbox beats every ttl/2 ({ttl} s TTL here, so every {_f((ttl or 0) / 2, '.0f')} "
        "s; with the 120 s TTL of the official fixture, every 30 s at most).",
        "",
    ]

    rc, prc = dig(ours, "recovery", "p50"), dig(peer, "recovery", "p50")
    out += [
        "**Recovery.** "
        f"Ours {_f(rc)} s"
        + (" (target 10 s met)" if rc is not None and rc < 10 else " (**target 10 s missed**)")
        + f"; the peer {_f(prc)} s. When a session worker dies, its sandboxes die with it (its "
        "guardian reads end-of-file and ends their groups), its supervisors stop pulsing, and "
        f"after `PULSE_STALE_SECONDS` = {PULSE_STALE_SECONDS:g} s the control plane's `recover` "
        "tick (every second) starts the next attempt on any worker, while the lease never lapsed "
        "(dispatcher/control/recovery.py). "
        "The peer has no one to notice: its session could run again only once its lease lapses "
        f"on the server (the TTL, {ttl} s here, 300 s by SDK 2.17's default), and under SDK "
        "2.17's model of the service, the emulator's default, a lapsed lease ends its item "
        "(`stopped`): nobody runs it again, so the peer's figure is `never`. Under the earlier "
        "model (`--server-model earlier`) the server re-queued it and an idle peer polled it. "
        "The peer killed here is killed with its "
        "sandbox (a lost host); SIGKILL of the peer process alone leaves the sandbox running "
        "unsupervised (the CLI's child is not tied to its parent), which is not a recovery "
        "either.",
        "",
    ]

    polls = [(n, dig(ours, f"poll_{n}", "polls_per_min"), dig(peer, f"poll_{n}", "polls_per_min"))
             for n in results["sizes"]["poll_fleets"]]
    out += [
        "**Poll load.** "
        + "; ".join(f"{n} slot{'s' if n > 1 else ''}: ours {_f(o, '.0f')}, peer {_f(p, '.0f')} "
                    "polls/min" for n, o, p in polls)
        + ". One poller per environment long-polls back to back (`block_ms` = 999; each run "
        "lasts `POLL_RUN_SECONDS` = 60 s and hands its lock to the next), whatever the fleet's "
        "size: about one poll a second. "
        "Each peer process polls about every 3 s (a 1 s long poll, then a 1 to 3 s sleep), so "
        "the peer's load grows linearly with its slots. So with a single slot we send about "
        "three times the peer's polls (we lose there); from about three slots on, fewer. An "
        "idle dispatcher fleet sends nothing else: the stop bridge returns before listing "
        "when no lease is held.",
        "",
    ]

    out += [_capacity(cap), ""]

    mt, mp, pm = dig(ours, "memory_threads"), dig(ours, "memory_prefork"), dig(peer, "memory")
    if mt and mp:
        out += [
            "**Memory.** "
            f"On the threads pool a running session adds "
            f"{mt['per_session_kb'] / 1024:.2f} MB to the worker (a thread and its supervisor "
            f"state), plus its share of our guardian (one `python -S` per session worker, "
            "shared by its pool's processes, that ends a dead worker process's sandboxes, "
            "dispatcher/session/guardian.py): "
            f"{mt['launcher_per_session_kb'] / 1024:.2f} MB RSS, "
            f"{mt['launcher_pss_per_session_kb'] / 1024:.2f} MB PSS. Counting it, a session costs "
            f"{(mt['per_session_kb'] + mt['launcher_per_session_kb']) / 1024:.1f} MB RSS"
            + (", **over the 10 MB target**" if mt['per_session_kb'] +
               mt['launcher_per_session_kb'] >= 10240 else ", under the 10 MB target")
            + ". "
            "On the prefork pool the pool's children share the main process's guardian: "
            f"{mp['launcher_per_session_kb'] / 1024:.2f} MB RSS "
            f"({mp['launcher_pss_per_session_kb'] / 1024:.2f} MB PSS) per session; but each slot "
            "is a whole forked interpreter: "
            f"{mp['per_slot_kb'] / 1024:.0f} MB RSS ({mp['per_slot_pss_kb'] / 1024:.0f} MB "
            "PSS) per slot, paid whether the slot runs a session or not, so the marginal figure "
            "is small and the per-slot figure is what to plan for. The peer is one interpreter "
            "with the SDK loaded per slot"
            + (f": {pm['per_slot_kb'] / 1024:.0f} MB RSS ({pm['per_slot_pss_kb'] / 1024:.0f} MB "
               "PSS) per slot" if pm else "")
            + ", also paid while idle.",
            "",
        ]

    out += [
        "## Problems found in the dispatcher (reported, not fixed here)",
        "",
        "1. **`-P prefork` silently ran the thread pool (fixed since).** "
        "dispatcher/celery/application.py set `worker_pool=\"threads\"`, and Celery's CLI "
        "cannot tell an explicit `-P prefork` "
        "from its own default, so it substituted the configured pool (celery/bin/worker.py, "
        "`WorkersPool.convert`: `if value == 'prefork' and worker_pool: value = "
        "get_implementation(worker_pool)`): a worker started with `-P prefork -c 4` printed "
        "`concurrency: 4 (thread)`, and the prefork-parametrised acceptance tests ran threads. "
        "The fix: the app no longer sets `worker_pool`; it makes threads the default of the "
        "`-P` option itself (`CELERY_WORKER_POOL`, which Celery's CLI reads as that default, "
        "set only when unset), so any `-P` given wins, and the `worker ready` line names the "
        "pool the worker really runs. tests/acceptance/test_pools.py checks it on real "
        "workers. Runs before the fix measured prefork with `-P processes`, Celery's alias of "
        "the same pool, so their prefork figures stand.",
        "2. **Drain throughput was capped by the poller's run boundary (fixed since):** a "
        "full fleet's poller ended its run, so a backlog was claimed in bursts of at most "
        "`slots` a beat tick; it now waits for a slot "
        "(dispatcher/control/poller.py, `_poll_loop`).",
        "3. **One control worker kept only 500 leases (fixed since).** The heartbeat tick "
        "built an HTTP client and event loop each second on httpx's async transport, and the "
        "stop bridge and recovery read every lease every second: see Heartbeat capacity.",
        "4. **A launcher per session doubled the process count (fixed since)** and was most "
        "of a session's memory on the threads pool; one guardian per worker process replaced "
        "it, and then one per worker, shared by a prefork pool's children: see Memory.",
        "5. Not the dispatcher, but the emulator (fixed since): redis-py 8's asyncio pool "
        "allows 100 connections, so about 100 concurrent requests (long polls hold one each) "
        "exhausted it and the emulator closed connections without an answer "
        "(`MaxConnectionsError`). It now uses a blocking pool of 400 "
        "(dispatcher/emulator/app.py, `REDIS_MAX_CONNECTIONS`): a request beyond waits for a "
        "connection.",
        "6. Not the dispatcher, but the emulator's fake session in runner mode (fixed since): "
        "it computed its interval before the first answer, so its second beat came 15 s "
        "after the first whatever the TTL; it now beats at ttl/2 of the granted TTL, as the "
        "SDK's `_heartbeat_loop` does (dispatcher/emulator/fake_session.py, "
        "`Runner._beat_loop`). The stop benchmark still waits for each peer sandbox's second "
        "beat.",
        "7. **Garbage collection paused the control worker up to 220 ms (fixed since)**, and "
        "the emulator 50-100 ms every few seconds, at 20,000 leases held: each full collection "
        "walked the objects made at start-up, and the stop bridge's sweep waited behind both. "
        "Workers and the emulator now freeze those once started (dispatcher/heap.py): see "
        "Stops with many leases held.",
        "8. Not the dispatcher, but the emulator (fixed since): its `list` went through "
        "FastAPI, with json and a dict an item, and at pages of 1,000 the stop bridge's sweep "
        "took enough of the one process that the heartbeats fell behind. It is on the fast "
        "path now, encoded by msgspec.",
        "9. **A claim's requests cost the claimer as much as the rest of the claim (fixed "
        "since):** its poll, ack and first heartbeat went through httpx's sync client and "
        "httpcore's pool, twice the CPU of the lean transport the heartbeat tick already used. "
        "A worker's blocking client now has a lean transport of its own: see A burst, and a "
        "big backlog.",
        "10. **Every session's end read every kept output file's time (fixed since):** 26 ms "
        "of a session worker's CPU an end at the default 1,000 files, most of its CPU in a "
        "burst, and the next sessions started behind it. An end now counts the folders and "
        "reads the files' times once every hundred ends (dispatcher/session/output.py, "
        "`_rotate`): see A burst, and a big backlog.",
        "11. Not the dispatcher's code, but kombu's Redis transport as the fleet uses it "
        "(found, not fixed): a new redis-py client for every publish, received message and "
        "ack, 0.17 ms of CPU each. A transport with one client per channel was tried and "
        "reverted: the Sentinel failover scenario failed once in four runs with it.",
        "",
    ]
    return out


def _capacity(cap: dict[str, Any]) -> str:
    from bench.report import interval

    series = {s["ttl"]: s for s in cap.get("series", [])}

    def kept(ttl: int) -> str:
        one = series.get(ttl)
        if one is None:
            return ""
        largest = one["largest_without_lapse"]
        step = next((st for st in one["steps"] if st["n"] == largest), None)
        tried = largest == one["steps"][-1]["n"]
        return (f"{largest:,} leases kept at a {ttl} s TTL (a beat every "
                f"{interval(ttl):g} s" + (f", {step['beats_per_s']:.0f} beats/s" if step else "")
                + ("; the largest step tried)" if tried else ")"))

    def cpu(step: dict[str, Any], key: str) -> str:
        return (f"{step[key]:.0f}% of a core, {10 * step[key] / step['beats_per_s']:.2f} ms "
                "per beat" if step.get("beats_per_s") else "n/a")

    hard = series.get(30) or next(iter(series.values()), None)
    if hard is None:
        return "**Heartbeat capacity.** Not measured in this run."
    at5k = next((st for st in hard["steps"] if st["n"] == 5000), hard["steps"][-1])
    last = hard["steps"][-1]
    text = ("**Heartbeat capacity.** " + "; ".join(filter(None, [kept(t) for t in series]))
            + ". The 120 s TTL is what a fleet gets by default: `DISPATCHER_DESIRED_TTL_SECONDS` "
            "unset, the service grants its own default (120 s in its 412 fixture). "
            f"At {at5k['n']:,} leases and a {at5k['ttl']} s TTL the control worker used "
            f"{cpu(at5k, 'control_cpu_pct')}, all its work included, and the emulator "
            f"{cpu(at5k, 'emulator_cpu_pct')}. Per beat, the worker costs more at few beats "
            "a second: its fixed work (the stop bridge's `list` calls, recovery, the poller, "
            "beat) is shared by fewer beats. ")
    worker, server = last["control_cpu_pct"], last["emulator_cpu_pct"]
    if not last["lapsed"] and not last.get("behind"):
        text += (f"At {last['n']:,} leases and {last['ttl']} s, no limit found yet, the worker "
                 f"used {worker:.0f}% of a core and the emulator {server:.0f}%"
                 + (", so on this machine the emulator (one process, one core) would be the "
                    "next limit" if server > worker else "") + ". ")
    if last["lapsed"] or last.get("behind"):
        limit = ("the emulator, one process on one core, not the worker, is now the limit"
                 if server > max(worker, 80) else
                 "the worker is the limit" if worker > max(server, 80) else
                 "neither process was saturated: the two cores, shared with Redis, the "
                 "benchmark and whatever else ran, were")
        text += (f"At {last['n']:,} leases ({last['n'] / interval(last['ttl']):.0f} beats/s "
                 f"due) {last['beats_per_s']:.0f} beats/s were answered and gaps grew to "
                 f"{last['max_gap_s']:.1f} s (behind the schedule)"
                 + (" and leases lapsed" if last["lapsed"] else "")
                 + f", the worker at {worker:.0f}% of a core and the emulator at {server:.0f}%: "
                 f"on this machine {limit}. ")
    return text + (
        "Before the changes below, one control worker kept 1,000 leases at a 30 s TTL and "
        "lapsed at 2,000, at 4.5 ms of CPU per beat on an idle machine (the full run before, "
        "on a loaded one: 500, 8.1 ms); a profile of it at 2,000 leases (py-spy) showed "
        "httpx's async transport and the per-second reads of every lease taking nearly all of "
        "it. (1) The heartbeat tick sends from one event loop and client per worker process "
        "(dispatcher/control/heartbeat.py, `_Sender`), whose connections outlive ticks, over a "
        "lean "
        "HTTP/1.1 transport (dispatcher/workapi/http11.py): httpx's own costs 0.7 ms of CPU "
        "per request on one connection and over 1.5 ms with 64 in flight (its pool polls every "
        "connection whenever a request is queued or a response closes); this one, through "
        "httpx's client, about 0.3 ms. (2) A tick's plain replies are recorded in one Lua call "
        "per 500 (`LeaseRegistry.record_heartbeats`), not two round trips each. (3) Recovery reads "
        "only the leases silent for over 5 s, from an index of each lease's last sign of "
        "progress (`LeaseRegistry.silent_since`), not every lease each second. (4) The stop "
        "bridge reads its held leases' worth of `list` a tick, within 0.8 s (dispatcher/control/"
        "bridge.py `pages_per_tick`, `TICK_BUDGET_SHARE`; the `list` column grows with the "
        "count: one listed item a second per lease): see Stops with many leases held. Against "
        "the service, latency counts: beats/s = "
        "requests in flight / latency, and 256 in flight (`MAX_CONCURRENT_REQUESTS`) keep 500 "
        "beats/s up to 0.5 s of latency. `--hb-latency-ms 150` measures it: in runs of 5,000 "
        "leases at 30 s with every heartbeat answered 150 ms late, 64 in flight (the old "
        "limit) managed 352 of the 500 beats/s due (gaps growing: 15.5 s at the end of the "
        "window), 256 managed 467 (max gap 11.7 s, as without latency). The refused beats in "
        "the table, if any, are 412s: leases that lapsed and were re-queued by the server. The "
        "peer does not appear here: under `--on-work` the poller never heartbeats; every "
        "sandbox beats its own lease. Since then: (5) the benchmark no longer reads heartbeats "
        "back from the emulator's request log (a capped stream: one read of all 50,000 "
        "entries was answered 500 in an earlier run, and tailing 2,000 entries a second cost "
        "the benchmark and the emulator CPU of their own); the emulator counts the "
        "environment's beats as it answers them (each lease's last beat, the window's largest "
        "gap, refused and failed beats; dispatcher/emulator/requestlog.py `BeatStats`) and "
        "leaves them out of the log. (6) A tick of more than 64 leases starts its heartbeats "
        "evenly over 0.8 s (dispatcher/control/heartbeat.py, `pace`), not all at once, and a "
        "tick takes up to 4,000 (`BATCH_SIZE`: 20,000 leases at a 30 s TTL come due at 2,000 "
        "a second); the busiest 100 ms column shows how evenly beats reach the server. (7) The "
        "stop bridge reads a page's held stopping leases in one round trip, not one each. "
        + _CPU_CUTS + _at_scale(hard))


# Measured on the branch that brought them, before and after in one session (py-spy, then the
# capacity part at 3,000 leases and a heartbeat micro-benchmark): history, not this run's.
_CPU_CUTS = (
    "(8) Per beat: the emulator answers a heartbeat on a path of its own "
    "(dispatcher/emulator/fastpath.py `FastPath`, as are a session's creation, poll and ack: "
    "the same credential check, fault, store call, "
    "request-log entry and answer, without FastAPI's routing, dependency solving and response "
    "layers, which were over half of its CPU per heartbeat); the async Work API client hands "
    "its requests straight to the lean transport (`AsyncWorkClient._send`: httpx's client "
    "flows of auth, redirects and cookies, none of them used, cost a heartbeat about a "
    "quarter of its client-side CPU); and redis-py parses replies with hiredis (the tick's "
    "read of every due lease's hash, and every emulator request's Redis replies, at half the "
    "CPU). Measured before (main's code, no hiredis) and after in one session, load 6-15: "
    "the heartbeat tick alone, in-process against the emulator (500 leases all due, six "
    "rounds, means of 3 runs before and 4 after), the worker 0.78 -> 0.60 ms of CPU per "
    "beat and the emulator 1.59 -> 1.10 ms; this part at 1,500 leases, both runs at once, "
    "the worker 1.38 -> 1.17 "
    "ms per beat all its work included (the rest of it is the stop bridge's `list` sweep, "
    "the poller and beat) and the emulator 2.18 -> 1.43 ms, and the step fell behind "
    "before (max gap 15.1 s) and was kept after (11.4 s). The beat interval "
    "stays ttl/3 (dispatcher/lease/machine/steps.py `heartbeat_interval`): SDK 2.17's "
    "min(ttl/2, 30 s) would send a third fewer beats, but one failed or late beat would then "
    "lose the lease; ttl/3 leaves a retry inside the TTL. ")


def _at_scale(series: dict[str, Any], leases: int = 20_000) -> str:
    """What 20,000 leases (the issue's aim) would cost at the CPU per beat of the largest step
    kept, against this machine's cores: which process is the limit past the steps tried."""
    import os

    from bench.report import interval

    kept = [st for st in series["steps"] if not st["lapsed"] and not st.get("behind")]
    step = kept[-1] if kept else series["steps"][-1]
    if not step.get("beats_per_s"):
        return ""
    due = leases / interval(step["ttl"])
    worker = 10 * step["control_cpu_pct"] / step["beats_per_s"]
    server = 10 * step["emulator_cpu_pct"] / step["beats_per_s"]
    cores = os.cpu_count() or 1
    every = interval(step["ttl"])
    limits = {  # leases each would keep at this TTL at these costs
        "the worker (one process: one core at most, the GIL)": 1000 / worker * every,
        "the emulator (one process)": 1000 / server * every,
        f"the machine ({cores} cores for both, Redis and the benchmark)":
            cores * 1000 / (worker + server) * every,
    }
    first = min(limits, key=lambda k: limits[k])
    return (f"At {leases:,} leases and a {step['ttl']} s TTL, {due:,.0f} beats a second are "
            f"due: at the CPU per beat of the {step['n']:,} step ({worker:.2f} ms the worker, "
            f"{server:.2f} ms the emulator) that is {due * worker / 1000:.1f} cores of worker "
            f"and {due * server / 1000:.1f} of emulator. At these costs "
            + ", ".join(f"{name} would keep about {n:,.0f}" for name, n in limits.items())
            + f": {first} is the limit.")


def _sdk_version() -> str:
    """The peer's SDK, as installed: the report names what ran, not what once did."""
    from importlib import metadata

    try:
        return metadata.version("anthropic")
    except metadata.PackageNotFoundError:
        return "?"


def method(results: dict[str, Any]) -> list[str]:
    sizes = results["sizes"]
    capacity_sizes = results.get("part_sizes", {}).get("capacity", sizes)
    return [
        "## How each figure is taken",
        "",
        "* **Setup.** One Redis, one emulator (`dispatcher emulator --min-ttl 1 --default-ttl "
        f"{results.get('emulator_default_ttl')}`), one environment per fleet. Ours: a control "
        "worker (`celery -A dispatcher worker -Q dispatcher.control -B`) and two session "
        f"workers (`-Q dispatcher.sessions -P threads`, {sizes['slots'] // 2} + "
        f"{sizes['slots'] - sizes['slots'] // 2} slots), started by `dispatcher.ops.stack."
        f"LocalStack` as a user would. Peer: {sizes['slots']} processes of `python -m "
        "bench.peer` (bench/peer.py: `AsyncAnthropic(...).beta.environments.work.poller(...)` "
        f"of anthropic {_sdk_version()}, the installed pin, as published; for each item it "
        "spawns the command with the CLI's variables and the work JSON on stdin, waits, and "
        "lets the poller post its stop (`auto_stop`, forced since 2.16)). Both run "
        "`python -S dispatcher/emulator/fake_session.py`; the "
        "peer's sessions carry `fake.heartbeat: \"1\"` so the sandbox holds its own lease, as "
        "`ant beta:worker run` does under `--on-work`.",
        "* **Dispatch latency**: the benchmark's clock just before `POST /v1/sessions` -> the "
        f"sandbox's `started` record. Idle: {sizes['idle']} sessions one at a time, 0.5 s apart. "
        f"Steady: {sizes['steady_rate']:g} sessions/s for {sizes['steady_seconds']:g} s, each "
        "running 1 s.",
        f"* **Drain**: {sizes['backlog']} sessions of 0.1 s created at once (16 concurrent "
        "creates); sessions/s = N / (last `started` - first create). The issue asks for "
        f"1,000; {sizes['backlog']} keeps the whole run within minutes on 2 cores.",
        f"* **Stop**: {sizes['stops']} sessions running; a graceful `stop` each 0.3 s; ours: -> "
        "`sigterm` record; peer: -> the sandbox's first heartbeat answered `stopping`.",
        f"* **Recovery**: {sizes['recoveries']} long sessions; SIGKILL the session worker that "
        "runs the first (for the peer, its process group: the peer and its sandbox) -> the "
        "next `started` record of each session that worker ran.",
        f"* **Poll load**: an idle fleet, {sizes['poll_window']:g} s window, `poll` entries of "
        "its environment in the emulator's request log, scaled to a minute. Ours: control "
        "worker plus one session worker of 1, 10 or 50 threads; peer: 1, 10 or 50 processes.",
        f"* **Memory**: one session worker of {sizes['slots']} slots (`-P threads`, then "
        f"`-P prefork`), idle vs {sizes['memory_sessions']} sessions running; RSS (and PSS, "
        "which shares pages between forked children fairly) of the worker's process tree from "
        "/proc, with sandboxes (and, in their own line, our launchers) excluded, divided by "
        "the number of sessions. The peer: its processes, sandboxes excluded.",
        "* **Heartbeat capacity**: see its section; "
        + "; ".join(f"TTL {ttl} s: steps {steps}"
                    for ttl, steps in capacity_sizes["hb_series"])
        + f"; each step judged over {capacity_sizes['hb_window']:g} s or 1.5 beat intervals, "
        "whichever is longer, after one beat interval of settling.",
        "",
    ]
