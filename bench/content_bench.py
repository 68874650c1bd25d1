#!/usr/bin/env python3
"""Content-chain benchmark: messages/s and end-of-data latency with Bayes, SpamAssassin and ClamAV.

    load (127.2.x.y, one message per connection) --> gateway 127.0.0.1:2547 --> smtp-sink 127.0.0.1:2526
    gateway --> spamd 127.0.0.1:<port>, clamd unix:<dir>/clamd.sock   (the "full" cell)

The load is real mail: the SpamAssassin public corpus (the package bench/bayes_bench.py
downloads and caches), split by bayes_bench's hash split (--salt, half and half).
One half trains the Bayes token store (``python -m gateway.cli --config <cfg> bayes
train --spam/--ham``, before each cell that uses Bayes); the other half, hams and
spams in a fixed shuffled order, is what the load sends. Sessions come from
127.2.x.y, outside relay.networks (empty), so the inbound chain runs; the
recipient is in relay.domains; every accepted message is relayed to smtp-sink.

Cells, all in one run, each with a fresh gateway (``smtp.workers`` = auto):

- core: no content filters (filters.inbound = []);
- bayes: filters.inbound = ["bayes"], the trained store (min_training met);
- full: ["clamav", "spamassassin", "bayes"] against one spamd and one clamd,
  clamav scope "message", spamassassin's max_size at its default (500 KB).

No message is discarded or quarantined, so every cell does the same relaying
work: bayes quarantine = delete = 10.0 (a score is at most 10: spam is only
tagged; autolearn_spam, unused with autolearn off, must not be below
quarantine), spamassassin delete_score = 1000 (tag from spam_score 8, never its
default discard from 12). clamd has the test peer's tiny signature database
(tests/integration/peer_clamd.py: EICAR and one marker): a real freshclam
database makes clamd slower per scan and far bigger; there is no Internet here
to fetch one. spamd is the test peer too (tests/integration/peer_spamd.py: local
tests only, no DNS, RBL, Razor or Pyzor checks; its own Bayes untrained, so inactive).

Per cell it prints messages/s (250 replies to "." within the measured seconds),
the end-of-data latency p50 and p99 (from writing the final ".\\r\\n" to the
reply: the content filters' cost lands there), failures, the CPU of each process
(gateway main, SMTP workers, spamd with its children, clamd, smtp-sink, the load
client) in % of one core and in ms per message, how many messages reached the
sink (all of them must), the filters' opinions from the gateway's log, and
then, from the medians of --reps, the ratios bayes/core and full/core of
messages/s and the latency each adds (cell minus core).

MAIL, RCPT and DATA go pipelined in one write, as an MTA sends them. At commit
b52c911 that costs each session about 40 ms before the 354: the gateway sets no
TCP_NODELAY, so its later reply waits (Nagle) for the client's delayed ACK of the
first. --no-pipelining sends them one by one and shows the chain's cost without it.

    /tmp/venv/bin/python bench/content_bench.py [--seconds 10] [--concurrency 10] [--reps 3]
        [--no-pipelining] [--cells core,bayes,full] [--spamd-children 4] [--warmup 2]

Needs root (smtp-sink -u nobody, spamd's children as nobody), postfix (smtp-sink),
spamd, clamd and sigtool.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from _content_load import Load, Sample, Tally, percentile, to_wire  # noqa: E402
from _sysstat import CLK_TCK, NCPU, Snapshot, compare, descendants  # noqa: E402
from bayes_bench import fetch, split  # noqa: E402
from filter_bench import worker_pids  # noqa: E402
from relay_bench import Gateway, Processes, Sink, gateway_config  # noqa: E402

from tests.integration.peer_clamd import Clamd  # noqa: E402
from tests.integration.peer_spamd import Spamd  # noqa: E402

GATEWAY_PORT = 2547
CELLS = ("core", "bayes", "full")
DRAIN_SECONDS = 120.0
_OPINION = re.compile(r"filter: (\S+) (\S+) at data ")

BAYES_CONFIG = """
[filters.bayes]
min_training = 200
quarantine = 10.0
delete = 10.0
autolearn_spam = 10.0
"""

FULL_CONFIG = """
[filters.clamav]
server = "%(clamd)s"
scope = "message"

