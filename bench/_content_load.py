"""The load client of bench/content_bench.py: real messages, one per SMTP connection, timed at end of data.

Each session comes from its own 127.2.x.y address (outside relay.networks, so the
gateway runs its inbound chain), sends EHLO, MAIL FROM (BODY=8BITMIME), RCPT TO
and DATA pipelined in one write as an MTA does (or one by one, `pipelining`
False), one message of the corpus, then QUIT. The time recorded is the
end-of-data latency: from writing the final ".\\r\\n" (after every byte of the
message was handed to the kernel) until the reply to it, which is when the
gateway has run the content filters and committed the message.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
SENDER = b"sender@client.bench.test"
RECIPIENT = b"rcpt@dest.bench.test"
SESSION_TIMEOUT = 120.0  # a message waiting on spamd under load is slow, not failed
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Sample:
    """One message of the load: its SMTP DATA bytes (CRLF, dot-stuffed) and what it is."""

    name: str
    wire: bytes
    spam: bool


def to_wire(raw: bytes) -> bytes:
    """A raw message as DATA content: every line ending CRLF, lines starting with "." doubled."""
    lines = _LINE_END.split(raw)
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


@dataclass
class Tally:
    """What a load run saw: messages accepted in the measured time, their latencies, failures."""

    seconds: float
    accepted: int = 0  # 250 after "." within the measured time
    accepted_total: int = 0  # every 250 after "." (warm-up and late ones too): what the sink must see
    latencies: list[float] = field(default_factory=list)  # seconds, of the `accepted` ones
    spam: int = 0  # of `accepted`
    octets: int = 0  # of `accepted`
    failed: int = 0
    late: int = 0  # sessions still running at the end of the measured time (counted only in the total)
    failures: dict[str, int] = field(default_factory=dict)  # reply or error -> how many

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of a (possibly multi-line) reply."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def one_message(source: str, port: int, sample: Sample, pipelining: bool = True) -> tuple[bytes, float]:
    """Send `sample` in one session from `source`; (the reply to ".", end-of-data latency in s)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # the final ".\r\n" is a write of its own: without NODELAY, Nagle holds it for the
    # gateway's delayed ACK of the message (40 ms on loopback), which is no cost of the gateway
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    writer.transport.set_write_buffer_limits(0)  # drain() returns when all is with the kernel
    try:
        if not (banner := await _reply(reader)).startswith(b"220"):
            return banner, 0.0
        writer.write(b"EHLO client.bench.test\r\n")
        if not (ehlo := await _reply(reader)).startswith(b"250"):
            return ehlo, 0.0
        commands = (
            b"MAIL FROM:<%s> BODY=8BITMIME\r\n" % SENDER,
            b"RCPT TO:<%s>\r\n" % RECIPIENT,
            b"DATA\r\n",
        )
        if pipelining:
            writer.write(b"".join(commands))
        for command, expected in zip(commands, (b"250", b"250", b"354"), strict=True):
            if not pipelining:
                writer.write(command)
            if not (answer := await _reply(reader)).startswith(expected):
                return answer, 0.0
        writer.write(sample.wire)
        await writer.drain()
        started = time.perf_counter()
        writer.write(b".\r\n")
        answer = await _reply(reader)
        latency = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        return answer, latency
    finally:
        writer.close()


class Load:
    """Sessions from 127.2.x.y, `concurrency` at a time, each with the next message of `samples`."""

    def __init__(self, port: int, samples: list[Sample], concurrency: int, pipelining: bool = True) -> None:
        self.port = port
        self.pipelining = pipelining
        self.samples = samples
        self.concurrency = concurrency
        self.addresses = [f"127.2.{a}.{b}" for a in range(256) for b in range(1, 255)]
        random.Random(4).shuffle(self.addresses)
        self.index = 0  # goes on across runs: the warm-up does not repeat the measured messages

    async def run(self, seconds: float) -> Tally:
        tally = Tally(seconds)
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                number = self.index
                self.index += 1
                sample = self.samples[number % len(self.samples)]
                source = self.addresses[number % len(self.addresses)]
                try:
                    answer, latency = await asyncio.wait_for(
                        one_message(source, self.port, sample, self.pipelining), SESSION_TIMEOUT
                    )
                except (OSError, ConnectionError, TimeoutError) as error:
                    answer, latency = type(error).__name__.encode(), 0.0
                ok = answer.startswith(b"250")
                tally.accepted_total += ok
                if time.monotonic() > deadline:
                    tally.late += 1  # finished after the measured time: not in the rate
                    break
                if ok:
                    tally.accepted += 1
                    tally.latencies.append(latency)
                    tally.spam += sample.spam
                    tally.octets += len(sample.wire)
                else:
                    tally.failed += 1
                    key = answer[:40].decode(errors="replace").strip()
                    tally.failures[key] = tally.failures.get(key, 0) + 1

        # every session runs to its end (no cancelling), so accepted_total is exact
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return tally


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (0 < fraction <= 1) of `values`; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil(n * fraction)
    return ordered[int(rank) - 1]
