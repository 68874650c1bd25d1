"""Resolver contract: DnsResolver (against a real NSD on loopback) and StaticResolver
answer the same zone the same way."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.delivery.resolver import DnsResolver, DnsTemporaryError, NoSuchDomain, NullMX, StaticResolver
from gateway.interfaces import IResolver

# the test zone, as data: NSD serves it from a zone file, StaticResolver from this dict
ZONE: dict[str, dict[str, list[Any]]] = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    "mx2.example.test": {"A": ["192.0.2.2"]},
    "implicit.test": {"A": ["192.0.2.3"]},
    "null.test": {"MX": [(0, ".")]},
    "v6only.test": {"AAAA": ["2001:db8::6"]},
}
ORIGIN = "test"
UNSERVED = "unserved.invalid"  # NSD refuses it (not its zone): a temporary failure


def zone_file() -> str:
    lines = [
        f"$ORIGIN {ORIGIN}.",
        "$TTL 300",
        "@ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 300",
        "@ IN NS ns.test.",
        "ns IN A 127.0.0.1",
    ]
    for name, records in ZONE.items():
        for rdtype, values in records.items():
            for value in values:
                if rdtype == "MX":
                    preference, host = value
                    lines.append(f"{name}. IN MX {preference} {host if host == '.' else host + '.'}")
                else:
                    lines.append(f"{name}. IN {rdtype} {value}")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def nsd() -> Iterator[int]:
    binary = shutil.which("nsd") or ("/usr/sbin/nsd" if os.path.exists("/usr/sbin/nsd") else None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nsd is not installed: apt-get install nsd (the resolver contract tests need it)")
        pytest.skip("nsd is not installed (apt-get install nsd)")
    directory = tempfile.mkdtemp(prefix="mailgate-nsd-")
    port = free_port()
    with open(os.path.join(directory, "test.zone"), "w") as f:
        f.write(zone_file())
    with open(os.path.join(directory, "nsd.conf"), "w") as f:
        f.write(
            f"""server:
  ip-address: 127.0.0.1@{port}
  port: {port}
  zonesdir: "{directory}"
  database: ""
  zonelistfile: "{directory}/zone.list"
  xfrdfile: "{directory}/xfrd.state"
  xfrdir: "{directory}"
  pidfile: "{directory}/nsd.pid"
  logfile: "{directory}/nsd.log"
  username: ""
  chroot: ""
  server-count: 1
  verbosity: 1
remote-control:
  control-enable: no
zone:
  name: "{ORIGIN}"
  zonefile: "test.zone"
"""
        )
    process = subprocess.Popen([binary, "-d", "-c", os.path.join(directory, "nsd.conf")])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                query = dns.message.make_query(f"{ORIGIN}.", "SOA")
                dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
                break
            except (dns.exception.Timeout, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    log_path = Path(directory) / "nsd.log"
                    log = log_path.read_text() if log_path.exists() else ""
                    pytest.fail(f"nsd did not start: {log}")
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["dns", "static"])
def resolver(request: pytest.FixtureRequest) -> Iterator[IResolver]:
    if request.param == "static":
        zone: dict[str, Any] = dict(ZONE)
        zone[UNSERVED] = DnsTemporaryError("REFUSED")
        yield StaticResolver(zone)
        return
    port = request.getfixturevalue("nsd")
    from twisted.internet import reactor

    real = DnsResolver(reactor, [f"127.0.0.1:{port}"], timeout=3.0, threads=2)
    real.start()
    try:
        yield real
    finally:
        real.stop()


def wait(deferred: Deferred[Any]) -> Any:
    """Run a Deferred from the resolver's thread pool to completion (no reactor running)."""
    from twisted.internet import reactor

    results: list[Any] = []
    deferred.addBoth(results.append)
    deadline = time.monotonic() + 10
    while not results and time.monotonic() < deadline:
        reactor.runUntilCurrent()  # type: ignore[attr-defined]
        reactor.doIteration(0.01)  # type: ignore[attr-defined]
    assert results, "no answer"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_mx_sorted_by_preference(resolver: IResolver) -> None:
    assert wait(resolver.lookup_mx("example.test")) == [(10, "mx1.example.test"), (20, "mx2.example.test")]


def test_no_mx_is_an_empty_list(resolver: IResolver) -> None:
    assert wait(resolver.lookup_mx("implicit.test")) == []


def test_null_mx(resolver: IResolver) -> None:
    with pytest.raises(NullMX):
        wait(resolver.lookup_mx("null.test"))


def test_nxdomain(resolver: IResolver) -> None:
    with pytest.raises(NoSuchDomain):
        wait(resolver.lookup_mx("nowhere.test"))
    with pytest.raises(NoSuchDomain):
        wait(resolver.lookup_addresses("nowhere.test"))


def test_refused_is_temporary(resolver: IResolver) -> None:
    with pytest.raises(DnsTemporaryError):
        wait(resolver.lookup_mx(UNSERVED))


def test_addresses_ipv4_first(resolver: IResolver) -> None:
    assert wait(resolver.lookup_addresses("mx1.example.test")) == ["192.0.2.1", "2001:db8::1"]
    assert wait(resolver.lookup_addresses("v6only.test")) == ["2001:db8::6"]
    assert wait(resolver.lookup_addresses("example.test")) == []  # the name exists, no address


def test_unreachable_nameserver_is_temporary() -> None:
    from twisted.internet import reactor

    dead = DnsResolver(reactor, [f"127.0.0.1:{free_port()}"], timeout=1.0, threads=1)
    dead.start()
    try:
        with pytest.raises(DnsTemporaryError):
            wait(dead.lookup_mx("example.test"))
    finally:
        dead.stop()


def test_nameserver_forms() -> None:
    from gateway.delivery.resolver import _nameserver

    assert (_nameserver("192.0.2.53").address, _nameserver("192.0.2.53").port) == ("192.0.2.53", 53)
    assert (_nameserver("127.0.0.1:5353").address, _nameserver("127.0.0.1:5353").port) == ("127.0.0.1", 5353)
    assert (_nameserver("[::1]:5353").address, _nameserver("[::1]:5353").port) == ("::1", 5353)
    assert _nameserver("::1").address == "::1"
