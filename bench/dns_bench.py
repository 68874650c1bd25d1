#!/usr/bin/env python3
"""DNSBL lookups per second, and CPU per lookup, of the filters' DNS client against rbldnsd.

    /tmp/venv/bin/python bench/dns_bench.py [--seconds 6] [--concurrency 100] [--reps 3]

rbldnsd serves three ip4set zones on loopback (as filter_bench.py's chain uses).
The client is `DnsLists.score` over `DnsLookups`, as the dnsbl filter calls it:
each "session" scores a new address (127.2.x.y) in the three zones, so every
lookup is a real question (no cache hits); `concurrency` sessions are in flight
at once. It prints lookups/s and the client's CPU microseconds per lookup (the
figure to compare: the wall rate also depends on rbldnsd and the other load on
the machine). Needs root (rbldnsd runs as nobody) and rbldnsd.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from gateway.config import DnsConfig
from gateway.filters._dnslists import DnsLists, parse_site
from gateway.filters.dns import DnsLookups

ZONES = ("z1.bench.test", "z2.bench.test", "z3.bench.test")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_rbldnsd(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    os.chmod(directory, 0o755)
    for number, listed in enumerate(("127.2.3.0/24", "127.2.4.0/24", "127.5.0.0/16"), 1):
        with open(os.path.join(directory, f"z{number}"), "w") as handle:
            handle.write(f"{listed}\n")
    port = free_udp_port()
    zones = [f"{zone}:ip4set:z{n}" for n, zone in enumerate(ZONES, 1)]
    command = ["rbldnsd", "-n", "-f", "-u", "nobody", "-b", f"127.0.0.1/{port}", "-r", directory, *zones]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return process, port


class _Owner:
    name = "dnsbl"


async def run(lists: DnsLists, seconds: float, concurrency: int, start: int) -> tuple[int, float, float, int]:
    """(lookups, wall seconds, CPU seconds, listed) of `concurrency` sessions for `seconds`."""
    counter = [start]
    lookups = [0]
    listed = [0]
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop_at:
            number = counter[0]
            counter[0] += 1
            name = f"{number & 255}.{(number >> 8) & 255}.2.127"
            score = await lists.score(name)
            lookups[0] += len(ZONES)
            listed[0] += bool(score.listings)

    wall, cpu = time.monotonic(), time.process_time()
    workers = [ensureDeferred(worker()) for _ in range(concurrency)]
    for deferred in workers:
        await deferred
    return lookups[0], time.monotonic() - wall, time.process_time() - cpu, listed[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    if shutil.which("rbldnsd") is None:
        print("rbldnsd is not installed (apt-get install rbldnsd)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dns-bench-") as directory:
        process, port = start_rbldnsd(directory)
        try:
            dns = DnsLookups.from_config(DnsConfig(nameservers=(f"127.0.0.1:{port}",), timeout=5.0), reactor)
            dns.cache_size = 1000  # every name is new anyway: keep the cache out of the figures
            lists = DnsLists([parse_site(zone) for zone in ZONES], dns, Logger(), txt=False, owner=_Owner())
            results: list[tuple[float, float]] = []

            async def body() -> None:
                await run(lists, 1.0, args.concurrency, 0)  # warm up
                for rep in range(args.reps):
                    count, wall, cpu, listed = await run(
                        lists, args.seconds, args.concurrency, (rep + 1) << 16
                    )
                    rate, per_lookup = count / wall, cpu / count * 1e6
                    results.append((rate, per_lookup))
                    print(
                        f"rep {rep + 1}: {count} lookups, {rate:8.0f} lookups/s, "
                        f"{per_lookup:6.1f} us CPU/lookup ({listed} sessions listed)"
                    )

            done: Deferred[Any] = ensureDeferred(body())
            done.addErrback(lambda failure: failure.printTraceback())
            done.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
            reactor.run()  # type: ignore[attr-defined]
            if results:
                print(
                    f"median: {statistics.median(r for r, _ in results):8.0f} lookups/s, "
                    f"{statistics.median(c for _, c in results):6.1f} us CPU/lookup"
                )
        finally:
            process.terminate()
            process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
