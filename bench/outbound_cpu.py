#!/usr/bin/env python3
"""Main-thread CPU per delivered message on the outbound path (queue manager + SMTP client).

One process, the real epoll reactor: a MemorySpool (message files on disk in a
temporary directory) holds N committed messages; the real QueueManager, Router
(``smtp:[127.0.0.1]:PORT``, tls none), Dialer, ConnectionCache and
SmtpTransport, wired as gateway/delivery/transports.py does, deliver them all
to Postfix's ``smtp-sink`` on a free loopback port. Logging goes at info level
to a text file, as the gateway logs.

Prints messages/s (wall: noisy on a shared machine) and the process CPU time
per delivered message (user+system of this process while delivering: robust to
other load). The spool fills before the clock starts, so only delivery counts.

    /tmp/venv/bin/python bench/outbound_cpu.py [--count 3000] [--size 10240]
        [--recipients 1] [--runs 3] [--profile]

``--runs K`` runs K fresh processes and prints each result and the median.
``--profile`` runs the delivery under cProfile and prints the top 25 functions
by tottime and by cumtime (CPU per message is then inflated by the profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.recv(512)  # the greeting: smtp-sink is up
                sock.sendall(b"QUIT\r\n")
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"smtp-sink did not start listening on port {port}")


def cpu_seconds() -> tuple[float, float]:
    """User and system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def message_bytes(size: int) -> bytes:
    header = b"From: bench@sender.test\r\nTo: rcpt@dest.test\r\nSubject: outbound cpu bench\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n"
    body = b""
    while len(header) + len(body) < size:
        body += line
    return (header + body)[:size]


