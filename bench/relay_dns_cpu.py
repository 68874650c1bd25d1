#!/usr/bin/env python3
"""CPU per new client in the main process's end of the workers' DNS relay, against rbldnsd.

    /tmp/venv/bin/python bench/relay_dns_cpu.py [--sessions 20000] [--profile]

In `bench/filter_bench.py`'s chain cell the main process asks the three DNSBL
questions of every new client for the SMTP worker, and its CPU is taken from
the vCPU the load client and rbldnsd share: the more it takes, the more often
they are woken onto the worker's vCPU instead (docs/benchmarks.rst). This
drives that code alone, in one process: `LookupRelay` (the main end) is given
the worker's lines for new clients, three zones each, at most 50 clients in
flight as in filter_bench, four lines per reactor turn; `DnsLookups` asks a real
rbldnsd on a loopback port (started here, as filter_bench does) and the
answers go back as lines. It prints the CPU time per client after a warm-up.

To count instructions instead (the same on every run), run it twice under
valgrind with different numbers of sessions; the difference over the
difference is per client, without start-up and warm-up (the kernel's part,
the sends and receives, is not counted)::

    for n in 1000 4000; do
        PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \\
            python bench/relay_dns_cpu.py --warm-up 500 --sessions $n 2>&1 | grep 'I *refs'
    done

Needs root (rbldnsd is started as nobody) and rbldnsd.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

WINDOW = 50  # clients in flight
PER_TURN = 4  # the worker's LineChannel sends four lines at once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=20000, help="clients measured")
    parser.add_argument("--warm-up", type=int, default=2000, help="clients before measuring")
    parser.add_argument("--profile", action="store_true", help="cProfile: the most called functions")
    args = parser.parse_args(argv)
    from twisted.internet import epollreactor

    epollreactor.install()  # type: ignore[no-untyped-call]
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    from filter_bench import ZONES, RblDns
    from relay_bench import Processes

    from gateway.filters._dnsquery import DnsQuerier
    from gateway.filters._dnsrelay import LookupRelay
    from gateway.filters.dns import DnsLookups

    procs = Processes()
    work = tempfile.mkdtemp(prefix="mailgate-relay-dns-")
    os.chmod(work, 0o755)
    try:
        dns = RblDns(procs, os.path.join(work, "rbldnsd"))
        lookups = DnsLookups(DnsQuerier(reactor, [("127.0.0.1", dns.port)], 60.0), reactor)
        answers: list[bytes] = []
        relay = LookupRelay(lambda: lookups, answers.append)
        total = args.warm_up + args.sessions

        # the worker's lines, made before the clock starts (a new client each: 127.2.x.y)
        def line(n: int) -> bytes:
            names = ",".join(f'"{n & 255 or 1}.{(n >> 8) & 255}.2.127.{zone}"' for zone in ZONES)
            return f"*[{n},[{names}]]".encode("ascii")

        lines = [line(n) for n in range(1, total + 1)]
        profile = cProfile.Profile()
        state = {"asked": 0, "started": 0.0, "base": 0}

        def pump() -> None:
            while state["asked"] - len(answers) < WINDOW and state["asked"] < total:
                for line in lines[state["asked"] : state["asked"] + PER_TURN]:
                    relay.asked(line)
                state["asked"] = min(state["asked"] + PER_TURN, total)
            if len(answers) >= total:
                reactor.stop()
                return
            if not state["started"] and len(answers) >= args.warm_up:
                state["started"], state["base"] = time.process_time(), len(answers)
                if args.profile:
                    profile.enable()
            reactor.callLater(0, pump)

        reactor.callLater(0, pump)
        reactor.run()
        profile.disable()
        measured = len(answers) - state["base"]
        elapsed = time.process_time() - state["started"]
        print(f"main's end of the DNS relay: {elapsed / measured * 1e6:.1f} µs CPU per client ({measured})")
        if args.profile:
            stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
            rows = sorted(
                (
                    (calls / measured, f"{os.path.basename(path)}:{line}:{name}")
                    for (path, line, name), (_, calls, *_) in stats.items()
                ),
                reverse=True,
            )
            print(f"calls per client: {sum(calls for calls, _ in rows):.1f}")
            for calls, where in rows[:40]:
                print(f"{calls:7.2f}  {where}")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
