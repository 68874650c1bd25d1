"""A worker's DNS, asked by the main process: one cache and one set of sockets for all.

An SMTP worker's filters (dnsbl, rhsbl, helo, reverse_dns, sender_domain) do not
talk to name servers themselves. Their questions go to the main process over a
socket pair made for each worker; the main process asks its own `DnsLookups`
(the one its fetched-mail filters use) and sends the answers back. Postfix's
postscreen works the same way with its dnsblog helpers.

Why: a DNS question costs the asking process a datagram out, one in, a timer, the
parsing and the cache, some 60 µs of CPU for each DNSBL zone of each new client.
A worker is where the sessions are served and the first thing to run out of CPU;
for it a DNSBL score is now one line out and one line back, however many zones,
and the lines of a whole reactor turn go in one write and come back in one read.
All workers share one cache, as postscreen's processes share its one.

The lines, JSON after a one-character tag::

    worker -> main   ?[7, "A", "2.0.0.127.zen.spamhaus.org"]     one question
                     *[8, ["2.0.0.127.z1.test", "2.0.0.127.z2.test"]]
                                                 A records of several names at once
    main -> worker   ![7, ["127.0.0.2"], true]   the values, and whether the name exists
                     ![7, null, "SERVFAIL ..."]  a temporary failure, with its text
                     ![8, [[["127.0.0.2"], true], [null, "timed out"]]]   one per name

`RelayedLookups` keeps `gateway.filters.dns.Lookups`' contract (the same contract
tests): NXDOMAIN is an answer that does not exist, anything else that goes wrong
is `DnsTemporaryError`. The main process always answers (its querier has a
deadline); if it is gone, what waits and every later lookup fail with
`DnsTemporaryError`, and the worker stops anyway.
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters.dns import Lookups, _Answer, failure_text

log = Logger(namespace="mailgate.dns")

ASK = b"?"
ASK_MANY = b"*"
ANSWER = b"!"
READ_SIZE = 65536
BATCH = 4  # lines that go out at once, without waiting for the end of the reactor's turn
MAX_LINE = 1 << 20  # the longest answer (TXT records of a 64 KB TCP answer) is far shorter
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
_string: Callable[[str], str] = json.encoder.encode_basestring_ascii
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _decode(text: str) -> Any:
    """One JSON value that is the whole of `text` (json.loads without its whitespace passes)."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError(f"no JSON value at the start of {text[:50]!r}") from None
    if end != len(text):
        raise ValueError(f"more than one JSON value in {text[:50]!r}")
    return value


class LineChannel:
    """One end of a stream socket pair that carries lines, written at the end of the reactor's turn.

    `send` collects: the lines sent during one turn of the reactor go out in one
    write just after it (a ``callLater(0)``), before the reactor waits again;
    waiting for the socket to be writable would cost a whole turn. But a busy
    worker's turn is many sessions long (milliseconds), and a question that
    waited for its end kept the other process idle meanwhile: at 50 sessions at
    a time the worker then sat idle for 12 % of the time, all its sessions
    waiting for answers (docs/benchmarks.rst). So once `batch` lines wait they
    go out at once. What the peer has no room for waits for it here. Lines come
    in to `on_line` (without newline); `on_lost` is called once when the peer
    goes or the socket fails.
    """

    def __init__(
        self,
        sock: socket.socket,
        reactor: Any,
        on_line: Callable[[bytes], object],
        on_lost: Callable[[Failure], object],
        *,
        batch: int = BATCH,
    ) -> None:
        sock.setblocking(False)
        self.batch = batch
        self.sock = sock
        self.reactor = reactor
        self.on_line = on_line
        self.on_lost = on_lost
        self._out: list[bytes] = []
        self._unsent = b""  # what the socket had no room for
        self._in = b""
        self._flush: Any = None  # the callLater that writes at the end of this turn
        self._waiting_to_write = False
        self._closed = False
        reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self._closed else self.sock.fileno()

    def logPrefix(self) -> str:
        return "dns-relay"

    def send(self, line: bytes) -> None:
        if self._closed:
            return
        out = self._out
        out.append(line)
        if self._waiting_to_write:
            return  # the socket is full: doWrite sends it all in order
        if len(out) >= self.batch:
            if self._flush is not None:
                self._flush.cancel()
            self._write()
        elif self._flush is None:
            self._flush = self.reactor.callLater(0, self._write)

    def _write(self) -> None:
        self._flush = None
        data = self._unsent + b"".join(self._out)
        self._out.clear()
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._lose(Failure(error))  # type: ignore[no-untyped-call]
            return
        self._unsent = data[sent:]
        if self._unsent and not self._waiting_to_write:
            self._waiting_to_write = True
            self.reactor.addWriter(self)
        elif not self._unsent and self._waiting_to_write:
            self._waiting_to_write = False
            self.reactor.removeWriter(self)

    def doWrite(self) -> None:
        self._write()

    def doRead(self) -> Exception | None:
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as error:
            return error
        if not data:
            return ConnectionDone("the other end of the DNS relay closed it")
        *lines, self._in = (self._in + data).split(b"\n")
        for line in lines:
            self.on_line(line)
        if len(self._in) > MAX_LINE:
            return ValueError(f"the other end of the DNS relay sent a line of over {MAX_LINE} bytes")
        return None

    def connectionLost(self, reason: Failure) -> None:
        """Called by the reactor when `doRead` reports the end (it has removed us already)."""
        self._lose(reason)

    def _lose(self, reason: Failure) -> None:
        if self._closed:
            return
        self.reactor.removeReader(self)
        if self._waiting_to_write:
            self.reactor.removeWriter(self)
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._closed = True
        self.sock.close()
        if not isinstance(reason.value, ConnectionDone):
            log.error("dns: the DNS relay to the other process failed: {why}", why=reason.getErrorMessage())
        self.on_lost(reason)

    def close(self) -> None:
        self._lose(Failure(ConnectionDone("closed")))  # type: ignore[no-untyped-call]


