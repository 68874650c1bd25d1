#!/usr/bin/env python3
"""Filter-chain benchmark: pre-DATA sessions per second, with and without the chain.

    load (127.2.x.y, a new client address per session) --> gateway 127.0.0.1:2537
    gateway --DNSBL (3 zones)--> rbldnsd 127.0.0.1:<port>   (through a slow proxy
                                                              for 127.9.x.y clients)

A session is what the pre-DATA chain sees of every client: connect, banner,
EHLO, then MAIL FROM, RCPT TO and QUIT pipelined, and the three replies. With
--message, a session sends one 1 KB message (DATA) before QUIT, which the
gateway queues (fsync) and relays to smtp-sink: sessions/s is then messages/s
accepted, the relay's connection throughput. Each
session comes from a different source address in 127.2.0.0/16, so every session
is a new client for the DNSBL cache (three real lookups per session).

Cells, all in one run, each with a fresh gateway:

- core: the relay core alone (``filters.inbound = []``: no filters);
- defaults (only with --cells): the embedded default inbound chain (lists,
  limits, helo: no DNS), what a new install runs;
- chain: the pre-DATA chain (lists, limits, protocol, helo, dnsbl with three
  zones, recipients: three DNS questions per session), with
  the documented defaults except what a benchmark must change: limits raised far
  above the load, and protocol's greet_wait 0 (its 6 s pause once per new client
  is latency, not work; every session here is a new client);
- proxied: the chain, its DNS through the proxy (a Python process: it costs CPU);
- chain+stalled: proxied, while 1,000 other sessions (from 127.9.x.y) wait on
  DNS answers that never come (the proxy drops their queries): are the other
  sessions still served, and how fast, compared with proxied?

The load client is a plain epoll loop (no asyncio streams): it shares the two
vCPUs with the gateway, and each microsecond it spends is one the gateway does
not get. Each cell's line shows every process's CPU, in % of one vCPU and in
microseconds per session.

It prints sessions/s per cell and the ratios chain/core (target >= 0.8: the chain
costs under 20 %) and stalled/chain (sessions served while 1,000 wait).

    /tmp/venv/bin/python bench/filter_bench.py [--seconds 10] [--concurrency 50] [--reps 3]

Needs root (rbldnsd is started as nobody), rbldnsd, and the gateway's Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _sysstat import Snapshot, compare, worker_pids  # noqa: E402
from relay_bench import Gateway, Processes, Sink, gateway_config  # noqa: E402

HOST = "127.0.0.1"
GATEWAY_PORT = 2537
ZONES = ("z1.bench.test", "z2.bench.test", "z3.bench.test")
STALLED = 1000

DNS_CONFIG = """
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "60s"
"""

CHAIN_CONFIG = """
[filters]
inbound = ["lists", "limits", "protocol", "helo", "dnsbl", "recipients"]

[filters.lists]
block_clients = ["192.0.2.0/24", "198.51.100.0/24"]
block_senders = ["@spam.example"]

[filters.limits]
max_sessions = 100000
max_connections_per_ip = 1000
max_connection_rate = 100000

[filters.protocol]
greet_wait = 0

[filters.dnsbl]
zones = ["z1.bench.test*2", "z2.bench.test", "z3.bench.test"]
threshold = 2

