#!/usr/bin/env python3
"""Relay benchmark: MailGate against a stock Postfix relay, same load, same run.

    smtp-source --> MailGate 127.0.0.1:2527 --> smtp-sink 127.0.0.1:2526
    smtp-source --> Postfix  127.0.0.1:2525 --> smtp-sink 127.0.0.1:2526

For every message size and session count, the same smtp-source load (one
message per connection, one recipient) is sent through Postfix and then
through the gateway, each into a fresh smtp-sink, and the harness prints:

- accepted/s  = messages smtp-source completed (250 after ".") / its wall time;
- delivered/s = messages counted by smtp-sink (its -c counter) / the time from
  smtp-source's start to the last message reaching the sink.

Both sides are durable: Postfix fsyncs each queue file before its 250 (its
default), the gateway commits to its spool (fsync, group commit) before its
250. After each run the harness waits until the relay's queue / spool is
empty again and reports what was left.

    /tmp/venv/bin/python bench/relay_bench.py [--sizes 1024,10240,102400]
        [--sessions 1,20,200] [--count N] [--only gateway|postfix] [--hold 10000]

--hold N (alone, or after the matrix) opens N SMTP sessions to the gateway and
holds them open, then measures the relay rate on 20 other sessions while they
are held, and the gateway process's VmRSS/VmHWM.

Rules the harness keeps (docs/perf-anchors.md §6): everything on 127.0.0.1;
a fresh directory per run and a fresh gateway state directory per cell; no
bulk delete before a measured run (the work directory is deleted only at the
end: wait ~40 s before the next run); foreign CPU, total CPU and listen-queue
overflows are recorded for every cell; every process started is stopped at the
end, also on error or Ctrl-C. Needs root (Postfix instance, smtp-sink -u).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _postfix import PostfixInstance  # noqa: E402
from _sysstat import Snapshot, compare, gateway_fds, gateway_memory, worker_pids  # noqa: E402

HOST = "127.0.0.1"
SINK_PORT = 2526
POSTFIX_PORT = 2525
GATEWAY_PORT = 2527
PY_SPY_EXTRA: list[str] = []  # --profile-gil adds "--gil"
HELO = "client.bench.test"
SENDER = "sender@client.bench.test"
RECIPIENT = "rcpt@dest.bench.test"


def gateway_config(port: int = GATEWAY_PORT, *, inbound: bool = False, extra: str = "") -> str:
    """A benchmarked gateway's configuration; "{state}" stands for its state directory.

    One listener on 127.0.0.1:`port`, everything routed to smtp-sink without
    TLS. A submission listener relaying for 127.0.0.0/8, or with `inbound` an
    Internet one taking mail for dest.bench.test only. `extra` is appended.
    """
    relay = 'domains = ["dest.bench.test"]\nnetworks = []' if inbound else 'networks = ["127.0.0.0/8"]'
    return f"""\
[gateway]
hostname = "gw.bench.test"
state_dir = "{{state}}"
user = ""

