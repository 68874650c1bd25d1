"""A UDP DNS proxy for filter_bench: forwards queries, drops those whose name contains a marker.

    python bench/_slow_dns.py LISTEN_PORT UPSTREAM_PORT MARKER

Queries whose question name contains MARKER (e.g. ".9.127.z" for clients in
127.9.0.0/16 asked in zones z1..., "y.x.9.127.z1.bench.test") are never answered: the
gateway's lookups for those clients wait until their timeout. Everything else is
forwarded to the upstream server on 127.0.0.1 and the answer sent back.
"""

from __future__ import annotations

import asyncio
import sys

HOST = "127.0.0.1"


def key(packet: bytes) -> bytes:
    """The query id and question section: what matches an answer to its query."""
    offset = 12
    while offset < len(packet) and packet[offset]:
        offset += 1 + packet[offset]
    return packet[:2] + packet[12 : offset + 5].lower()


def question_name(packet: bytes) -> str:
    labels, offset = [], 12
    while offset < len(packet) and packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    return ".".join(labels).lower() + "."


class Proxy(asyncio.DatagramProtocol):
    def __init__(self, upstream: int, marker: str) -> None:
        self.upstream = upstream
        self.marker = marker
        self.pending: dict[bytes, tuple[str, int]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == (HOST, self.upstream):
            client = self.pending.pop(key(data), None)
            if client is not None:
                self.transport.sendto(data, client)
            return
        if self.marker in question_name(data):
            return  # dropped: the client waits for its timeout
        self.pending[key(data)] = addr
        self.transport.sendto(data, (HOST, self.upstream))


async def main() -> None:
    listen, upstream, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: Proxy(upstream, marker), local_addr=(HOST, listen))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
