"""DNS for filters: one contract for DnsLookups (over UDP to a name server on loopback) and its
fake StaticDnsLookups; then the real one's caching, sharing, retransmission and spoof checks on
a fake network driven by a Clock."""

from __future__ import annotations

from typing import Any

import dns.flags
import dns.message
import dns.rcode
import pytest
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway.config import ConfigError, DnsConfig
from gateway.delivery.resolver import DnsTemporaryError, NoSuchDomain, NullMX
from gateway.filters._dnsquery import SOCKETS_PER_FAMILY, DnsQuerier, parse_nameserver
from gateway.filters.dns import DnsLookups, StaticDnsLookups, reverse_name
from tests.unit.zone_server import Zone, ZoneServer

# The contract zone: the fake answers from this dict, the ZoneServer serves it over UDP.
ZONE: dict[str, Any] = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")], "TXT": ["v=spf1 -all"]},
    "mx1.example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    "mx2.example.test": {"A": ["192.0.2.2"]},
    "v6only.test": {"AAAA": ["2001:db8::6"]},
    "implicit.test": {"A": ["192.0.2.3"]},
    "null.test": {"MX": [(0, ".")]},
    "192.0.2.1": {"PTR": ["mx1.example.test"]},
    "2001:db8::1": {"PTR": ["MX1.Example.Test"]},
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["Listed: see https://bl.test/127.0.0.2"]},
    "3.0.0.127.bl.test": {"A": ["127.0.0.4", "127.0.0.10"]},
    "bl.test": {"TXT": ["a test list"]},
    "broken.test": DnsTemporaryError("SERVFAIL"),
}


