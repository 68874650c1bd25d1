"""Micro-benchmark of the durable spool: commits per second through the real reactor.

M concurrent "sessions" each commit a message of SIZE bytes (written in two
pieces, as the SMTP server does: a Received header, then the data), wait for the
Deferred, and start the next, until N messages are committed. With --remove,
each committed message is also removed (what a successful delivery costs the
spool). The run is repeated with fsync=False for comparison.

Each run uses a fresh directory; all are deleted only at the very end (bulk
deletion right before a run slows file creation on this VM: perf-anchors 6.1),
so wait about 40 s before running the benchmark again.

    /tmp/venv/bin/python bench/spool_bench.py --messages 20000 --sessions 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor

from gateway.model import Envelope, Recipient, Session
from gateway.queue.spool import DirectorySpool

ENVELOPE = Envelope("sender@example.org", (Recipient("rcpt@example.com"),))
SESSION = Session("192.0.2.1", 40000, helo="client.example.org")


def run(path: str, args: argparse.Namespace, fsync: bool) -> defer.Deferred[dict[str, Any]]:
    spool = DirectorySpool(path, reactor=reactor, writer_threads=args.threads, fsync=fsync)  # type: ignore[arg-type]
    header = b"Received: from client.example.org ([192.0.2.1]) by gateway; Sat, 1 Jan 2026\r\n"
    body = (b"x" * 78 + b"\r\n") * (max(0, args.size - len(header)) // 80 + 1)
    body = body[: max(0, args.size - len(header))]
    result: defer.Deferred[dict[str, Any]] = defer.Deferred()
    state = {"started": 0, "done": 0, "latency": 0.0}
    clocks: dict[str, float] = {}

    def one() -> None:
        if state["started"] >= args.messages:
            return
        state["started"] += 1
        began = time.perf_counter()
        message = spool.new_message()
        message.write(header)
        message.write(body)
        message.commit(ENVELOPE, SESSION).addCallback(committed, began)

    def committed(queue_id: str, began: float) -> None:
        state["latency"] += time.perf_counter() - began
        if args.remove:
            spool.remove(queue_id)
        state["done"] += 1
        if state["done"] == args.messages:
            finish()
        else:
            one()

    def finish() -> None:
        wall = time.perf_counter() - clocks["wall"]
        stats = spool.committer
        report = {
            "fsync": fsync,
            "messages": args.messages,
            "sessions": args.sessions,
            "size": args.size,
            "threads": args.threads,
            "remove": args.remove,
            "commits_per_s": round(args.messages / wall, 1),
            "mean_commit_latency_ms": round(1000 * state["latency"] / args.messages, 3),
            "reactor_cpu_us_per_commit": round(
                1e6 * (time.thread_time() - clocks["thread"]) / args.messages, 1
            ),
            "process_cpu_us_per_commit": round(
                1e6 * (time.process_time() - clocks["process"]) / args.messages, 1
            ),
            "batches": stats.batches,
            "ops_per_batch": round(stats.operations / max(1, stats.batches), 2),
            "dir_fsyncs_per_commit": round(stats.dir_syncs / args.messages, 3) if fsync else 0,
        }
        spool.stop().addCallback(lambda _: result.callback(report))

    def recovered(_: int) -> None:
        clocks.update(wall=time.perf_counter(), thread=time.thread_time(), process=time.process_time())
        for _ in range(args.sessions):
            one()

    spool.recover().addCallback(recovered)
    return result


@defer.inlineCallbacks
def main(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    base = tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir)
    try:
        for round_ in range(args.rounds):
            for fsync in (True, False):
                path = os.path.join(base, f"run{round_}-{'fsync' if fsync else 'nofsync'}")
                report = yield run(path, args, fsync)
                print(json.dumps(report), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        reactor.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=10 * 1024)
    parser.add_argument("--threads", type=int, default=4, help="writer threads")
    parser.add_argument("--remove", action="store_true", help="remove each message once committed")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to make the spools (default: the temp dir)")
    arguments = parser.parse_args()
    reactor.callWhenRunning(main, arguments)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