[filters.spamassassin]
server = "%(spamd)s"
delete_score = 1000.0
"""


def config(cell: str, spamd: Spamd | None, clamd: Clamd | None) -> str:
    text = gateway_config(GATEWAY_PORT, inbound=True)
    if cell == "core":
        return text + "\n[filters]\ninbound = []\n"
    if cell == "bayes":
        return text + '\n[filters]\ninbound = ["bayes"]\n' + BAYES_CONFIG
    assert spamd is not None and clamd is not None
    chain = '\n[filters]\ninbound = ["clamav", "spamassassin", "bayes"]\n'
    return text + chain + BAYES_CONFIG + FULL_CONFIG % {"clamd": clamd.unix_endpoint, "spamd": spamd.endpoint}


# --- the corpus --------------------------------------------------------------------


def prepare(cache: str, salt: str, work: str) -> tuple[dict[str, str], list[Sample]]:
    """The training half written out as files ({"spam": dir, "ham": dir}) and the load's samples."""
    corpus = split(fetch(cache), 0.5, salt)
    folders = {"spam": os.path.join(work, "train", "spam"), "ham": os.path.join(work, "train", "ham")}
    for folder in folders.values():
        os.makedirs(folder)
    for number, (_name, raw, spam) in enumerate(corpus.train):
        with open(os.path.join(folders["spam" if spam else "ham"], f"{number:05d}.eml"), "wb") as handle:
            handle.write(raw)
    samples = [Sample(name, to_wire(raw), spam) for name, raw, spam in corpus.test]
    random.Random(salt).shuffle(samples)  # hams and spams mixed, the same order every run
    return folders, samples