def result_of(deferred: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired; raises its failure."""
    found: list[Any] = []
    deferred.addBoth(found.append)
    assert found, "the Deferred has not fired"
    if isinstance(found[0], Failure):
        found[0].raiseException()
    return found[0]


class DnsLookupsContract:
    """What every DnsLookups must do; subclasses say how to build one over ZONE."""

    lookups: Any
    broken = "broken.test"  # a name whose server fails (SERVFAIL, REFUSED)

    async def test_dnsbl_a_lookup_listed(self) -> None:
        assert await self.lookups.a("2.0.0.127.bl.test") == ["127.0.0.2"]
        assert sorted(await self.lookups.a("3.0.0.127.bl.test")) == ["127.0.0.10", "127.0.0.4"]

    async def test_dnsbl_a_lookup_nxdomain_and_nodata_are_not_listed(self) -> None:
        assert await self.lookups.a("9.0.0.127.bl.test") == []
        assert await self.lookups.a("bl.test") == []  # exists, no A record

    async def test_dnsbl_a_lookup_servfail_is_temporary(self) -> None:
        with pytest.raises(DnsTemporaryError):
            await self.lookups.a(self.broken)

    async def test_a_each_gives_every_name_its_records_or_its_failure_in_order(self) -> None:
        names = ["3.0.0.127.bl.test", "9.0.0.127.bl.test", self.broken, "2.0.0.127.bl.test"]
        results = await self.lookups.a_each(names)
        assert sorted(results[0]) == ["127.0.0.10", "127.0.0.4"]
        assert results[1] == []  # not listed
        assert isinstance(results[2], Failure) and results[2].check(DnsTemporaryError)
        assert results[3] == ["127.0.0.2"]
        assert await self.lookups.a_each([]) == []

    async def test_addresses_ipv4_first(self) -> None:
        assert await self.lookups.addresses("mx1.example.test") == ["192.0.2.1", "2001:db8::1"]
        assert await self.lookups.addresses("v6only.test") == ["2001:db8::6"]

    async def test_addresses_of_a_name_without_any_is_empty(self) -> None:
        assert await self.lookups.addresses("example.test") == []

    async def test_addresses_nxdomain(self) -> None:
        with pytest.raises(NoSuchDomain):
            await self.lookups.addresses("nowhere.test")

    async def test_addresses_servfail_is_temporary(self) -> None:
        with pytest.raises(DnsTemporaryError):
            await self.lookups.addresses(self.broken)

    async def test_names_ignore_case_and_trailing_dot(self) -> None:
        assert await self.lookups.addresses("MX2.Example.TEST.") == ["192.0.2.2"]

    async def test_txt(self) -> None:
        assert await self.lookups.txt("2.0.0.127.bl.test") == ["Listed: see https://bl.test/127.0.0.2"]
        assert await self.lookups.txt("mx1.example.test") == []
        with pytest.raises(NoSuchDomain):
            await self.lookups.txt("9.0.0.127.bl.test")

    async def test_ptr_ipv4_and_ipv6_lower_case_without_dot(self) -> None:
        assert await self.lookups.ptr("192.0.2.1") == ["mx1.example.test"]
        assert await self.lookups.ptr("2001:db8::1") == ["mx1.example.test"]
        assert await self.lookups.ptr("::ffff:192.0.2.1") == ["mx1.example.test"]

    async def test_ptr_missing(self) -> None:
        with pytest.raises(NoSuchDomain):
            await self.lookups.ptr("192.0.2.99")
        with pytest.raises(NoSuchDomain):
            await self.lookups.ptr("not-an-address")

    async def test_mx_sorted_empty_null_and_missing(self) -> None:
        assert await self.lookups.mx("example.test") == [(10, "mx1.example.test"), (20, "mx2.example.test")]
        assert await self.lookups.mx("implicit.test") == []
        with pytest.raises(NullMX):
            await self.lookups.mx("null.test")
        with pytest.raises(NoSuchDomain):
            await self.lookups.mx("nowhere.test")

    async def test_strings_that_are_no_dns_names_do_not_exist(self) -> None:
        for bad in ("a..example.test", "x" * 64 + ".example.test", ""):
            with pytest.raises(NoSuchDomain):
                await self.lookups.addresses(bad)
            assert await self.lookups.a(bad) == []


class StaticDnsLookupsContractTests(DnsLookupsContract, TestCase):
    def setUp(self) -> None:
        self.lookups = StaticDnsLookups(ZONE)


class DnsLookupsOverUdpContractTests(DnsLookupsContract, TestCase):
    """The real DnsLookups, its questions on real sockets to a name server on 127.0.0.1."""

    def setUp(self) -> None:
        self.server = ZoneServer(Zone(ZONE), reactor)
        nameserver = self.server.listen()
        self.lookups = DnsLookups.from_config(DnsConfig(nameservers=(nameserver,), timeout=3.0), reactor)
        self.addCleanup(self.server.stop)
        self.addCleanup(self.lookups.close)

    async def test_a_truncated_answer_is_asked_again_over_tcp(self) -> None:
        self.server.zone.truncate = {"mx1.example.test"}
        assert await self.lookups.addresses("mx1.example.test") == ["192.0.2.1", "2001:db8::1"]


# -- the real one on a fake network -----------------------------------------------------------


class FakeUdpPort:
    def __init__(self, network: FakeNetwork, protocol: Any) -> None:
        self.network = network
        self.protocol = protocol
        self.closed = False

    def write(self, datagram: bytes, addr: tuple[str, int]) -> None:
        assert not self.closed, "written after stopListening"
        self.network.written.append((self, datagram, addr))

    def stopListening(self) -> None:
        self.closed = True


class FakeConnector:
    disconnected = False

    def disconnect(self) -> None:
        self.disconnected = True


class FakeNetwork(Clock):
    """A Clock whose UDP sockets record what is sent; the test plays the name servers."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakeUdpPort] = []
        self.written: list[tuple[FakeUdpPort, bytes, tuple[str, int]]] = []  # in the order sent
        self.tcp: list[tuple[str, int, Any, float]] = []
        self.delivered = 0

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUdpPort:
        fake = FakeUdpPort(self, protocol)
        protocol.makeConnection(fake)
        self.ports.append(fake)
        return fake

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> FakeConnector:
        self.tcp.append((host, port, factory, timeout))
        return FakeConnector()

    def sent(self) -> list[tuple[FakeUdpPort, dns.message.Message, tuple[str, int]]]:
        return [(port, dns.message.from_wire(datagram), addr) for port, datagram, addr in self.written]

    def answer(self, zone: Zone, *, source: tuple[str, int] | None = None, tamper: Any = None) -> None:
        """Answer every datagram sent since the last call, from where it went (or `source`)."""
        pending = self.written[self.delivered :]
        self.delivered += len(pending)
        for port, datagram, addr in pending:
            query = dns.message.from_wire(datagram)
            response = zone.answer(query)
            if tamper is not None:
                tamper(response)
            port.protocol.datagramReceived(response.to_wire(), source or addr)


NS1, NS2 = ("192.0.2.53", 53), ("192.0.2.54", 5353)


class CachingAndSharingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.network = FakeNetwork()
        self.zone = Zone(ZONE, ttl=300, negative_ttl=60, ttls={"mx2.example.test": 5})
        self.lookups = DnsLookups(DnsQuerier(self.network, [NS1], timeout=5.0), self.network)

    def test_an_answer_is_cached_for_its_ttl(self) -> None:
        first = self.lookups.a("mx2.example.test")
        self.network.answer(self.zone)
        assert result_of(first) == ["192.0.2.2"]
        self.network.advance(4)
        assert result_of(self.lookups.a("mx2.example.test")) == ["192.0.2.2"]  # answered from the cache
        assert len(self.network.sent()) == 1
        self.network.advance(2)  # the 5-second TTL has run out
        again = self.lookups.a("mx2.example.test")
        assert len(self.network.sent()) == 2
        self.network.answer(self.zone)
        assert result_of(again) == ["192.0.2.2"]

    def test_stats_count_questions_cache_hits_and_what_is_cached(self) -> None:
        assert self.lookups.stats() == {"questions": 0, "cache_hits": 0, "cached": 0, "in_flight": 0}
        first = self.lookups.a("mx2.example.test")
        self.lookups.a("mx1.example.test")
        assert self.lookups.stats()["in_flight"] == 2
        self.network.answer(self.zone)
        result_of(first)
        result_of(self.lookups.a("mx2.example.test"))
        assert self.lookups.stats() == {"questions": 2, "cache_hits": 1, "cached": 2, "in_flight": 0}

    def test_nxdomain_is_cached_for_the_soa_minimum(self) -> None:
        first = self.lookups.a("9.0.0.127.bl.test")
        self.network.answer(self.zone)
        assert result_of(first) == []
        self.network.advance(59)
        assert result_of(self.lookups.a("9.0.0.127.bl.test")) == []
        assert len(self.network.sent()) == 1
        self.network.advance(2)
        self.lookups.a("9.0.0.127.bl.test")
        assert len(self.network.sent()) == 2

    def test_a_negative_answer_without_soa_is_cached_briefly(self) -> None:
        zone = Zone(ZONE, soa=False)
        lookups = DnsLookups(DnsQuerier(self.network, [NS1], timeout=5.0), self.network, negative_ttl=10)
        first = lookups.a("9.0.0.127.bl.test")
        self.network.answer(zone)
        assert result_of(first) == []
        self.network.advance(9)
        lookups.a("9.0.0.127.bl.test")
        assert len(self.network.sent()) == 1
        self.network.advance(2)
        lookups.a("9.0.0.127.bl.test")
        assert len(self.network.sent()) == 2

    def test_a_temporary_failure_is_not_cached(self) -> None:
        first = self.lookups.a("broken.test")
        self.network.answer(self.zone)
        with pytest.raises(DnsTemporaryError):
            result_of(first)
        self.lookups.a("broken.test")
        assert len(self.network.sent()) == 2

    def test_concurrent_lookups_of_one_name_share_one_question(self) -> None:
        waiting = [self.lookups.a("2.0.0.127.bl.test") for _ in range(50)]
        assert len(self.network.sent()) == 1
        self.network.answer(self.zone)
        assert {tuple(result_of(d)) for d in waiting} == {("127.0.0.2",)}

    def test_a_cancelled_waiter_does_not_hurt_the_others(self) -> None:
        impatient = self.lookups.a("2.0.0.127.bl.test")
        patient = self.lookups.a("2.0.0.127.bl.test")
        impatient.cancel()  # the chain runner's timeout for one filter
        self.failureResultOf(impatient, CancelledError)
        self.network.answer(self.zone)
        assert result_of(patient) == ["127.0.0.2"]

    def test_the_cache_is_bounded_least_recently_used_first(self) -> None:
        lookups = DnsLookups(DnsQuerier(self.network, [NS1], timeout=5.0), self.network, cache_size=2)
        for name in ("mx1.example.test", "mx2.example.test"):
            lookups.a(name)
            self.network.answer(self.zone)
        lookups.a("mx1.example.test")  # used again: now the most recent
        lookups.a("implicit.test")
        self.network.answer(self.zone)
        assert len(self.network.sent()) == 3
        lookups.a("mx1.example.test")
        assert len(self.network.sent()) == 3  # still cached
        lookups.a("mx2.example.test")
        assert len(self.network.sent()) == 4  # evicted


class QuerierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.network = FakeNetwork()
        self.zone = Zone(ZONE)

    def lookups(self, *servers: tuple[str, int], timeout: float = 5.0) -> DnsLookups:
        return DnsLookups(DnsQuerier(self.network, list(servers) or [NS1], timeout=timeout), self.network)

    def test_silence_is_retried_on_the_next_server_then_a_temporary_error_at_the_deadline(self) -> None:
        lookups = self.lookups(NS1, NS2, timeout=5.0)
        answer = lookups.a("2.0.0.127.bl.test")
        times = [0.0]
        for _ in range(24):
            self.network.advance(0.25)
            times.extend([self.network.seconds()] * (len(self.network.sent()) - len(times)))
        servers = {addr for _, _, addr in self.network.sent()}
        assert servers == {NS1, NS2}
        assert [round(t, 1) for t in times] == [0.0, 1.0, 3.0]  # retransmissions back off: 1 s, 2 s
        with pytest.raises(DnsTemporaryError, match="no answer within 5 s"):
            result_of(answer)

    def test_questions_in_flight_share_one_timer_and_each_retransmits_on_its_own_time(self) -> None:
        lookups = self.lookups(timeout=5.0)
        first = lookups.a("2.0.0.127.bl.test")
        self.network.answer(self.zone)  # answered at once: it must never be sent again
        waiting = []
        for name in ("3.0.0.127.bl.test", "9.0.0.127.bl.test"):
            self.network.advance(0.5)
            waiting.append(lookups.a(name))
        assert len(self.network.getDelayedCalls()) == 1  # one timer, however many questions wait
        times = []
        for _ in range(12):
            before = len(self.network.written)
            self.network.advance(0.25)
            times += [self.network.seconds()] * (len(self.network.written) - before)
        # 3.0.0.127 asked at 0.5 and 9.0.0.127 at 1.0 are sent again 1 s later, and again 2 s after that
        assert times == [1.5, 2.0, 3.5, 4.0]
        assert [query.question[0].name.to_text() for _, query, _ in self.network.sent()[3:]] == [
            "3.0.0.127.bl.test.",
            "9.0.0.127.bl.test.",
        ] * 2
        self.network.answer(self.zone)
        assert result_of(first) == ["127.0.0.2"]
        assert sorted(result_of(waiting[0])) == ["127.0.0.10", "127.0.0.4"]
        assert result_of(waiting[1]) == []
        assert self.network.getDelayedCalls() == []  # nothing waits: no timer left behind

    def test_servfail_from_one_server_asks_the_other_at_once(self) -> None:
        lookups = self.lookups(NS1, NS2)
        answer = lookups.a("2.0.0.127.bl.test")
        self.network.answer(self.zone, tamper=lambda response: response.set_rcode(dns.rcode.SERVFAIL))
        assert len(self.network.sent()) == 2
        self.network.answer(self.zone)
        assert result_of(answer) == ["127.0.0.2"]

    def test_every_server_refusing_is_a_temporary_error_before_the_deadline(self) -> None:
        lookups = self.lookups(NS1, NS2)
        answer = lookups.a("2.0.0.127.bl.test")
        for _ in range(2):
            self.network.answer(self.zone, tamper=lambda response: response.set_rcode(dns.rcode.REFUSED))
        with pytest.raises(DnsTemporaryError, match="every name server refused"):
            result_of(answer)
        assert self.network.getDelayedCalls() == []  # no retransmission or deadline left behind

    def test_an_answer_from_another_address_is_ignored(self) -> None:
        answer = self.lookups().a("2.0.0.127.bl.test")
        self.network.answer(self.zone, source=("198.51.100.66", 53))
        assert not answer.called
        self.network.delivered = 0
        self.network.answer(self.zone)
        assert result_of(answer) == ["127.0.0.2"]

    def test_an_answer_to_another_question_or_id_is_ignored(self) -> None:
        answer = self.lookups().a("2.0.0.127.bl.test")
        [(port, query, addr)] = self.network.sent()
        forged = self.zone.answer(dns.message.make_query("3.0.0.127.bl.test", "A"))
        forged.id = query.id
        port.protocol.datagramReceived(forged.to_wire(), addr)  # right id, wrong question
        wrong_id = self.zone.answer(query)
        wrong_id.id = (query.id + 1) % 65536
        port.protocol.datagramReceived(wrong_id.to_wire(), addr)
        port.protocol.datagramReceived(b"\x00" * 5, addr)  # garbage
        assert not answer.called
        port.protocol.datagramReceived(self.zone.answer(query).to_wire(), addr)
        assert result_of(answer) == ["127.0.0.2"]

    def test_formerr_to_edns_is_asked_again_without_edns(self) -> None:
        answer = self.lookups().a("2.0.0.127.bl.test")
        self.network.answer(self.zone, tamper=lambda response: response.set_rcode(dns.rcode.FORMERR))
        [first, second] = self.network.sent()
        assert (first[1].edns, second[1].edns) == (0, -1)
        self.network.answer(self.zone)
        assert result_of(answer) == ["127.0.0.2"]

    def test_a_truncated_answer_turns_to_tcp(self) -> None:
        self.zone.truncate = {"2.0.0.127.bl.test"}
        answer = self.lookups().a("2.0.0.127.bl.test")
        self.network.answer(self.zone)
        [(host, port, factory, _)] = self.network.tcp
        assert (host, port) == NS1
        from twisted.internet.testing import StringTransport

        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        sent = transport.value()
        query = dns.message.from_wire(sent[2:])
        wire = self.zone.answer(query, over_tcp=True).to_wire()
        protocol.dataReceived(len(wire).to_bytes(2, "big") + wire[:10])
        assert not answer.called
        protocol.dataReceived(wire[10:])
        assert result_of(answer) == ["127.0.0.2"]

    def test_a_tcp_question_that_hangs_is_given_up_at_the_deadline(self) -> None:
        self.zone.truncate = {"2.0.0.127.bl.test"}
        lookups = self.lookups(timeout=5.0)
        answer = lookups.a("2.0.0.127.bl.test")
        self.network.answer(self.zone)
        [(_, _, _, connect_timeout)] = self.network.tcp
        assert connect_timeout <= 5.0
        [question] = lookups.querier.in_flight
        connector = question.connector
        self.network.advance(5)
        with pytest.raises(DnsTemporaryError, match="no answer within 5 s"):
            result_of(answer)
        assert connector.disconnected

    def test_a_thousand_lookups_against_a_silent_server_wait_side_by_side(self) -> None:
        lookups = self.lookups(timeout=5.0)
        waiting = [lookups.a(f"{n % 256}.{n // 256}.0.10.bl.test") for n in range(1000)]
        first_round = len(self.network.sent())
        assert first_round == 1000  # all asked at once, none waits for another
        assert len(self.network.ports) <= SOCKETS_PER_FAMILY  # a few sockets, not one per question
        self.network.advance(4.9)
        assert not any(d.called for d in waiting)
        self.network.advance(0.1)  # one deadline for all: 5 s, not 1,000 x 5 s
        failures = []
        for deferred in waiting:
            deferred.addErrback(failures.append)
        assert len(failures) == 1000
        assert all(f.check(DnsTemporaryError) for f in failures)

    def test_ids_are_random_and_sockets_are_replaced_after_many_uses(self) -> None:
        from gateway.filters import _dnsquery

        self.patch(_dnsquery, "USES_PER_SOCKET", 10)
        lookups = self.lookups()
        for n in range(200):
            lookups.a(f"{n}.0.0.10.bl.test")
            self.network.answer(self.zone)
        ids = {query.id for _, query, _ in self.network.sent()}
        assert len(ids) > 150
        assert len(self.network.ports) >= 200 // 10
        open_ports = [port for port in self.network.ports if not port.closed]
        assert len(open_ports) <= SOCKETS_PER_FAMILY

    def test_the_questions_of_one_score_share_a_socket(self) -> None:
        lookups = self.lookups()
        for n in range(40):
            names = [f"{n}.0.0.10.bl.test", f"{n}.0.0.10.other.test", f"{n}.0.0.10.third.test"]
            scored = lookups.a_each(names)
            batch = self.network.written[-3:]
            assert len({port for port, _, _ in batch}) == 1
            assert len({datagram[:2] for _, datagram, _ in batch}) == 3  # an id each
            self.network.answer(self.zone)
            assert result_of(scored) == [[], [], []]
        assert len(self.network.ports) > 1  # the scores went out on the pool's sockets, not one
        # outside a score, questions go out on any socket of the pool
        for n in range(30):
            lookups.a(f"{n}.1.0.10.bl.test")
        assert len({port for port, _, _ in self.network.written[-30:]}) > 1

    def test_sockets_still_turn_over_when_scores_share_them(self) -> None:
        from gateway.filters import _dnsquery

        self.patch(_dnsquery, "USES_PER_SOCKET", 10)
        lookups = self.lookups()
        for n in range(40):
            names = [f"{n}.0.0.10.bl.test", f"{n}.0.0.10.other.test", f"{n}.0.0.10.third.test"]
            scored = lookups.a_each(names)
            self.network.answer(self.zone)
            assert result_of(scored) == [[], [], []]
        assert len(self.network.ports) >= 120 // 10
        assert len([port for port in self.network.ports if not port.closed]) <= SOCKETS_PER_FAMILY
        assert all(len(port.protocol.pending) == 0 for port in self.network.ports)


class ConfigTests(SynchronousTestCase):
    def test_nameserver_forms(self) -> None:
        assert parse_nameserver("192.0.2.53") == ("192.0.2.53", 53)
        assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
        assert parse_nameserver("[::1]:5353") == ("::1", 5353)
        assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
        for bad in ("ns.example.com", "127.0.0.1:0", "[::1]x"):
            with pytest.raises(ValueError):
                parse_nameserver(bad)

    def test_a_bad_nameserver_is_a_config_error_naming_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"dns\.nameservers.*'ns\.example\.com'"):
            DnsLookups.from_config(DnsConfig(nameservers=("ns.example.com",)), Clock())

    def test_no_nameservers_means_resolv_conf(self) -> None:
        lookups = DnsLookups.from_config(DnsConfig(timeout=2.0), Clock())
        assert lookups.querier.nameservers  # whatever the system has, or 127.0.0.1
        assert lookups.querier.timeout == 2.0

    def test_reverse_names(self) -> None:
        assert reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa"
        assert reverse_name("::ffff:192.0.2.1") == "1.2.0.192.in-addr.arpa"
        assert reverse_name("2001:db8::1").endswith(".8.b.d.0.1.0.0.2.ip6.arpa")


class FakeHoldTests(SynchronousTestCase):
    def test_held_lookups_wait_for_release(self) -> None:
        fake = StaticDnsLookups(ZONE, hold=True)
        first, second = fake.a("2.0.0.127.bl.test"), fake.addresses("mx1.example.test")
        assert not first.called and not second.called
        assert [key for key, _, _ in fake.held] == [
            "2.0.0.127.bl.test",
            "mx1.example.test",
            "mx1.example.test",
        ]
        fake.release()
        assert result_of(first) == ["127.0.0.2"]
        assert result_of(second) == ["192.0.2.1", "2001:db8::1"]