[[smtp.listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1:backlog=1024"
role = "{"inbound" if inbound else "submission"}"

[relay]
{relay}

[[routes]]
match = "*"
transport = "smtp:[127.0.0.1]:{SINK_PORT}"
tls = "none"
{extra}"""


class BenchError(Exception):
    pass


# --- processes -------------------------------------------------------------------


class Processes:
    """Every process the harness starts, each in its own session; all stopped at the end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.running.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15.0
    ) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        else:  # its children may still be around in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.running:
            self.running.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            self.stop(proc)


def wait_banner(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process for port {port} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError as error:
            last = error
        time.sleep(0.1)
    raise BenchError(f"nothing answered on {HOST}:{port} within {timeout:.0f} s ({last})")


# --- smtp-sink and smtp-source --------------------------------------------------------

_MESG = re.compile(rb"mesg=(\d+)")


class Sink:
    """smtp-sink on 127.0.0.1:2526 with its running counter (-c) in a file."""

    def __init__(self, procs: Processes, directory: str) -> None:
        self.path = os.path.join(directory, "sink-counter.out")
        self._out = open(self.path, "wb")  # noqa: SIM115 (closed in stop())
        self._in = open(self.path, "rb")  # noqa: SIM115
        self.proc = procs.start(
            ["smtp-sink", "-4", "-c", "-u", "nobody", f"{HOST}:{SINK_PORT}", "1024"],
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        self.procs = procs
        wait_banner(SINK_PORT, 10, self.proc)

    def count(self) -> int:
        """Messages received so far (the last "mesg=N" the sink printed)."""
        self._in.seek(0, os.SEEK_END)
        end = self._in.tell()
        self._in.seek(max(0, end - 256))
        found = _MESG.findall(self._in.read())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        self.procs.stop(self.proc)
        self._out.close()
        self._in.close()


def source_argv(port: int, size: int, sessions: int, count: int) -> list[str]:
    return [
        "smtp-source",
        "-4",
        "-c",
        "-s",
        str(sessions),
        "-m",
        str(count),
        "-l",
        str(size),
        "-M",
        HELO,
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        f"{HOST}:{port}",
    ]


def last_counter(path: str) -> int:
    with open(path, "rb") as f:
        numbers = re.findall(rb"(\d+)\r", f.read())
    return int(numbers[-1]) if numbers else 0


# --- the relays -------------------------------------------------------------------


class Gateway:
    """One gateway process (twistd plugin) with a fresh state directory."""

    def __init__(
        self,
        procs: Processes,
        directory: str,
        python: str,
        config: str | None = None,
        port: int = GATEWAY_PORT,
    ) -> None:
        """`config` is the configuration text ("{state}" in it is the state directory; `gateway_config`)."""
        self.directory = directory
        self.state = os.path.join(directory, "state")
        self.config = os.path.join(directory, "mailgate.toml")
        self.log = os.path.join(directory, "gateway.log")
        os.makedirs(directory, exist_ok=True)
        with open(self.config, "w") as f:
            f.write((gateway_config() if config is None else config).replace("{state}", self.state))
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._log = open(self.log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = procs.start(
            [
                python,
                "-m",
                "twisted",
                "--reactor",
                "epoll",
                "--log-format",
                "text",
                "mailgate",
                "--config",
                self.config,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=env,
        )
        self.procs = procs
        self.pid = self.proc.pid
        wait_banner(port, 60, self.proc)

    def queue_count(self) -> int:
        """Files left in the spool: messages, envelopes and temporary files."""
        count = 0
        for top in ("message", "incoming", "active", "deferred", "hold", "tmp"):
            for _t, _d, files in os.walk(os.path.join(self.state, "spool", top)):
                count += len(files)
        return count

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        code = self.procs.stop(self.proc, timeout=30)
        self._log.close()
        return code

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


# --- one measurement ----------------------------------------------------------------


def measure(
    procs: Processes,
    cell_dir: str,
    target: str,
    port: int,
    size: int,
    sessions: int,
    count: int,
    roots: set[int],
    named: dict[str, int],
    queue_count: Any,
    timeout: float,
    memory_pid: int | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """One smtp-source run into `port`; the relay delivers to a fresh smtp-sink."""
    os.makedirs(cell_dir, exist_ok=True)
    sink = Sink(procs, cell_dir)
    profilers: list[subprocess.Popen[bytes]] = []
    try:
        os.sync()
        time.sleep(1.0)
        counter_path = os.path.join(cell_dir, "source-counter.out")
        err_path = os.path.join(cell_dir, "source-stderr.out")
        before = Snapshot.take()
        with open(counter_path, "wb") as out, open(err_path, "wb") as err:
            started = time.monotonic()
            source = procs.start(source_argv(port, size, sessions, count), stdout=out, stderr=err)
        if profile and memory_pid:
            # the main process, and each SMTP worker in a file of its own
            targets = [(memory_pid, profile)] + [
                (pid, profile.removesuffix(".txt") + f"-worker{number}.txt")
                for number, pid in enumerate(worker_pids(memory_pid), 1)
            ]
            for pid, path in targets:
                profilers.append(
                    procs.start(
                        [
                            py_spy(),
                            "record",
                            "--nonblocking",
                            "--pid",
                            str(pid),
                            "--format",
                            "raw",
                            "--rate",
                            "200",
                            "-o",
                            path,
                            *PY_SPY_EXTRA,
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        source_done = delivered_at = None
        delivered = 0
        rss_max = 0
        next_memory = 0.0
        deadline = started + timeout
        after = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if source_done is None and source.poll() is not None:
                source_done = now
            delivered = sink.count()
            if delivered_at is None and delivered >= count:
                delivered_at = now
            if memory_pid and now >= next_memory:
                rss_max = max(rss_max, gateway_memory(memory_pid)["VmRSS"])
                next_memory = now + 0.25
            if source_done is not None and (delivered_at is not None or delivered >= count):
                break
            if source_done is not None and now - source_done > 30 and delivered_at is None:
                break  # smtp-source gave up or the relay lost messages: stop waiting
            time.sleep(0.005)
        after = Snapshot.take()
        end = time.monotonic()
        if source_done is None:
            procs.stop(source)
            source_done = end
        for profiler in profilers:
            procs.stop(profiler, sig=signal.SIGINT)
        completed = last_counter(counter_path)
        if delivered_at is None:
            delivered_at = end
        with open(err_path, errors="replace") as f:
            source_errors = f.read().strip().splitlines()
        if memory_pid:  # the gateway's SMTP workers, each on its own
            named = {**named, **{f"worker{n}": pid for n, pid in enumerate(worker_pids(memory_pid), 1)}}
        usage = compare(before, after, roots | {os.getpid(), sink.proc.pid, source.pid}, named)
        # the relay's queue must drain: every message delivered and removed
        drain_deadline = time.monotonic() + 60
        left = queue_count()
        while left and time.monotonic() < drain_deadline:
            time.sleep(0.2)
            left = queue_count()
        result: dict[str, Any] = {
            "target": target,
            "size": size,
            "sessions": sessions,
            "count": count,
            "completed": completed,
            "delivered": sink.count(),
            "source_seconds": round(source_done - started, 3),
            "deliver_seconds": round(delivered_at - started, 3),
            "accepted_per_s": round(completed / max(source_done - started, 1e-9), 1),
            "delivered_per_s": round(min(delivered, count) / max(delivered_at - started, 1e-9), 1),
            "queue_left": left,
            "source_exit": source.returncode,
            "source_errors": source_errors[-3:],
            **usage,
        }
        if memory_pid:
            result["rss_max_kib"] = rss_max
            result.update({k.lower() + "_kib": v for k, v in gateway_memory(memory_pid).items()})
        return result
    finally:
        for profiler in profilers:
            procs.stop(profiler, sig=signal.SIGINT)
        sink.stop()


def py_spy() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.path.exists(here) else (shutil.which("py-spy") or "py-spy")


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


# --- the modes ---------------------------------------------------------------------


def count_for(args: argparse.Namespace, size: int) -> int:
    return args.count_large if size >= 65536 else args.count


def run_matrix(
    args: argparse.Namespace, procs: Processes, work: str, out: IO[str] | None, results: list[dict[str, Any]]
) -> None:
    postfix = None
    if args.only in (None, "postfix"):
        postfix = PostfixInstance(os.path.join(work, "postfix"), POSTFIX_PORT, SINK_PORT, args.process_limit)
        postfix.create()
        postfix.start()
    try:
        for rep in range(args.reps):
            for size in args.sizes:
                for sessions in args.sessions:
                    count = count_for(args, size)
                    timeout = max(120.0, count / 20.0)
                    cell = f"r{rep}-{size}-{sessions}"
                    if postfix is not None:
                        master = postfix.master_pid()
                        roots = {master} if master else set()
                        result = measure(
                            procs,
                            os.path.join(work, "cells", cell + "-postfix"),
                            "postfix",
                            POSTFIX_PORT,
                            size,
                            sessions,
                            count,
                            roots,
                            {"postfix": master or 0},
                            postfix.queue_count,
                            timeout,
                        )
                        result["rep"] = rep
                        report(result, out)
                        results.append(result)
                    if args.ceiling:
                        result = measure(
                            procs,
                            os.path.join(work, "cells", cell + "-direct"),
                            "direct",
                            SINK_PORT,
                            size,
                            sessions,
                            count,
                            set(),
                            {},
                            lambda: 0,
                            timeout,
                        )
                        result["rep"] = rep
                        report(result, out)
                        results.append(result)
                    if args.only in (None, "gateway"):
                        gw = Gateway(procs, os.path.join(work, "cells", cell + "-gateway"), args.python)
                        try:
                            profile = os.path.join(args.profile, f"{cell}.txt") if args.profile else None
                            result = measure(
                                procs,
                                gw.directory,
                                "gateway",
                                GATEWAY_PORT,
                                size,
                                sessions,
                                count,
                                {gw.pid},
                                {"gateway": gw.pid},
                                gw.queue_count,
                                timeout,
                                memory_pid=gw.pid,
                                profile=profile,
                            )
                            result["gateway_alive"] = gw.alive()
                            result["rep"] = rep
                        finally:
                            code = gw.stop()
                        result["gateway_exit"] = code
                        if not result["gateway_alive"]:
                            result["gateway_log_tail"] = gw.log_tail()
                        report(result, out)
                        results.append(result)
    finally:
        if postfix is not None:
            counts = postfix.log_counts()
            postfix.stop()
            print(f"# postfix log: {counts}", flush=True)


def run_hold(args: argparse.Namespace, procs: Processes, work: str, out: IO[str] | None) -> dict[str, Any]:
    """Hold N sessions open against the gateway; relay on 20 others meanwhile."""
    directory = os.path.join(work, "hold")
    gw = Gateway(procs, directory, args.python)
    holder = None
    try:
        idle = gateway_memory(gw.pid)
        print(
            f"# hold: gateway pid {gw.pid} (with its SMTP workers) idle VmRSS {idle['VmRSS']} KiB; "
            f"opening {args.hold} sessions",
            flush=True,
        )
        started = time.monotonic()
        holder = procs.start(
            [
                sys.executable,
                os.path.join(HERE, "_holder.py"),
                "--port",
                str(GATEWAY_PORT),
                "--sessions",
                str(args.hold),
                "--sources",
                str(args.hold_sources),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert holder.stdout is not None and holder.stdin is not None
        held_line = ""
        for line in holder.stdout:
            print("# holder:", line.strip(), flush=True)
            if line.startswith("held"):
                held_line = line
                break
        if not held_line:
            raise BenchError(f"the holder exited ({holder.poll()}) before holding its sessions")
        held = dict(kv.split("=") for kv in held_line.split()[1:])
        open_seconds = time.monotonic() - started
        time.sleep(2.0)
        at_hold = gateway_memory(gw.pid)
        fds = gateway_fds(gw.pid)
        print(
            f"# hold: {held['open']} open, {held['failed']} failed in {open_seconds:.1f} s; "
            f"gateway VmRSS {at_hold['VmRSS']} KiB, {fds} fds",
            flush=True,
        )
        size, sessions, count = args.hold_size, args.hold_flow_sessions, args.hold_count
        flow = measure(
            procs,
            os.path.join(directory, "flow"),
            "gateway-hold",
            GATEWAY_PORT,
            size,
            sessions,
            count,
            {gw.pid, holder.pid},
            {"gateway": gw.pid},
            gw.queue_count,
            max(120.0, count / 20.0),
            memory_pid=gw.pid,
            profile=os.path.join(args.profile, "hold.txt") if args.profile else None,
        )
        holder.stdin.write("check\n")
        holder.stdin.flush()
        alive_line = holder.stdout.readline()
        alive = dict(kv.split("=") for kv in alive_line.split()[1:]) if alive_line.startswith("alive") else {}
        final = gateway_memory(gw.pid)
        result = {
            "target": "gateway-hold",
            "held_requested": args.hold,
            "held_open": int(held["open"]),
            "held_failed": int(held["failed"]),
            "open_seconds": round(open_seconds, 1),
            "held_alive_after_flow": int(alive.get("open", -1)),
            "idle_vmrss_kib": idle["VmRSS"],
            "hold_vmrss_kib": at_hold["VmRSS"],
            "gateway_fds": fds,
            "final_vmrss_kib": final["VmRSS"],
            "vmhwm_kib": final["VmHWM"],
            "flow": flow,
            "gateway_alive": gw.alive(),
        }
        holder.stdin.write("quit\n")
        holder.stdin.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):
            holder.wait(30)
        report(result, out)
        return result
    finally:
        if holder is not None:
            procs.stop(holder)
        gw.stop()


# --- output ------------------------------------------------------------------------


def report(result: dict[str, Any], out: IO[str] | None) -> None:
    if out is not None:
        out.write(json.dumps(result) + "\n")
        out.flush()
    if result["target"] == "gateway-hold":
        flow = result["flow"]
        print(
            f"# HOLD {result['held_open']}/{result['held_requested']} sessions open "
            f"(failed {result['held_failed']}, "
            f"still open after the flow: {result['held_alive_after_flow']}); "
            f"gateway VmRSS idle {result['idle_vmrss_kib'] / 1024:.0f} MiB, holding "
            f"{result['hold_vmrss_kib'] / 1024:.0f} MiB, VmHWM {result['vmhwm_kib'] / 1024:.0f} MiB; "
            f"flow {flow['sessions']} sessions x {flow['size']} B: accepted {flow['accepted_per_s']:.0f}/s, "
            f"delivered {flow['delivered_per_s']:.0f}/s ({flow['delivered']}/{flow['count']}, "
            f"spool left {flow['queue_left']}), CPU {flow['cpu_busy_pct']}%, "
            f"foreign {flow['foreign_cpu_pct']}%",
            flush=True,
        )
        return
    extra = ""
    if result["target"] == "gateway":
        extra = (
            f" gw_cpu={result.get('gateway_cpu_pct_1core', '?')}%/core"
            + "".join(
                f" {key.removesuffix('_cpu_pct_1core')}={value}%"
                for key, value in result.items()
                if key.startswith("worker") and key.endswith("_cpu_pct_1core")
            )
            + f" hwm={result.get('vmhwm_kib', 0) / 1024:.0f}MiB"
        )
    print(
        f"# {result['target']:8} {result['size']:>6} B x{result['sessions']:>3}: "
        f"accepted {result['accepted_per_s']:7.1f}/s  delivered {result['delivered_per_s']:7.1f}/s  "
        f"({result['completed']} sent, {result['delivered']} at sink, {result['queue_left']} left)  "
        f"cpu={result['cpu_busy_pct']}% steal={result.get('steal_pct')}% "
        f"foreign={result['foreign_cpu_pct']}% "
        f"overflows={result['listen_overflows']}{extra}",
        flush=True,
    )
    if result["source_errors"]:
        print(f"#   smtp-source: {' | '.join(result['source_errors'])}", flush=True)


def table(results: list[dict[str, Any]]) -> str:
    cells: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        if r["target"] in ("postfix", "gateway", "direct"):
            cells.setdefault((r["size"], r["sessions"]), {}).setdefault(r["target"], []).append(r)

    def med(rows: list[dict[str, Any]] | None, key: str) -> float | None:
        return statistics.median(r[key] for r in rows) if rows else None

    def worst(rows: list[dict[str, Any]] | None, key: str) -> float | None:
        return max(r[key] for r in rows) if rows else None

    def fmt(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    head = (
        "size",
        "sessions",
        "postfix acc/s",
        "postfix del/s",
        "gateway acc/s",
        "gateway del/s",
        "ratio del",
        "CPU% pf/gw",
        "foreign% pf/gw",
        "ceiling/s",
    )
    rows = [head]
    for (size, sessions), by in sorted(cells.items()):
        pf, gw, direct = by.get("postfix"), by.get("gateway"), by.get("direct")
        pf_del, gw_del = med(pf, "delivered_per_s"), med(gw, "delivered_per_s")
        ratio = (gw_del / pf_del) if (pf_del and gw_del is not None) else None
        rows.append(
            (
                f"{size // 1024} KB",
                str(sessions),
                fmt(med(pf, "accepted_per_s")),
                fmt(pf_del),
                fmt(med(gw, "accepted_per_s")),
                fmt(gw_del),
                fmt(ratio, 2),
                f"{fmt(med(pf, 'cpu_busy_pct'))}/{fmt(med(gw, 'cpu_busy_pct'))}",
                f"{fmt(worst(pf, 'foreign_cpu_pct'), 1)}/{fmt(worst(gw, 'foreign_cpu_pct'), 1)}",
                fmt(med(direct, "delivered_per_s")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=False)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=int_list, default=[1024, 10240, 102400], help="message sizes (smtp-source -l)"
    )
    p.add_argument(
        "--sessions", type=int_list, default=[1, 20, 200], help="concurrent sessions (smtp-source -s)"
    )
    p.add_argument("--count", type=int, default=5000, help="messages per cell (sizes under 64 KB)")
    p.add_argument(
        "--count-large", type=int, default=2000, help="messages per cell for sizes of 64 KB and more"
    )
    p.add_argument(
        "--reps", type=int, default=1, help="repetitions of the whole matrix (outer loop); medians"
    )
    p.add_argument("--only", choices=("gateway", "postfix"), help="run one side only")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also measure smtp-source straight into smtp-sink (the load generator's ceiling today)",
    )
    p.add_argument("--hold", type=int, default=0, help="hold this many sessions open against the gateway")
    p.add_argument("--hold-only", action="store_true", help="skip the matrix, run only --hold")
    p.add_argument(
        "--hold-sources", type=int, default=4, help="source addresses 127.0.0.1..K for held sessions"
    )
    p.add_argument("--hold-size", type=int, default=10240)
    p.add_argument("--hold-flow-sessions", type=int, default=20)
    p.add_argument("--hold-count", type=int, default=5000)
    p.add_argument("--process-limit", type=int, default=250, help="Postfix default_process_limit")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the gateway")
    p.add_argument("--base", default=tempfile.gettempdir(), help="where the run's fresh work directory goes")
    p.add_argument("--out", help="append one JSON line per measurement to this file")
    p.add_argument(
        "--profile", help="directory: record a py-spy profile (raw stacks) of the gateway per cell"
    )
    p.add_argument(
        "--profile-gil",
        action="store_true",
        help="profile only the thread holding the GIL (Python CPU), not every non-idle thread",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.hold_only and not args.hold:
        p.error("--hold-only needs --hold N")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("relay_bench: needs root (a private Postfix instance, smtp-sink -u nobody)", file=sys.stderr)
        return 2
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if shutil.which(tool) is None:
            print(f"relay_bench: {tool} not found (apt-get install postfix)", file=sys.stderr)
            return 2
    busy = [port for port in (POSTFIX_PORT, SINK_PORT, GATEWAY_PORT) if port_in_use(port)]
    if busy:
        print(
            f"relay_bench: something already listens on {HOST} port(s) {busy}: stop it first", file=sys.stderr
        )
        return 2
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        if args.profile_gil:
            PY_SPY_EXTRA.append("--gil")
    # SIGTERM/SIGHUP behave like Ctrl-C: unwind through the finally blocks
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = tempfile.mkdtemp(prefix="relaybench-", dir=args.base)
    os.chmod(work, 0o755)  # Postfix's daemons (user postfix) must reach their queue below it
    print(
        f"# work directory {work}; {os.cpu_count()} CPUs; sizes {args.sizes} sessions {args.sessions} "
        f"count {args.count}/{args.count_large}",
        flush=True,
    )
    procs = Processes()
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 (closed in finally)
    results: list[dict[str, Any]] = []
    try:
        if not args.hold_only:
            run_matrix(args, procs, work, out, results)
            print(table(results), flush=True)
        if args.hold:
            run_hold(args, procs, work, out)
        return 0
    except KeyboardInterrupt:
        print("# interrupted", file=sys.stderr)
        if results:
            print(table(results))
        return 130
    finally:
        procs.stop_all()
        if out is not None:
            out.close()
        if args.keep:
            print(f"# kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
            print("# work directory deleted: wait ~40 s before the next run (perf-anchors §6.1)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