[filters.recipients]
mode = "static"
addresses = ["@dest.bench.test"]
"""


class RblDns:
    """rbldnsd with three ip4set zones, and a proxy in front that drops queries for 127.9/16."""

    def __init__(self, procs: Processes, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)
        for number, listed in enumerate(("127.3.0.0/16", "127.4.0.0/16", "127.5.0.0/16"), 1):
            with open(os.path.join(directory, f"z{number}"), "w") as handle:
                handle.write(f"{listed}\n")
        with open(os.path.join(directory, "domains"), "w") as handle:
            handle.write(".spam.example\n")
        with open(os.path.join(directory, "generic"), "w") as handle:  # the sender's domain has an MX
            handle.write("client MX 10 mx.client.bench.test\nmx.client A 127.0.0.1\n")
        self.port = free_udp_port()
        self.proxy_port = free_udp_port()
        zones = [f"{zone}:ip4set:z{n}" for n, zone in enumerate(ZONES, 1)]
        zones += ["dbl.bench.test:dnset:domains", "bench.test:generic:generic"]
        self.proc = procs.start(
            [
                "rbldnsd",
                "-n",
                "-f",
                "-u",
                "nobody",
                "-b",
                f"{HOST}/{self.port}",
                "-r",
                directory,
                *zones,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.proxy = procs.start(
            [
                sys.executable,
                os.path.join(HERE, "_slow_dns.py"),
                str(self.proxy_port),
                str(self.port),
                ".9.127.z",  # the reversed 127.9.x.y in the bench zones: y.x.9.127.zN.bench.test
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# what each cell adds to the gateway's configuration; the others run CHAIN_CONFIG
CELL_CONFIG = {
    "core": "\n[filters]\ninbound = []\n",  # no filters at all: the relay core alone
    "defaults": "",  # the embedded default inbound chain (lists, limits, helo; no DNS)
}


def gateway(procs: Processes, directory: str, dns_port: int, cell: str) -> Gateway:
    config = gateway_config(GATEWAY_PORT, inbound=True, extra=DNS_CONFIG.format(dns_port=dns_port))
    config += CELL_CONFIG.get(cell, CHAIN_CONFIG)
    return Gateway(procs, directory, sys.executable, config, GATEWAY_PORT)


MESSAGE = b"From: sender@client.bench.test\r\nTo: rcpt@dest.bench.test\r\nSubject: bench\r\n\r\n"
MESSAGE += (b"x" * 70 + b"\r\n") * ((1024 - len(MESSAGE)) // 72)  # about 1 KB in 72-octet lines

EHLO = b"EHLO client.bench.test\r\n"
ENVELOPE = b"MAIL FROM:<sender@client.bench.test>\r\nRCPT TO:<rcpt@dest.bench.test>\r\n"
# A session's script: the reply codes to wait for, then what to send (None: done).
PRE_DATA: list[tuple[tuple[bytes, ...], bytes | None]] = [
    ((b"220",), EHLO),
    ((b"250",), ENVELOPE + b"QUIT\r\n"),
    ((b"250", b"250", b"221"), None),
]
WITH_MESSAGE: list[tuple[tuple[bytes, ...], bytes | None]] = [
    ((b"220",), EHLO),
    ((b"250",), ENVELOPE + b"DATA\r\n"),
    ((b"250", b"250", b"354"), MESSAGE + b".\r\nQUIT\r\n"),
    ((b"250", b"221"), None),
]
SESSION_TIMEOUT = 30.0


class Session:
    """One client session, driven by the epoll loop in `load`: read replies, send the next step."""

    __slots__ = ("buffer", "codes", "script", "sock", "started", "step", "unsent")

    def __init__(self, sock: socket.socket, script: list[tuple[tuple[bytes, ...], bytes | None]]) -> None:
        self.sock = sock
        self.script = script
        self.step = 0
        self.buffer = b""
        self.codes: list[bytes] = []
        self.unsent = b""
        self.started = time.monotonic()

    def readable(self) -> bool | None:
        """None while the session goes on; True when it ended as it should, False when not."""
        data = self.sock.recv(65536)  # OSError (refused, reset) is the caller's
        if not data:
            raise ConnectionError("closed by the server")
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
            if len(line) < 4 or line[3:4] != b"-":  # the last line of a reply
                self.codes.append(line[:3])
        expected, then = self.script[self.step]
        if len(self.codes) < len(expected):
            return None
        if tuple(self.codes) != expected:
            return False
        if then is None:
            return True
        self.step += 1
        self.codes = []
        self.send(then)
        return None

    def send(self, data: bytes) -> None:
        data = self.unsent + data
        sent = self.sock.send(data)
        self.unsent = data[sent:]


def load(seconds: float, concurrency: int, message: bool = False) -> dict[str, Any]:
    """Sessions from fresh 127.2.x.y addresses, `concurrency` at a time, for `seconds`.

    A plain epoll loop over non-blocking sockets, no asyncio streams: the load
    client shares the two vCPUs with the gateway, and every microsecond it
    spends per session is one the gateway does not get (asyncio streams cost
    it about 2.5 times as much per session).
    """
    addresses = [f"127.2.{a}.{b}" for a in range(256) for b in range(1, 255)]
    random.shuffle(addresses)
    script = WITH_MESSAGE if message else PRE_DATA
    done = failed = 0
    errors: dict[str, int] = {}
    sessions: dict[int, Session] = {}
    durations: list[float] = []
    poller = select.epoll()
    index = 0
    start = time.monotonic()
    deadline = start + seconds
    end = deadline + 0.5  # sessions that were nearly done finish (and are not counted)

    def open_session() -> None:
        nonlocal index
        source = addresses[index % len(addresses)]
        index += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex((HOST, GATEWAY_PORT))  # EINPROGRESS; a refusal shows on the first read
        sessions[sock.fileno()] = Session(sock, script)
        poller.register(sock.fileno(), select.EPOLLIN)

    def close(session: Session, ok: bool | None, error: BaseException | None = None) -> None:
        nonlocal done, failed
        fd = session.sock.fileno()
        poller.unregister(fd)
        del sessions[fd]
        session.sock.close()
        if error is not None:
            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
        if time.monotonic() <= deadline:
            if ok:
                done += 1
                durations.append(time.monotonic() - session.started)
            else:
                failed += 1
            open_session()

    for _ in range(concurrency):
        open_session()
    next_sweep = start + 1.0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_sweep:
            next_sweep = now + 1.0
            for session in [s for s in sessions.values() if now - s.started > SESSION_TIMEOUT]:
                close(session, False, TimeoutError())
        for fd, events in poller.poll(min(end - now, 0.25)):
            session = sessions[fd]
            if events & select.EPOLLOUT and session.unsent:
                try:
                    session.send(b"")
                except OSError as error:
                    close(session, False, error)
                    continue
            if not events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                if not session.unsent:
                    poller.modify(fd, select.EPOLLIN)
                continue
            try:
                outcome = session.readable()
            except OSError as error:  # ConnectionError is one
                close(session, False, error)
                continue
            if outcome is not None:
                close(session, outcome)
            elif session.unsent:
                poller.modify(fd, select.EPOLLIN | select.EPOLLOUT)
    late = len(sessions)
    durations.sort()
    for session in list(sessions.values()):
        poller.unregister(session.sock.fileno())
        session.sock.close()
    poller.close()
    return {
        "sessions": done,
        "failed": failed,
        "late": late,
        "seconds": seconds,
        "rate": done / seconds,
        # how long a session took, connect to the last reply, in ms
        "p50_ms": 1000 * durations[len(durations) // 2] if durations else 0.0,
        "p99_ms": 1000 * durations[len(durations) * 99 // 100] if durations else 0.0,
        "errors": errors,
    }


async def stall(count: int) -> list[socket.socket]:
    """Open `count` sessions from 127.9.x.y whose DNSBL queries the proxy drops."""
    sockets = []
    loop = asyncio.get_running_loop()
    for number in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((f"127.9.{number // 250}.{number % 250 + 1}", 0))
        await loop.sock_connect(sock, (HOST, GATEWAY_PORT))
        sockets.append(sock)
    return sockets


def banners_received(sockets: list[socket.socket]) -> int:
    received = 0
    for sock in sockets:
        with contextlib.suppress(BlockingIOError):
            if sock.recv(4096):
                received += 1
    return received


def run_cell(procs: Processes, work: str, dns: RblDns, name: str, args: argparse.Namespace) -> dict[str, Any]:
    # the proxy costs CPU too: the stalled cell is compared with the same chain through it
    port = dns.proxy_port if name in ("proxied", "chain+stalled") else dns.port
    gw = gateway(procs, os.path.join(work, name), port, name)
    try:
        load(1.0, args.concurrency, args.message)  # warm-up: imports, first lookups
        stalled: list[socket.socket] = []
        if name == "chain+stalled":
            stalled = asyncio.run(stall(STALLED))
            time.sleep(1.0)
        before = Snapshot.take()
        result = load(args.seconds, args.concurrency, args.message)
        named = {"main": gw.pid, "load": os.getpid(), "rbldnsd": dns.proc.pid}
        for number, pid in enumerate(worker_pids(gw.pid), 1):
            named[f"worker{number}"] = pid
        result["cpu"] = compare(before, Snapshot.take(), {gw.pid}, named)
        if stalled:
            result["stalled_without_banner"] = STALLED - banners_received(stalled)
            for sock in stalled:
                sock.close()
        return result
    finally:
        gw.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=50)
    # one 10 s window per cell is at the mercy of this machine's drifts (the
    # same cell varies by 20-30 % from minute to minute): the medians of five
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--message", action="store_true", help="each session sends one 1 KB message (relayed to smtp-sink)"
    )
    parser.add_argument("--cells", default="core,chain,proxied,chain+stalled", help="which cells to run")
    args = parser.parse_args(argv)
    if shutil.which("rbldnsd") is None:
        print("rbldnsd is not installed (apt-get install rbldnsd)", file=sys.stderr)
        return 2
    procs = Processes()
    work = tempfile.mkdtemp(prefix="mailgate-filter-bench-")
    os.chmod(work, 0o755)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.cells.split(",")}
    try:
        dns = RblDns(procs, os.path.join(work, "rbldnsd"))
        if args.message:
            Sink(procs, work)
        for rep in range(args.reps):
            for name in results:
                result = run_cell(procs, os.path.join(work, f"rep{rep}"), dns, name, args)
                results[name].append(result)
                extra = (
                    f" stalled_without_banner={result['stalled_without_banner']}"
                    if "stalled_without_banner" in result
                    else ""
                )
                # each process's CPU: in % of one vCPU, and in microseconds per session
                cpu = " ".join(
                    f"{key.removesuffix('_cpu_pct_1core')}={value:.0f}%"
                    f"/{value * 1e4 / result['rate'] if result['rate'] else 0:.0f}us"
                    for key, value in result["cpu"].items()
                    if key.endswith("_cpu_pct_1core")
                )
                print(
                    f"rep {rep + 1} {name:<14} sessions/s={result['rate']:7.1f} ok={result['sessions']}"
                    f" failed={result['failed']} unfinished={result['late']} {result['errors'] or ''}{extra}"
                    f" ms p50={result['p50_ms']:.1f} p99={result['p99_ms']:.1f}"
                    f"  cpu: {cpu} steal={result['cpu']['steal_pct']}%",
                    flush=True,
                )
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    median = {name: statistics.median(r["rate"] for r in rows) for name, rows in results.items()}
    print()
    print(f"{'cell':<14} {'sessions/s (median of ' + str(args.reps) + ')':>28}")
    for name, rate in median.items():
        print(f"{name:<14} {rate:>28.1f}")
    if "core" in median and "chain" in median:
        print(f"ratio chain/core          = {median['chain'] / median['core']:.2f}  (target >= 0.80)")
        each = [
            c["rate"] / k["rate"] for k, c in zip(results["core"], results["chain"], strict=True) if k["rate"]
        ]
        print("  per repetition:          " + ", ".join(f"{ratio:.2f}" for ratio in each))
        # the ratio is the worker's CPU per session (the chain's own cost) times the share
        # of its vCPU it got (what the other processes left it)
        for name in ("core", "chain"):
            rows = [r for r in results[name] if r["rate"] and "worker1_cpu_pct_1core" in r["cpu"]]
            if rows:
                per_session = statistics.median(
                    r["cpu"]["worker1_cpu_pct_1core"] * 1e4 / r["rate"] for r in rows
                )
                share = statistics.median(r["cpu"]["worker1_cpu_pct_1core"] for r in rows)
                print(
                    f"  worker in {name:<5}          {per_session:.0f} us CPU per session,"
                    f" {share:.0f} % of a vCPU"
                )
    if "proxied" in median and "chain+stalled" in median:
        print(
            f"ratio stalled/proxied     = {median['chain+stalled'] / median['proxied']:.2f}"
            f"  (with {STALLED} sessions waiting on DNS)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
