"""The SMTP workers' DNS relayed through the main process (gateway.filters._dnsrelay).

The relayed lookups keep the DNS contract (the same tests as DnsLookups and its
fake), over a real socket pair in this process; then what the channel between
them must do: one write per reactor turn, lines the peer has no room for kept in
order, a main process that goes, lines that make no sense.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from gateway.config import DnsConfig
from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters._dnsrelay import LineChannel, RelayedLookups, main_end, relay_pair, worker_end
from gateway.filters.dns import DnsLookups, Lookups, StaticDnsLookups, _Answer
from tests.unit.test_filter_dns import ZONE, DnsLookupsContract
from tests.unit.zone_server import Zone, ZoneServer


async def turns(count: int = 3) -> None:
    """Let the reactor go round a few times (the channels write at the end of a turn)."""
    for _ in range(count):
        await deferLater(reactor, 0, lambda: None)


async def until(condition: Any, limit: float = 5.0) -> None:
    waited = 0.0
    while not condition():
        assert waited < limit, "gave up waiting"
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


class RelayedOverStaticContractTests(DnsLookupsContract, TestCase):
    """Questions through the relay to the fake in the "main process"."""

    def setUp(self) -> None:
        self.lookups, _main, worker_channel, main_channel = relay_pair(StaticDnsLookups(ZONE), reactor)
        self.addCleanup(worker_channel.close)
        self.addCleanup(main_channel.close)


class RelayedOverUdpContractTests(DnsLookupsContract, TestCase):
    """Questions through the relay to the real DnsLookups, which asks a name server on 127.0.0.1."""

    def setUp(self) -> None:
        self.server = ZoneServer(Zone(ZONE), reactor)
        nameserver = self.server.listen()
        real = DnsLookups.from_config(DnsConfig(nameservers=(nameserver,), timeout=3.0), reactor)
        self.lookups, _main, worker_channel, main_channel = relay_pair(real, reactor)
        self.addCleanup(self.server.stop)
        self.addCleanup(real.close)
        self.addCleanup(worker_channel.close)
        self.addCleanup(main_channel.close)


class CountingSocket:
    """A socket that counts its sends (a socket object takes no new attributes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class SlowLookups(Lookups):
    """Lookups that answer when the test says so."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[_Answer]] = []

    def _lookup(self, name: str, rdtype: str) -> Deferred[_Answer]:
        self.waiting.append(Deferred())
        return self.waiting[-1]


class ChannelTests(TestCase):
    def pair(self) -> tuple[socket.socket, socket.socket]:
        main_end, worker_end = socket.socketpair()
        self.addCleanup(main_end.close)
        self.addCleanup(worker_end.close)
        return main_end, worker_end

    def worker(self, sock: Any) -> tuple[RelayedLookups, LineChannel]:
        lookups, channel = worker_end(sock, reactor)
        self.addCleanup(channel.close)
        return lookups, channel

    def main(self, sock: Any, lookups: Lookups) -> LineChannel:
        _relay, channel = main_end(sock, reactor, lambda: lookups)
        self.addCleanup(channel.close)
        return channel

    async def test_the_questions_of_one_turn_go_out_in_one_write(self) -> None:
        main_end, worker_end = self.pair()
        counting = CountingSocket(worker_end)
        lookups, _channel = self.worker(counting)
        self.main(main_end, StaticDnsLookups(ZONE))
        asked = [lookups.a("2.0.0.127.bl.test"), lookups.a_each(["3.0.0.127.bl.test", "bl.test"])]
        asked.append(lookups.mx("example.test"))
        assert counting.sends == 0  # nothing is written before the turn ends
        await until(lambda: all(d.called for d in asked))
        assert counting.sends == 1
        assert await asked[0] == ["127.0.0.2"]
        assert [sorted(r) for r in await asked[1]] == [["127.0.0.10", "127.0.0.4"], []]
        assert await asked[2] == [(10, "mx1.example.test"), (20, "mx2.example.test")]
        assert lookups.in_flight == 0

    async def test_names_without_addresses_come_back_empty_and_in_order(self) -> None:
        main_end, worker_end = self.pair()
        lookups, _channel = self.worker(worker_end)
        self.main(main_end, StaticDnsLookups(ZONE))
        # the usual DNSBL answer (nothing listed: no such name, or a name without an A record)
        for names in (["9.0.0.127.bl.test", "bl.test", "nowhere.test"], ["9.0.0.127.bl.test"]):
            assert await lookups.a_each(names) == [[]] * len(names)
        mixed = await lookups.a_each(["9.0.0.127.bl.test", "2.0.0.127.bl.test", "nowhere.test"])
        assert mixed == [[], ["127.0.0.2"], []]

    async def test_a_batch_of_questions_goes_out_at_once_and_the_rest_at_the_end_of_the_turn(self) -> None:
        main_end, worker_end = self.pair()
        counting = CountingSocket(worker_end)
        lookups, channel = self.worker(counting)
        self.main(main_end, StaticDnsLookups(ZONE))
        names = ["mx1.example.test", "mx2.example.test", "implicit.test", "2.0.0.127.bl.test"]
        assert channel.batch == len(names)
        asked = [lookups.a(name) for name in names]
        assert counting.sends == 1  # a full batch does not wait for the turn to end
        asked.append(lookups.a("nowhere.test"))
        assert counting.sends == 1  # one more waits for it
        await until(lambda: all(d.called for d in asked))
        assert counting.sends == 2
        assert [await d for d in asked] == [["192.0.2.1"], ["192.0.2.2"], ["192.0.2.3"], ["127.0.0.2"], []]

    async def test_lines_the_peer_has_no_room_for_wait_and_go_in_order(self) -> None:
        main_end, worker_end = self.pair()
        for sock in (main_end, worker_end):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lookups, channel = self.worker(worker_end)
        count = 3000  # some 150 KB of questions: far more than the buffers hold
        for number in range(count):
            lookups.a(f"{number}.bl.test").addErrback(lambda failure: None)  # never answered
        await turns()
        assert channel._waiting_to_write  # the socket is full; the rest waits in the channel
        received: list[bytes] = []
        reader = LineChannel(main_end, reactor, received.append, lambda reason: None)
        self.addCleanup(reader.close)
        await until(lambda: len(received) == count)
        assert received == [b'?[%d,"A","%d.bl.test"]' % (n + 1, n) for n in range(count)]
        assert not channel._waiting_to_write

    async def test_when_the_main_process_goes_lookups_fail_temporarily_now_and_later(self) -> None:
        main_end, worker_end = self.pair()
        lookups, _channel = self.worker(worker_end)
        waiting = lookups.a("2.0.0.127.bl.test")
        await turns()
        main_end.close()
        with pytest.raises(DnsTemporaryError, match="main process"):
            await waiting
        with pytest.raises(DnsTemporaryError, match="main process"):
            await lookups.addresses("mx1.example.test")
        assert lookups.in_flight == 0

    async def test_a_line_that_is_no_answer_is_logged_and_the_next_answers_still_come(self) -> None:
        main_end, worker_end = self.pair()
        lookups, _channel = self.worker(worker_end)
        waiting = lookups.a("2.0.0.127.bl.test")
        await turns()
        with capturedLogs() as events:
            main_end.sendall(b"!not json\n![99,[],true]\n")  # nonsense, then an answer to nothing asked
            main_end.sendall(b'![1,["127.0.0.2"],true]\n')
            assert await waiting == ["127.0.0.2"]
        problems = [event for event in events if "no answer" in event["log_format"]]
        assert [event["line"] for event in problems] == [b"!not json", b"![99,[],true]"]

    async def test_a_question_that_makes_no_sense_is_logged_and_the_others_answered(self) -> None:
        main_end, worker_end = self.pair()
        self.main(main_end, StaticDnsLookups(ZONE))
        answers: list[bytes] = []
        reader = LineChannel(worker_end, reactor, answers.append, lambda reason: None)
        self.addCleanup(reader.close)
        reader.send(b'?[1,"A"]\n?what\n?[2,"A","2.0.0.127.bl.test"]\n')
        await until(lambda: answers)
        assert answers == [b'![2,["127.0.0.2"],true]']
        assert len(self.flushLoggedErrors(ValueError)) == 2

    async def test_a_lookup_its_filter_gave_up_on_takes_its_late_answer_quietly(self) -> None:
        main_end, worker_end = self.pair()
        slow = SlowLookups()
        lookups, _channel = self.worker(worker_end)
        self.main(main_end, slow)
        given_up = lookups.a("2.0.0.127.bl.test")
        given_up.addErrback(lambda failure: None)
        given_up.cancel()  # the chain's timeout for the filter
        still_wanted = lookups.a("3.0.0.127.bl.test")
        await until(lambda: len(slow.waiting) == 2)
        slow.waiting[0].callback(_Answer(("127.0.0.2",)))
        slow.waiting[1].errback(DnsTemporaryError("timed out"))
        with pytest.raises(DnsTemporaryError, match="timed out"):
            await still_wanted
        await until(lambda: lookups.in_flight == 0)

    async def test_any_name_arrives_as_it_was_asked(self) -> None:
        main_end, worker_end = self.pair()
        slow = SlowLookups()
        asked: list[tuple[str, str]] = []
        original = slow._lookup

        def recording(name: str, rdtype: str) -> Deferred[_Answer]:
            asked.append((name, rdtype))
            return original(name, rdtype)

        slow._lookup = recording  # type: ignore[method-assign]
        lookups, _channel = self.worker(worker_end)
        self.main(main_end, slow)
        odd = ["100%d.bl.test", 'a"b\\\\c.test', "bücher.test", "new\nline.test", "%s%%"]
        single = lookups.txt(odd[0])
        many = lookups.a_each(odd[1:])
        await until(lambda: len(slow.waiting) == len(odd))
        assert asked == [(odd[0], "TXT")] + [(name, "A") for name in odd[1:]]
        for waiting in slow.waiting:
            waiting.callback(_Answer(("x%d",)))
        assert await single == ["x%d"]
        assert await many == [["x%d"]] * 4

    async def test_a_question_the_main_process_fails_to_ask_is_answered_with_the_failure(self) -> None:
        class Broken(Lookups):
            def _lookup(self, name: str, rdtype: str) -> Deferred[_Answer]:
                raise RuntimeError("no resolver here")

        main_end, worker_end = self.pair()
        lookups, _channel = self.worker(worker_end)
        self.main(main_end, Broken())
        with pytest.raises(DnsTemporaryError, match="no resolver here"):
            await lookups.a("2.0.0.127.bl.test")
        results = await lookups.a_each(["2.0.0.127.bl.test"])
        assert results[0].check(DnsTemporaryError)
        assert len(self.flushLoggedErrors(RuntimeError)) == 2

    async def test_a_line_without_end_is_not_kept_without_bound(self) -> None:
        from gateway.filters import _dnsrelay

        self.patch(_dnsrelay, "MAX_LINE", 1000)
        main_end, worker_end = self.pair()
        lookups, _channel = self.worker(worker_end)
        waiting = lookups.a("2.0.0.127.bl.test")
        await turns()
        with capturedLogs() as events:
            main_end.sendall(b"!" + b"x" * 2000)
            with pytest.raises(DnsTemporaryError, match="main process"):
                await waiting
        assert [event["why"] for event in events if "relay" in event["log_format"]] == [
            "the other end of the DNS relay sent a line of over 1000 bytes"
        ]