class RelayedLookups(Lookups):
    """The worker's end: `Lookups` whose questions go out through `send` (one line each)."""

    def __init__(self, send: Callable[[bytes], object] | None = None) -> None:
        self.send = send  # set when the channel is there
        self._waiting: dict[int, tuple[Deferred[Any], bool]] = {}  # id -> (waiter, asked many)
        self._last = 0
        self._lost: str | None = None

    def _ask(self, line: str, many: bool) -> Deferred[Any]:
        """Send ``line % id`` (JSON written by hand: this is per client and per zone)."""
        result: Deferred[Any] = Deferred()
        if self._lost is not None or self.send is None:
            result.errback(DnsTemporaryError(self._lost or "the DNS relay to the main process is not up yet"))
            return result
        self._last += 1
        self._waiting[self._last] = (result, many)  # a cancelled one waits for its answer, which always comes
        self.send((line % self._last).encode("ascii"))
        return result

    def _lookup(self, name: str, rdtype: str) -> Deferred[_Answer]:
        return self._ask(f"?[%d,{_string(rdtype)},{_string(name).replace('%', '%%')}]\n", many=False)

    def a_each(self, names: Sequence[str]) -> Deferred[list[list[str] | Failure]]:
        """`a` of every name in one question to the main process (see `Lookups.a_each`)."""
        if not names:
            return super().a_each(names)
        quoted = ",".join(map(_string, names)).replace("%", "%%")
        return self._ask(f"*[%d,[{quoted}]]\n", many=True)

    def answered(self, line: bytes) -> None:
        """One ``!`` line from the main process (without its newline)."""
        try:
            number, *answer = _decode(line[1:].decode("ascii"))
            waiter, many = self._waiting.pop(number)
            # [] (no address, the usual answer) is taken as it is
            result = [v if v == [] else _a_result(v, o) for v, o in answer[0]] if many else _result(*answer)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            log.error("dns: the main process sent a line that is no answer: {line!r}", line=line[:200])
            return
        if waiter.called:
            return  # its filter's timeout cancelled it
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)

    def lost(self, why: str = "the main process, which asks the name servers, is gone") -> None:
        """The link to the main process is gone: fail what waits, and every later lookup."""
        self._lost = why
        waiting, self._waiting = self._waiting, {}
        for waiter, _many in waiting.values():
            if not waiter.called:
                waiter.errback(DnsTemporaryError(why))

    @property
    def in_flight(self) -> int:
        return len(self._waiting)