def run_once(args: argparse.Namespace) -> dict[str, float]:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import succeed
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from gateway.config import DeliveryConfig, RouteConfig
    from gateway.delivery.connections import ConnectionCache, Dialer
    from gateway.delivery.manager import QueueManager
    from gateway.delivery.router import Router
    from gateway.delivery.smtp import SmtpTransport
    from gateway.model import Envelope, Recipient, Role, Session
    from gateway.queue.memory import MemorySpool
    from gateway.smtp.client import ClientSettings, TlsPolicy

    work = tempfile.mkdtemp(prefix="outbound-cpu-")
    port = free_port()
    sink = subprocess.Popen(
        ["smtp-sink", "-c", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log_file = open(os.path.join(work, "gateway.log"), "w", encoding="utf-8")  # noqa: SIM115
    try:
        wait_listening(port)
        predicate = LogLevelFilterPredicate(LogLevel.info)
        globalLogBeginner.beginLoggingTo(
            [FilteringLogObserver(textFileLogObserver(log_file), [predicate])],
            redirectStandardIO=False,
        )
        spool = MemorySpool(directory=os.path.join(work, "spool"))
        content = message_bytes(args.size)
        session = Session("127.0.0.1", listener="bench", role=Role.SUBMISSION, may_relay=True)
        rcpts = tuple(Recipient(f"rcpt{i}@dest.test") for i in range(args.recipients))
        for _ in range(args.count):
            incoming = spool.new_message()
            incoming.write(content)
            incoming.commit(Envelope("bench@sender.test", rcpts), session)

        router = Router((RouteConfig("*", f"smtp:[127.0.0.1]:{port}", "none"),))
        cache = ConnectionCache(reactor)
        dialer = Dialer(reactor, ClientSettings("gw.bench.test"), cache)
        made: dict[object, SmtpTransport] = {}

        def transports(route):  # type: ignore[no-untyped-def]
            if route not in made:
                made[route] = SmtpTransport(route.spec, dialer, None, tls=TlsPolicy(route.tls))  # type: ignore[arg-type]
            return made[route]

        manager = QueueManager(
            spool,
            router,
            transports,
            lambda message, failed: succeed(None),
            DeliveryConfig(),
            reactor,
        )
        result: dict[str, float] = {}
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()

        original_remove = spool.remove
        state = {"removed": 0}

        def remove(queue_id: str):  # type: ignore[no-untyped-def]
            state["removed"] += 1
            d = original_remove(queue_id)
            if state["removed"] == args.count:
                reactor.callLater(0, finish)
            return d

        spool.remove = remove  # type: ignore[method-assign]

        def finish() -> None:
            if profiler is not None:
                profiler.disable()
            user, system = cpu_seconds()
            wall = time.perf_counter() - result["wall0"]
            result.update(user=user - result["user0"], system=system - result["system0"], wall=wall)
            manager.stopService()
            d = Deferred.fromCoroutine(dialer.close())
            d.addBoth(lambda _: reactor.stop())

        from twisted.internet.defer import Deferred

        def start() -> None:
            result["user0"], result["system0"] = cpu_seconds()
            result["wall0"] = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            manager.startService()

        def watchdog() -> None:
            # a dead sink or a stuck delivery would otherwise wait for the retry schedule
            if sink.poll() is not None or time.perf_counter() - result["wall0"] > args.timeout:
                result["stuck"] = 1.0
                reactor.stop()
            elif "wall" not in result:
                reactor.callLater(1.0, watchdog)

        reactor.callWhenRunning(start)
        reactor.callWhenRunning(watchdog)
        reactor.run()
        if "stuck" in result:
            raise RuntimeError(
                f"stopped: smtp-sink exit status {sink.poll()}, {state['removed']} of {args.count} delivered"
            )
        left = len(spool.messages)
        if left or "wall" not in result:
            raise RuntimeError(f"{left} messages left undelivered")
        with open(os.path.join(work, "gateway.log"), encoding="utf-8") as log_text:
            failed = sum(1 for line in log_text if "to=<" in line and "status=sent" not in line)
        if failed:
            raise RuntimeError(f"{failed} recipients not sent (see the log)")
        out = {
            "count": args.count,
            "msg_per_s": args.count / result["wall"],
            "cpu_ms_per_msg": 1000 * (result["user"] + result["system"]) / args.count,
            "user_ms_per_msg": 1000 * result["user"] / args.count,
            "sys_ms_per_msg": 1000 * result["system"] / args.count,
            "wall_s": result["wall"],
        }
        if profiler is not None:
            import pstats

            if args.profile_out:
                profiler.dump_stats(args.profile_out)
            stats = pstats.Stats(profiler, stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(25)
        return out
    finally:
        sink.terminate()
        sink.wait()
        log_file.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-out", metavar="FILE", help="with --profile: also save the pstats data")
    parser.add_argument("--json", action="store_true", help="one JSON line (used by --runs)")
    args = parser.parse_args()
    if args.runs > 1:
        results = []
        for run in range(args.runs):
            command = [sys.executable, __file__, "--json", f"--count={args.count}", f"--size={args.size}"]
            command.append(f"--recipients={args.recipients}")
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
            results.append(json.loads(line.splitlines()[-1]))
            r = results[-1]
            print(
                f"run {run + 1}: {r['cpu_ms_per_msg']:.3f} ms CPU/msg (user {r['user_ms_per_msg']:.3f}, "
                f"sys {r['sys_ms_per_msg']:.3f}), {r['msg_per_s']:.0f} msg/s"
            )
        median = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(
            f"median of {args.runs}: {median['cpu_ms_per_msg']:.3f} ms CPU/msg "
            f"(user {median['user_ms_per_msg']:.3f}, sys {median['sys_ms_per_msg']:.3f}), "
            f"{median['msg_per_s']:.0f} msg/s"
        )
        return
    out = run_once(args)
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{out['count']} messages of {args.size} bytes: {out['msg_per_s']:.0f} msg/s, "
            f"{out['cpu_ms_per_msg']:.3f} ms CPU/msg (user {out['user_ms_per_msg']:.3f}, "
            f"sys {out['sys_ms_per_msg']:.3f}; {out['wall_s']:.2f} s)"
        )


if __name__ == "__main__":
    main()
