"""Open N SMTP sessions to a server and hold them open (for relay_bench --hold).

Each session connects, reads the 220 greeting, sends EHLO, reads the 250
reply, and then stays idle. Connections are opened with a bounded number in
flight (so the server's listen backlog is not overrun) and spread over the
source addresses 127.0.0.1 ... 127.0.0.K (--sources K), so that the
ephemeral ports of one source address are never the limit.

Protocol with the parent, one line each on stdout:
    progress open=<n> failed=<n>    (every 1000 sessions)
    held open=<n> failed=<n> seconds=<t>
then, for every line read on stdin ("check"):
    alive open=<n> closed=<n>       (sessions the server has not closed)
and on "quit" (or end of stdin) it sends QUIT on every session and exits.
The process raises its own RLIMIT_NOFILE to fit N sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import sys
import time


class Session:
    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply (the last line has a space after the code)."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def open_session(host: str, port: int, source: str, helo: str, timeout: float) -> Session:
    session = Session()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    except BaseException:
        sock.close()
        raise
    session.reader, session.writer = reader, writer
    greeting = await asyncio.wait_for(read_reply(reader), timeout)
    if not greeting.startswith(b"220"):
        raise ConnectionError(f"greeting {greeting!r}")
    writer.write(f"EHLO {helo}\r\n".encode())
    reply = await asyncio.wait_for(read_reply(reader), timeout)
    if not reply.startswith(b"250"):
        raise ConnectionError(f"EHLO reply {reply!r}")
    return session


async def watch(session: Session) -> None:
    """Notice when the server closes the session (idle timeout, crash)."""
    assert session.reader is not None
    try:
        while await session.reader.read(4096):
            pass
    except (ConnectionError, OSError):
        pass
    session.closed = True


async def main(args: argparse.Namespace) -> int:
    want = args.sessions + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError):  # raising the hard limit needs CAP_SYS_RESOURCE
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
            print(
                f"warning: RLIMIT_NOFILE is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, "
                f"fewer than the {want} descriptors needed",
                file=sys.stderr,
                flush=True,
            )
    sources = [f"127.0.0.{i}" for i in range(1, args.sources + 1)]
    sessions: list[Session] = []
    watchers: list[asyncio.Task[None]] = []
    failed = 0
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(args.in_flight)
    started = time.monotonic()

    async def one(index: int) -> None:
        nonlocal failed
        async with gate:
            try:
                session = await open_session(
                    args.host, args.port, sources[index % len(sources)], args.helo, args.timeout
                )
            except (TimeoutError, OSError, ConnectionError) as error:
                failed += 1
                key = type(error).__name__ + ": " + str(error)[:80]
                errors[key] = errors.get(key, 0) + 1
                return
        sessions.append(session)
        watchers.append(asyncio.create_task(watch(session)))
        if len(sessions) % 1000 == 0:
            print(f"progress open={len(sessions)} failed={failed}", flush=True)

    await asyncio.gather(*(one(i) for i in range(args.sessions)))
    print(f"held open={len(sessions)} failed={failed} seconds={time.monotonic() - started:.2f}", flush=True)
    for key, count in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"error count={count} {key}", file=sys.stderr, flush=True)

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while True:
        line = (await stdin.readline()).strip()
        if line == b"check":
            alive = sum(1 for s in sessions if not s.closed)
            print(f"alive open={alive} closed={len(sessions) - alive}", flush=True)
            continue
        break  # "quit" or end of input
    for session in sessions:
        if not session.closed and session.writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                session.writer.write(b"QUIT\r\n")
    await asyncio.sleep(1.0)
    for session in sessions:
        if session.writer is not None:
            session.writer.close()
    for task in watchers:
        task.cancel()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2527)
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--sources", type=int, default=4, help="source addresses 127.0.0.1..127.0.0.K")
    parser.add_argument("--in-flight", type=int, default=200, help="connections being opened at once")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--helo", default="hold.bench.test")
    sys.exit(asyncio.run(main(parser.parse_args())))
