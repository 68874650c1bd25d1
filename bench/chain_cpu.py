#!/usr/bin/env python3
"""CPU per pre-DATA session in the SMTP worker's own code, with and without the filter chain.

    /tmp/venv/bin/python bench/chain_cpu.py [--cells core,defaults,chain] [--sessions 10000] [--rounds 5]

`bench/filter_bench.py` measures the whole gateway over TCP, where the kernel,
the other processes on the two vCPUs and the scheduler move the numbers by
10-20 % between runs. This one drives the worker's code in one process with
no sockets, to see what a change to the chain costs in Python:

- the reception and the SMTP server are built from the same configuration as
  filter_bench's cells (core: no filters; defaults: lists, limits, helo;
  chain: those and protocol, dnsbl with three zones, recipients);
- each session is a `SmtpServerProtocol` on an in-memory transport: connect,
  EHLO, then MAIL, RCPT and QUIT pipelined, from a new client address;
- the dnsbl filter's questions go through the worker's end of the DNS relay
  (`RelayedLookups`: the line out, the answer line parsed), answered at once
  with "not listed" instead of by the main process; one more session waits
  for its answer all the while, as some always does in a loaded worker
  (`hold_one`);
- log events go nowhere (the worker's real log lines cost the same in every
  cell).

It prints the CPU time (`time.process_time`) per session, min and median of
the rounds, after a warm-up. Compare cells, or one cell across commits (run
the script of one tree with PYTHONPATH pointing at the other), alternating
runs: the machine drifts.

`--inbound lists,limits` runs one cell ("custom") with the chain's settings
and only those filters. To count instructions instead of timing (the same
count on every run, however busy the machine), run one cell twice under
valgrind with different numbers of sessions; the difference over the
difference in sessions is per session, without start-up and warm-up::

    for n in 200 1200; do
        valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
            python bench/chain_cpu.py --cells chain --rounds 1 --sessions $n 2>&1 | grep 'I *refs'
    done
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


CHAIN_INBOUND = 'inbound = ["lists", "limits", "protocol", "helo", "dnsbl", "recipients"]'


def build(cell: str, state: str) -> tuple[object, object, list[bytes]]:
    """The worker's SMTP factory for `cell`, its relayed DNS, and the relay's outgoing lines."""
    from filter_bench import CELL_CONFIG, CHAIN_CONFIG, DNS_CONFIG, GATEWAY_PORT
    from relay_bench import gateway_config
    from twisted.internet import reactor

    from gateway import config as configuration
    from gateway.filters._dnsrelay import RelayedLookups
    from gateway.queue.spool import DirectorySpool
    from gateway.tap import make_reception, smtp_factory_maker

    text = gateway_config(GATEWAY_PORT, inbound=True, extra=DNS_CONFIG.format(dns_port=53))
    text += CELL_CONFIG.get(cell, CHAIN_CONFIG)
    path = os.path.join(state, "mailgate.toml")
    with open(path, "w") as handle:
        handle.write(text.replace("{state}", state))
    cfg = configuration.load(path)
    spool = DirectorySpool(
        cfg.spool_dir, reactor=reactor, hash_levels=cfg.gateway.hash_levels, id_tag=1, remember_commits=False
    )
    lines: list[bytes] = []
    dns = RelayedLookups(lines.append)
    reception = make_reception(cfg, spool, reactor, dns=dns)
    make_factory, _services = smtp_factory_maker(cfg, reception, reactor)
    return make_factory(cfg.smtp.listeners[0]), dns, lines


def answer(dns: object, lines: list[bytes]) -> None:
    """Answer every question sent so far: nothing listed, as the main process writes it.

    Read by slicing, not with json: what this costs is the harness's, not the
    worker's (json here added some 30,000 instructions to a chain session).
    """
    while lines:
        line = lines.pop(0)
        number = line[2 : line.index(b",")]
        if line[:1] == b"*":
            count = line.count(b'","') + 1  # the names of one question: ["a","b","c"]
            dns.answered(b"![" + number + b",[" + b",".join([b"[[],true]"] * count) + b"]]")  # type: ignore[attr-defined]
        else:
            dns.answered(b"![" + number + b",[],false]")  # type: ignore[attr-defined]


def session(factory: object, dns: object, lines: list[bytes], number: int) -> bool:
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    peer = IPv4Address("TCP", f"127.2.{(number >> 8) & 255}.{number & 255 or 1}", 40000 + number % 20000)
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 2537), peerAddress=peer)
    protocol = factory.buildProtocol(peer)  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    answer(dns, lines)
    protocol.dataReceived(b"EHLO client.bench.test\r\n")
    answer(dns, lines)
    protocol.dataReceived(
        b"MAIL FROM:<sender@client.bench.test>\r\nRCPT TO:<rcpt@dest.bench.test>\r\nQUIT\r\n"
    )
    answer(dns, lines)
    protocol.connectionLost(Failure(ConnectionDone()))
    replies = [line[:3] for line in transport.value().split(b"\r\n") if line[3:4] == b" "]
    return replies == [b"220", b"250", b"250", b"250", b"221"]


def hold_one(factory: object, lines: list[bytes]) -> object:
    """A session left waiting for its DNS answer, for the whole run.

    In a worker under load some session always waits for DNS, so the chain's
    one deadline timer stays set (`chain._Deadlines`); one session at a time
    would empty its queue and set the timer anew for every session, a cost the
    worker does not have. Returns the session (keep it referenced).
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    peer = IPv4Address("TCP", "127.3.0.1", 39999)
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 2537), peerAddress=peer)
    protocol = factory.buildProtocol(peer)  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    lines.clear()  # its question is never answered
    return protocol


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", default="core,defaults,chain")
    parser.add_argument("--sessions", type=int, default=10000, help="sessions per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inbound", help="only these filters (comma-separated), as the cell 'custom'")
    args = parser.parse_args(argv)
    os.environ["MAILGATE_WORKER"] = "1"  # the worker's own anvil, as in an SMTP worker
    from twisted.internet import epollreactor

    epollreactor.install()  # type: ignore[no-untyped-call]
    from twisted.logger import globalLogBeginner

    from gateway import collector

    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    cells = args.cells.split(",")
    if args.inbound is not None:
        from filter_bench import CELL_CONFIG, CHAIN_CONFIG

        if CHAIN_INBOUND not in CHAIN_CONFIG:
            parser.error(
                "filter_bench.CHAIN_CONFIG has no longer the chain's inbound line: update CHAIN_INBOUND"
            )
        chosen = [name for name in args.inbound.split(",") if name]
        CELL_CONFIG["custom"] = CHAIN_CONFIG.replace(CHAIN_INBOUND, f"inbound = {json.dumps(chosen)}")
        cells = ["custom"]
    built = {}
    for cell in cells:
        state = tempfile.mkdtemp(prefix=f"mailgate-chain-cpu-{cell}-")
        built[cell] = build(cell, state)
    collector.settle()  # as the worker does once it has started
    number = 0
    for cell in cells:
        factory, dns, lines = built[cell]
        held = hold_one(factory, lines)  # noqa: F841 - it waits as long as we run
        for _ in range(2000):  # warm-up
            number += 1
            if not session(factory, dns, lines, number):
                print(f"{cell}: a session did not go as it should", file=sys.stderr)
                return 1
        rounds = []
        for _ in range(args.rounds):
            started = time.process_time()
            ok = 0
            for _ in range(args.sessions):
                number += 1
                ok += session(factory, dns, lines, number)
            rounds.append((time.process_time() - started) / args.sessions * 1e6)
            if ok != args.sessions:
                print(f"{cell}: {args.sessions - ok} sessions did not go as they should", file=sys.stderr)
                return 1
        print(
            f"{cell:<9} CPU per session: min {min(rounds):6.1f} µs,"
            f" median {statistics.median(rounds):6.1f} µs  ({args.rounds} rounds of {args.sessions})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
