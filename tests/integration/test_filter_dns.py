"""DnsLookups against real name servers on loopback: the DNS contract against NSD; TTL and
negative caching, NXDOMAIN and timeouts against rbldnsd and a silent port; and a thousand
lookups waiting on a slow server without holding up anything else."""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SkipTest, TestCase

from gateway.config import DnsConfig
from gateway.delivery.resolver import DnsTemporaryError, NoSuchDomain
from gateway.filters._dnsquery import SOCKETS_PER_FAMILY
from gateway.filters.dns import DnsLookups
from tests.integration import turning
from tests.integration.peer_rbldnsd import Rbldnsd, SilentUdpServer
from tests.integration.peers import NsdServer, find_program, in_ci, require_program, require_root
from tests.unit.test_filter_dns import ZONE, DnsLookupsContract
from tests.unit.zone_server import Zone, ZoneServer

pytestmark = pytest.mark.integration


def _zone_line(name: str, rdtype: str, value: Any) -> str:
    if rdtype == "MX":
        preference, host = value
        return f"{name}. IN MX {preference} {host if host == '.' else host + '.'}"
    if rdtype == "TXT":
        return f'{name}. IN TXT "{value}"'
    if rdtype == "PTR":
        return f"{name}. IN PTR {value}."
    return f"{name}. IN {rdtype} {value}"


def nsd_zones(records: dict[str, Any]) -> dict[str, str]:
    """ZONE as NSD zones: the names under "test", the PTRs under their reverse zones."""
    zones: dict[str, list[str]] = {"test": [], "192.in-addr.arpa": [], "8.b.d.0.1.0.0.2.ip6.arpa": []}
    for name, entry in records.items():
        if isinstance(entry, Exception):
            continue  # NSD cannot fail on purpose; names outside its zones are REFUSED instead
        try:
            owner = ipaddress.ip_address(name).reverse_pointer
        except ValueError:
            owner = name
        origin = next(zone for zone in zones if owner.endswith("." + zone))
        zones[origin].extend(
            _zone_line(owner, rdtype, value) for rdtype, values in entry.items() for value in values
        )
    return {origin: "\n".join(lines) for origin, lines in zones.items()}


def _require_or_skip(program: str) -> None:
    """Trial test cases cannot use pytest's skip: raise trial's (or fail, with CI set)."""
    if find_program(program) is None:
        if in_ci():
            raise AssertionError(f"{program} is not installed (CI is set; run .ci/install-test-deps)")
        raise SkipTest(f"{program} is not installed (run .ci/install-test-deps)")


class DnsLookupsAgainstNsdContractTests(DnsLookupsContract, TestCase):
    """The contract of tests/unit/test_filter_dns.py, the real DnsLookups asking a real NSD."""

    broken = "broken.invalid"  # not NSD's zone: REFUSED

    def setUp(self) -> None:
        _require_or_skip("nsd")
        self.nsd = NsdServer(nsd_zones(ZONE))
        self.nsd.start()
        self.addCleanup(self.nsd.stop)
        self.lookups = DnsLookups.from_config(
            DnsConfig(nameservers=(self.nsd.nameserver,), timeout=3.0), reactor
        )
        self.addCleanup(self.lookups.close)


# -- rbldnsd -----------------------------------------------------------------------------------


def wait(deferred: Deferred[Any], timeout: float = 15.0) -> Any:
    """`turning.wait` with this module's shorter patience."""
    return turning.wait(deferred, timeout)


def lookups_for(*nameservers: str, timeout: float = 3.0) -> DnsLookups:
    return DnsLookups.from_config(DnsConfig(nameservers=nameservers, timeout=timeout), reactor)


@pytest.fixture
def rbldnsd() -> Iterator[Rbldnsd]:
    require_program("rbldnsd")
    require_root()
    peer = Rbldnsd(
        {
            "bl.test": ("ip4set", "$SOA 3600 ns.bl.test. hostmaster.bl.test. 1 3600 600 86400 2\n"
                                   ":127.0.0.2:Listed: see https://bl.test/$\n127.0.0.2\n"),
            "gen.test": ("generic", "mx MX 10 mail.gen.test\nmail A 192.0.2.10\nnote TXT \"a note\"\n"),
        },
        ttl=2,
    )  # fmt: skip
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture
def lookups(rbldnsd: Rbldnsd) -> Iterator[DnsLookups]:
    found = lookups_for(rbldnsd.nameserver)
    yield found
    wait(found.close())