def _result(values: list[Any] | None, outcome: Any) -> _Answer | Failure:
    if values is None:
        return Failure(DnsTemporaryError(str(outcome)))  # type: ignore[no-untyped-call]
    return _Answer(tuple(tuple(v) if type(v) is list else v for v in values), bool(outcome))


def _a_result(values: list[str] | None, outcome: Any) -> list[str] | Failure:
    if values is None:
        return Failure(DnsTemporaryError(str(outcome)))  # type: ignore[no-untyped-call]
    return [str(value) for value in values]


class LookupRelay:
    """The main process's end for one worker: its questions asked of `lookups`, answers to `send`."""

    def __init__(self, lookups: Callable[[], Lookups], send: Callable[[bytes], object] | None = None) -> None:
        self._lookups = lookups  # built on first use, as FilterServices.dns is
        self.send = send

    def asked(self, line: bytes) -> None:
        """One ``?`` or ``*`` line from the worker (without its newline)."""
        try:
            number, *question = _decode(line[1:].decode("ascii"))
            if not isinstance(number, int):
                raise ValueError("no question number")
            if line[:1] == ASK:
                rdtype, name = question
            elif line[:1] == ASK_MANY:
                (names,) = question
            else:
                raise ValueError("not a question")
        except Exception:
            log.failure("dns: a worker sent a line that is no question: {line!r}", line=line[:200])
            return
        try:
            if line[:1] == ASK:
                asked = self._lookups()._lookup(str(name), str(rdtype))
                asked.addCallbacks(self._answer, self._failed, callbackArgs=(number,), errbackArgs=(number,))
            else:
                self._lookups().a_each([str(name) for name in names]).addCallback(self._answer_many, number)
        except Exception:  # the worker is answered all the same: its filter goes on
            failure = Failure()  # type: ignore[no-untyped-call]
            log.failure("dns: asking a worker's question {line!r} failed", failure, line=line[:200])
            if line[:1] == ASK:
                self._failed(failure, number)
            else:
                self._answer_many([failure] * len(names), number)

    def _reply(self, number: int, *answer: object) -> None:
        if self.send is not None:
            self.send(ANSWER + _encode([number, *answer]).encode("ascii") + b"\n")

    def _answer(self, answer: _Answer, number: int) -> None:
        self._reply(number, answer.values, answer.exists)

    def _failed(self, failure: Failure, number: int) -> None:
        self._reply(number, None, failure_text(failure))

    def _answer_many(self, results: list[list[str] | Failure], number: int) -> None:
        if not any(results):  # no name has an address (a Failure is true): a DNSBL's usual answer
            if self.send is not None:
                self.send(b"![%d,%s]\n" % (number, _unlisted(len(results))))
            return
        each = [(None, failure_text(r)) if isinstance(r, Failure) else (r, True) for r in results]
        self._reply(number, each)


@functools.lru_cache(maxsize=16)
def _unlisted(count: int) -> bytes:
    """The answers of `count` names that exist without an address (as `_answer_many` writes them)."""
    return _encode([([], True)] * count).encode("ascii")


def worker_end(sock: socket.socket, reactor: Any) -> tuple[RelayedLookups, LineChannel]:
    """A worker's end of the relay on `sock`: its Lookups, and the channel (closed: the relay stops)."""
    lookups = RelayedLookups()
    channel = LineChannel(sock, reactor, lookups.answered, lambda reason: lookups.lost())
    lookups.send = channel.send
    return lookups, channel


def main_end(
    sock: socket.socket, reactor: Any, lookups: Callable[[], Lookups]
) -> tuple[LookupRelay, LineChannel]:
    """The main process's end for one worker on `sock`, asking `lookups()`, and its channel."""
    relay = LookupRelay(lookups)
    channel = LineChannel(sock, reactor, relay.asked, lambda reason: None)
    relay.send = channel.send
    return relay, channel


def relay_pair(
    lookups: Lookups, reactor: Any
) -> tuple[RelayedLookups, LookupRelay, LineChannel, LineChannel]:
    """A worker end and a main end joined by a real socket pair in this process (for tests).

    Returns both ends and both channels (close them when done).
    """
    main_sock, worker_sock = socket.socketpair()
    worker, worker_channel = worker_end(worker_sock, reactor)
    main, main_channel = main_end(main_sock, reactor, lambda: lookups)
    return worker, main, worker_channel, main_channel