def train(gateway: Gateway, folders: dict[str, str]) -> str:
    """Train the cell's token store through mailgatectl, as an administrator would; its stats."""
    base = [sys.executable, "-m", "gateway.cli", "--config", gateway.config, "bayes"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for kind, folder in folders.items():
        subprocess.run([*base, "train", f"--{kind}", folder], check=True, capture_output=True, env=env)
    stats = subprocess.run([*base, "stats"], check=True, capture_output=True, text=True, env=env).stdout
    counts = dict(line.split(":", 1) for line in stats.splitlines() if ":" in line)
    return f"{counts['spam learned'].strip()} spam, {counts['ham learned'].strip()} ham"


# --- CPU ------------------------------------------------------------------------------


def tree_cpu(before: Snapshot, after: Snapshot, root: int) -> float:
    """CPU of `root` and every process below it (spamd's pre-forked children), % of one core."""
    wall = (after.total - before.total) / CLK_TCK / NCPU
    used = 0.0
    for pid in descendants(after.procs, {root}) | descendants(before.procs, {root}):
        new, old = after.procs.get(pid), before.procs.get(pid)
        if new is not None:
            used += new.cpu - (old.cpu if old is not None else 0.0)
    top_new, top_old = after.procs.get(root), before.procs.get(root)
    if top_new is not None and top_old is not None:
        used += top_new.child_cpu - top_old.child_cpu  # children that exited meanwhile
    return round(100.0 * used / max(wall, 1e-9), 1)


def cpu_usage(
    before: Snapshot,
    after: Snapshot,
    gateway: Gateway,
    sink: Sink,
    spamd: Spamd | None,
    clamd: Clamd | None,
) -> dict[str, float]:
    named = {"main": gateway.pid, "load": os.getpid(), "sink": sink.proc.pid}
    for number, pid in enumerate(worker_pids(gateway.pid), 1):
        named[f"worker{number}"] = pid
    roots = (
        {gateway.pid, sink.proc.pid} | ({spamd.pid} if spamd else set()) | ({clamd.pid} if clamd else set())
    )
    usage = compare(before, after, roots, named)
    cpu = {
        key.removesuffix("_cpu_pct_1core"): value for key, value in usage.items() if key.endswith("_1core")
    }
    if spamd is not None:
        cpu["spamd"] = tree_cpu(before, after, spamd.pid)
    if clamd is not None:
        cpu["clamd"] = tree_cpu(before, after, clamd.pid)
    cpu.update({key: usage[key] for key in ("cpu_busy_pct", "steal_pct", "foreign_cpu_pct")})
    # busy time neither ours nor in a foreign process seen by both snapshots: the kernel's
    # softirq work, and short-lived processes of other sessions (their tests) that came and went
    ours = sum(value for key, value in cpu.items() if not key.endswith("_pct"))
    busy = NCPU * (usage["cpu_busy_pct"] - usage["foreign_cpu_pct"])
    cpu["unattributed_pct"] = round(max(busy - ours, 0.0) / NCPU, 1)
    return cpu


# --- one cell ---------------------------------------------------------------------------


def run_cell(
    procs: Processes,
    directory: str,
    cell: str,
    args: argparse.Namespace,
    load: Load,
    sink: Sink,
    folders: dict[str, str],
    spamd: Spamd | None,
    clamd: Clamd | None,
) -> dict[str, Any]:
    gateway = Gateway(procs, directory, sys.executable, config(cell, spamd, clamd), GATEWAY_PORT)
    try:
        trained = train(gateway, folders) if cell != "core" else ""
        at_sink = sink.count()
        warm = asyncio.run(load.run(args.warmup))  # imports, the store's first reads, spamd's children
        time.sleep(0.5)
        before, started = Snapshot.take(), time.monotonic()
        tally = asyncio.run(load.run(args.seconds))
        after, wall = Snapshot.take(), time.monotonic() - started
        cpu = cpu_usage(before, after, gateway, sink, *((spamd, clamd) if cell == "full" else (None, None)))
        # every accepted message must reach the sink: the spool drains, nothing is lost
        deadline = time.monotonic() + DRAIN_SECONDS
        while gateway.queue_count() and time.monotonic() < deadline:
            time.sleep(0.2)
        relayed = sink.count() - at_sink
        result = summary(cell, tally, warm, cpu, relayed, gateway.queue_count(), trained)
        # CPU per message, over every message handled between the snapshots (the late ones too)
        result["cpu_ms_per_message"] = {
            name: 10.0 * value * wall / max(tally.accepted_total, 1)
            for name, value in cpu.items()
            if not name.endswith("_pct")
        }
    finally:
        gateway.stop()
    result["verdicts"] = verdicts(gateway.log)
    return result


def verdicts(log: str) -> dict[str, int]:
    """How often each filter had each opinion ("bayes tag": 120), from the gateway's log lines."""
    found: dict[str, int] = {}
    with open(log, errors="replace") as lines:
        for line in lines:
            if match := _OPINION.search(line):
                key = f"{match[1]} {match[2]}"
                found[key] = found.get(key, 0) + 1
    return found


def summary(
    cell: str, tally: Tally, warm: Tally, cpu: dict[str, float], relayed: int, left: int, trained: str
) -> dict[str, Any]:
    return {
        "cell": cell,
        "rate": tally.rate,
        "accepted": tally.accepted,
        "p50_ms": 1000 * percentile(tally.latencies, 0.50),
        "p99_ms": 1000 * percentile(tally.latencies, 0.99),
        "failed": tally.failed,
        "failures": tally.failures,
        "late": tally.late,
        "spam_share": tally.spam / max(tally.accepted, 1),
        "mean_kb": tally.octets / max(tally.accepted, 1) / 1024,
        "expected_at_sink": warm.accepted_total + tally.accepted_total,
        "relayed": relayed,
        "spool_left": left,
        "cpu": cpu,
        "trained": trained,
    }


def show(rep: int, result: dict[str, Any]) -> None:
    cpu = result["cpu"]
    processes = " ".join(
        f"{name}={cpu[name]:.0f}% ({ms:.1f})" for name, ms in result["cpu_ms_per_message"].items()
    )
    failures = f" {result['failures']}" if result["failures"] else ""
    trained = f"  trained: {result['trained']}" if result["trained"] else ""
    opinions = ", ".join(f"{key} {count}" for key, count in sorted(result["verdicts"].items()))
    trained += f"  opinions (whole cell): {opinions}" if opinions else ""
    print(
        f"rep {rep + 1} {result['cell']:<6} msg/s={result['rate']:6.1f} p50={result['p50_ms']:6.1f} ms"
        f" p99={result['p99_ms']:7.1f} ms ok={result['accepted']} failed={result['failed']}{failures}"
        f" unfinished={result['late']} spam={100 * result['spam_share']:.0f}% mean={result['mean_kb']:.1f} KB"
        f" at-sink={result['relayed']}/{result['expected_at_sink']}"
        f" spool-left={result['spool_left']}{trained}",
        flush=True,
    )
    print(
        f"      cpu, % of one core (ms per message): {processes}"
        f"  busy={cpu['cpu_busy_pct']}% steal={cpu['steal_pct']}% foreign={cpu['foreign_cpu_pct']}%"
        f" unattributed={cpu['unattributed_pct']}%",
        flush=True,
    )


def table(results: dict[str, list[dict[str, Any]]], reps: int) -> None:
    def med(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(row[key] for row in rows))

    print()
    print(f"median of {reps}      msg/s   p50 ms   p99 ms  failed   (each repetition: msg/s)")
    medians = {}
    for cell, rows in results.items():
        if not rows:
            continue
        m = medians[cell] = {key: med(rows, key) for key in ("rate", "p50_ms", "p99_ms")}
        each = ", ".join(f"{row['rate']:.0f}" for row in rows)
        print(
            f"{cell:<14} {m['rate']:8.1f} {m['p50_ms']:8.1f} {m['p99_ms']:8.1f}"
            f" {sum(row['failed'] for row in rows):7d}   ({each})"
        )
    if "core" not in medians:
        return
    core = medians["core"]
    for cell in ("bayes", "full"):
        if cell in medians:
            m = medians[cell]
            print(
                f"{cell}/core: msg/s ratio {m['rate'] / core['rate']:.2f}; added latency"
                f" p50 {m['p50_ms'] - core['p50_ms']:+.1f} ms, p99 {m['p99_ms'] - core['p99_ms']:+.1f} ms"
            )


# --- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured load before each cell")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent sessions")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of every cell; medians")
    parser.add_argument("--cells", default=",".join(CELLS), help="which cells to run")
    parser.add_argument(
        "--no-pipelining",
        action="store_true",
        help="send MAIL, RCPT and DATA one by one (default: pipelined in one write, as an MTA does)",
    )
    parser.add_argument("--spamd-children", type=int, default=4, help="spamd --max-children")
    parser.add_argument("--salt", default="mailgate", help="the corpus split (bench/bayes_bench.py)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/mailgate-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    cells = [cell for cell in args.cells.split(",") if cell]
    if unknown := set(cells) - set(CELLS):
        parser.error(f"unknown cells {sorted(unknown)}: choose from {', '.join(CELLS)}")
    missing = [tool for tool in ("smtp-sink", "spamd", "clamd", "sigtool") if shutil.which(tool) is None]
    if missing:
        print(f"content_bench: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    procs = Processes()
    work = tempfile.mkdtemp(prefix="mailgate-content-bench-")
    os.chmod(work, 0o755)  # spamd's children run as nobody and read their directory below it
    spamd = clamd = None
    results: dict[str, list[dict[str, Any]]] = {cell: [] for cell in cells}
    try:
        folders, samples = prepare(args.cache, args.salt, work)
        spams = sum(sample.spam for sample in samples)
        sizes = sorted(len(sample.wire) for sample in samples)
        print(
            f"# load: {len(samples)} messages ({spams} spam, {len(samples) - spams} ham) of the SpamAssassin"
            f" public corpus, median {sizes[len(sizes) // 2] / 1024:.1f} KB, mean"
            f" {sum(sizes) / len(sizes) / 1024:.1f} KB, max {sizes[-1] / 1024:.0f} KB; one message per"
            f" connection, {args.concurrency} sessions, MAIL/RCPT/DATA"
            f" {'one by one' if args.no_pipelining else 'pipelined'}; {os.cpu_count()} CPUs, load average"
            f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            flush=True,
        )
        if "full" in cells:
            spamd = Spamd(os.path.join(work, "spamd"), max_children=args.spamd_children)
            spamd.start(timeout=120)
            clamd = Clamd(os.path.join(work, "clamd"), stream_max_length="30M")
            clamd.start(timeout=60)
            print(
                f"# spamd --max-children {args.spamd_children} on {spamd.hostport}; clamd on"
                f" {clamd.unix_endpoint} with the test peer's tiny signature database (not freshclam's)",
                flush=True,
            )
        sink = Sink(procs, work)
        load = Load(GATEWAY_PORT, samples, args.concurrency, pipelining=not args.no_pipelining)
        for rep in range(args.reps):
            for cell in cells:
                directory = os.path.join(work, f"rep{rep}", cell)
                result = run_cell(procs, directory, cell, args, load, sink, folders, spamd, clamd)
                results[cell].append(result)
                show(rep, result)
    except KeyboardInterrupt:
        print("# interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        for peer in (spamd, clamd):
            if peer is not None:
                peer.stop()
        if args.keep:
            print(f"# kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    table(results, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