def test_rbldnsd_answers_a_txt_mx_and_nxdomain(rbldnsd: Rbldnsd, lookups: DnsLookups) -> None:
    assert wait(lookups.a("2.0.0.127.bl.test")) == ["127.0.0.2"]
    assert wait(lookups.txt("2.0.0.127.bl.test")) == ["Listed: see https://bl.test/127.0.0.2"]
    assert wait(lookups.a("3.0.0.127.bl.test")) == []
    assert wait(lookups.mx("mx.gen.test")) == [(10, "mail.gen.test")]
    assert wait(lookups.addresses("mail.gen.test")) == ["192.0.2.10"]
    with pytest.raises(NoSuchDomain):
        wait(lookups.addresses("missing.gen.test"))
    with pytest.raises(DnsTemporaryError):  # rbldnsd refuses names outside its zones
        wait(lookups.addresses("elsewhere.example"))


def test_answers_are_cached_for_their_ttl(rbldnsd: Rbldnsd, lookups: DnsLookups) -> None:
    assert wait(lookups.a("2.0.0.127.bl.test")) == ["127.0.0.2"]
    rbldnsd.update("bl.test", ":127.0.0.2:Listed\n127.0.0.9\n")  # delisted
    assert wait(lookups.a("2.0.0.127.bl.test")) == ["127.0.0.2"]  # from the cache (TTL 2 s)
    asked = [query for query in rbldnsd.queries() if query[0] == "2.0.0.127.bl.test"]
    assert len(asked) == 1
    time.sleep(2.2)
    assert wait(lookups.a("2.0.0.127.bl.test")) == []


def test_nxdomain_is_cached_for_the_soa_minimum(rbldnsd: Rbldnsd, lookups: DnsLookups) -> None:
    assert wait(lookups.a("9.0.0.127.bl.test")) == []
    rbldnsd.update("bl.test", "$SOA 3600 ns.bl.test. hostmaster.bl.test. 2 3600 600 86400 2\n127.0.0.9\n")
    assert wait(lookups.a("9.0.0.127.bl.test")) == []  # the negative answer is kept for 2 s
    time.sleep(2.2)
    assert wait(lookups.a("9.0.0.127.bl.test")) == ["127.0.0.2"]


def test_a_silent_name_server_is_a_temporary_error_at_the_timeout() -> None:
    silent = SilentUdpServer()
    lookups = lookups_for(silent.nameserver, timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError, match="no answer within 1 s"):
            wait(lookups.a("2.0.0.127.bl.test"))
        assert 0.9 <= time.monotonic() - started < 3.0
    finally:
        wait(lookups.close())
        silent.close()


# -- a slow server -----------------------------------------------------------------------------


class SlowServerTests(TestCase):
    """1,000 lookups wait on a slow server; the reactor and other lookups go on meanwhile."""

    timeout = 60

    def setUp(self) -> None:
        records = {f"{n}.slow.test": {"A": ["127.0.0.2"]} for n in range(1000)}
        records["fast.test"] = {"A": ["192.0.2.1"]}
        self.server = ZoneServer(
            Zone(records), reactor, delay=lambda name: 1.5 if name.endswith(".slow.test") else 0.0
        )
        self.lookups = lookups_for(self.server.listen(), timeout=10.0)
        self.addCleanup(self.server.stop)
        self.addCleanup(self.lookups.close)

    async def test_a_thousand_slow_lookups_do_not_block_the_reactor_or_each_other(self) -> None:
        ticks: list[float] = []
        ticker = LoopingCall(lambda: ticks.append(time.monotonic()))
        ticker.clock = reactor
        ticker.start(0.02)
        started = time.monotonic()
        slow = [self.lookups.a(f"{n}.slow.test") for n in range(1000)]
        fast = await self.lookups.a("fast.test")
        fast_took = time.monotonic() - started
        results = await DeferredList(slow, consumeErrors=True)
        slow_took = time.monotonic() - started
        ticker.stop()
        assert fast == ["192.0.2.1"]
        assert fast_took < 1.0, f"a fast lookup waited {fast_took:.2f} s behind the slow ones"
        assert all(success and answer == ["127.0.0.2"] for success, answer in results)
        assert slow_took < 6.0, f"1,000 lookups of 1.5 s each took {slow_took:.1f} s: they were serialised"
        gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
        assert max(gaps) < 0.5, f"the reactor was blocked for {max(gaps):.2f} s"
        assert self.lookups.querier.open_sockets <= 2 * SOCKETS_PER_FAMILY
