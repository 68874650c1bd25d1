"""How fast the "lists" filter loads and looks up large lists.

    python bench/lists_bench.py [N ...]     (default: 1000 10000 100000)

For each N it writes N random IPv4 networks (/16 to /32), N/10 IPv6 networks
and N sender domains to list files in a temporary directory, builds the filter
from them, reloads it, then times 100,000 connect checks from random clients
and 100,000 MAIL checks of random senders (about 1 in 100 under a listed
domain). A lookup should cost the same whatever N is.
"""

from __future__ import annotations

import ipaddress
import random
import sys
import tempfile
import time
from pathlib import Path

from gateway.filters import Request
from gateway.filters._listfile import Kind
from gateway.filters.lists import Lists
from gateway.model import Action, Direction, Envelope, Session, Stage

CHECKS = 100_000


def write_lists(directory: Path, count: int, rng: random.Random) -> tuple[Path, Path]:
    clients, senders = directory / "clients.txt", directory / "senders.txt"
    with clients.open("w") as handle:
        for _ in range(count):
            length = rng.choice([16, 20, 24, 24, 24, 32, 32])
            handle.write(f"{ipaddress.IPv4Network((rng.getrandbits(32), length), strict=False)}\n")
        for _ in range(count // 10):
            length = rng.choice([32, 48, 64, 128])
            handle.write(f"{ipaddress.IPv6Network((rng.getrandbits(128), length), strict=False)}\n")
    with senders.open("w") as handle:
        for number in range(count):
            handle.write(f"@spam{number}.example{number % 50}.test\n")
    return clients, senders


def run(count: int) -> None:
    rng = random.Random(count)
    with tempfile.TemporaryDirectory() as directory:
        clients, senders = write_lists(Path(directory), count, rng)
        started = time.perf_counter()
        lists = Lists({}, {(Kind.CLIENTS, False): (str(clients),), (Kind.SENDERS, False): (str(senders),)})
        loaded = time.perf_counter() - started
        started = time.perf_counter()
        lists.reload()
        reloaded = time.perf_counter() - started
    connects = [
        Request(Stage.CONNECT, Direction.INBOUND, Session(str(ipaddress.IPv4Address(rng.getrandbits(32)))))
        for _ in range(CHECKS)
    ]
    mails = [
        Request(
            Stage.MAIL,
            Direction.INBOUND,
            Session("192.0.2.1"),
            Envelope(f"user@mx.spam{rng.randrange(2 * count)}.example{rng.randrange(50)}.test", ()),
        )
        for _ in range(CHECKS)
    ]
    timing = f"load {loaded * 1000:.0f} ms, reload {reloaded * 1000:.0f} ms"
    print(f"N={count}: {lists.tables.entries} entries; {timing}")
    for label, requests in (("connect", connects), ("mail", mails)):
        started = time.perf_counter()
        blocked = sum(lists.check(r).action is Action.REJECT for r in requests)  # type: ignore[union-attr]
        each = (time.perf_counter() - started) / len(requests)
        print(f"  {label} check: {each * 1e6:.2f} us ({blocked} of {len(requests)} blocked)")


if __name__ == "__main__":
    for argument in sys.argv[1:] or ["1000", "10000", "100000"]:
        run(int(argument))
