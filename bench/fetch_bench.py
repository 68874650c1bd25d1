#!/usr/bin/env python3
"""Fetch benchmark: MailGate's poll mode against fetchmail, same mailboxes, same run.

    Dovecot 127.0.0.1 (POP3S / IMAPS) --> MailGate (fetch now) --> smtp-sink 127.0.0.1:2526
    Dovecot 127.0.0.1 (POP3S / IMAPS) --> fetchmail (one run)   --> smtp-sink 127.0.0.1:2526

One Dovecot (tests/integration/peer_dovecot_mail.py) holds M accounts. For every
protocol and account count, the harness loads N messages (spread evenly over the
M mailboxes, written straight into the Maildirs) and then:

- gateway: a fresh gateway (fresh state directory) with M [[fetch.accounts]]
  (interval "1h", keep = false, deliver_to one address routed by [[routes]] to
  smtp:[127.0.0.1]:2526, tls = "none"; filters.fetched = [], no filters) is
  started and polled once while the mailboxes are still empty (its first timed
  polls out of the way), then the mailboxes are loaded and the clock runs from
  the start of `mailgatectl fetch now` until smtp-sink has counted all N;
- fetchmail: one fetchmailrc with the same M accounts (ssl, sslcertck against
  the Dovecot CA, sslcommonname "localhost", fetchall, nokeep, smtphost
  127.0.0.1/2526), one run (`fetchmail -f RC -N --nosyslog`, no daemon), timed
  from its start until smtp-sink has counted all N.

Both use the same protocol and TLS: POP3 over implicit TLS (POP3S) or IMAP over
implicit TLS (IMAPS), the certificate checked against the same CA and name.
Each run gets a fresh smtp-sink; after it the harness checks the sink got
exactly N (no loss, no duplicate), that every mailbox is empty (deleted or
expunged on the server) and, for the gateway, that its spool drained.

Printed per cell: tool, protocol, accounts, N, seconds, messages/s, the ratio
gateway/fetchmail, the CPU seconds of the gateway process (or of fetchmail) and
of Dovecot, the machine's busy CPU and foreign CPU; a table at the end.

    flock /tmp/mailgate-bench.lock /tmp/venv/bin/python bench/fetch_bench.py \
        [--messages 2000] [--size 2048] [--accounts 1,10] [--protocols pop3,imap]
        [--reps 1] [--per-server-sessions N] [--only gateway|fetchmail]
        [--profile DIR [--profile-gil]]

Needs root (Dovecot, smtp-sink -u nobody); fetchmail runs as root (it only warns).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from _sysstat import Snapshot, compare, descendants  # noqa: E402
from relay_bench import (  # noqa: E402
    GATEWAY_PORT,
    HOST,
    SINK_PORT,
    BenchError,
    Gateway,
    Processes,
    Sink,
    gateway_config,
    port_in_use,
    py_spy,
)

from tests.integration.peer_dovecot_mail import DovecotMail  # noqa: E402

RECIPIENT = "rcpt@dest.bench.test"
SENDER = "sender@outside.bench.test"

FETCH_CONFIG = """
[filters]
fetched = []

[fetch]
{fetch_options}
"""


GATEWAY_ACCOUNT = """
[[fetch.accounts]]
name = "{user}"
protocol = "{protocol}"
server = "127.0.0.1"
port = {port}
tls = "implicit"
ca_file = "{ca_file}"
tls_name = "localhost"
username = "{user}"
password_file = "{password_file}"
interval = "1h"
keep = false
deliver_to = ["{recipient}"]
{protocol_options}"""

FETCHMAIL_HEAD = """\
set no bouncemail
set no syslog
set idfile "{idfile}"
poll 127.0.0.1 service {port} protocol {protocol} timeout 60:
"""

FETCHMAIL_USER = (
    '  user "{user}" there with password "{password}" is "bench" here'
    ' ssl sslcertck sslcertfile "{ca_file}" sslcommonname "localhost"'
    ' smtphost "127.0.0.1/{sink_port}" smtpname "{recipient}" fetchall nokeep\n'
)


# --- the mailboxes --------------------------------------------------------------------


def account_names(count: int) -> list[str]:
    return [f"acct{index:02d}" for index in range(count)]


def make_message(serial: int, size: int) -> bytes:
    """A message of about `size` octets with a unique Message-ID (the sink counts, we tell apart)."""
    head = (
        f"Return-Path: <{SENDER}>\r\nFrom: Sender <{SENDER}>\r\nTo: {RECIPIENT}\r\n"
        f"Subject: fetch bench {serial}\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <bench.{serial}.{secrets.token_hex(6)}@outside.bench.test>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; fetch benchmark filler text.\r\n"
    body = (line * (max(0, size - len(head)) // len(line) + 1))[: max(0, size - len(head) - 2)]
    return head + body + b"\r\n"


def fill(dovecot: DovecotMail, users: list[str], total: int, size: int) -> None:
    """`total` messages over `users`' INBOXes (the first ones get one more if it does not divide)."""
    for user in users:
        left = dovecot.messages(user)
        if left:
            raise BenchError(f"mailbox {user} is not empty before loading ({len(left)} messages)")
    for serial in range(total):
        dovecot.deliver(users[serial % len(users)], make_message(serial, size))


def left_on_server(dovecot: DovecotMail, users: list[str]) -> int:
    return sum(len(dovecot.messages(user)) for user in users)


def empty_mailboxes(dovecot: DovecotMail, users: list[str]) -> None:
    """After a failed run: remove what is left so the next cell starts empty."""
    for user in users:
        for sub in ("new", "cur"):
            folder = os.path.join(dovecot.maildir(user), sub)
            for entry in os.listdir(folder):
                os.unlink(os.path.join(folder, entry))


# --- CPU accounting ------------------------------------------------------------------


def tree_cpu(snapshot: Snapshot, root: int) -> float:
    """CPU seconds of `root` and its descendants, reaped children included."""
    return sum(
        snapshot.procs[pid].cpu + snapshot.procs[pid].child_cpu
        for pid in descendants(snapshot.procs, {root})
        if pid in snapshot.procs
    )


# --- one measurement -------------------------------------------------------------------


class Run:
    """What the two tools share: the Dovecot, the processes, the output."""

    def __init__(self, args: argparse.Namespace, procs: Processes, work: str, dovecot: DovecotMail) -> None:
        self.args = args
        self.procs = procs
        self.work = work
        self.dovecot = dovecot
        self.dovecot_pid = dovecot._daemon.process.pid if dovecot._daemon is not None else 0

    def port(self, protocol: str) -> int:
        return self.dovecot.pop3s_port if protocol == "pop3" else self.dovecot.imaps_port

    def timeout(self) -> float:
        return max(180.0, float(self.args.messages) / 5.0)

    def wait_for_sink(
        self, sink: Sink, started: float, proc: subprocess.Popen[Any], wait4: bool = False
    ) -> tuple[float | None, Any]:
        """Until the sink has counted all N and the tool is done, or the timeout.

        Returns when the sink had all N (None if never) and, with `wait4` (fetchmail, reaped
        here), the tool's resource usage."""
        deadline = started + self.timeout()
        delivered_at = tool_done_at = None
        rusage = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if wait4 and proc.returncode is None:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    rusage = usage
            elif not wait4:
                proc.poll()
            if tool_done_at is None and proc.returncode is not None:
                tool_done_at = now
            if delivered_at is None and sink.count() >= self.args.messages:
                delivered_at = now
            if delivered_at is not None and tool_done_at is not None:
                break
            if tool_done_at is not None and now - tool_done_at > 30:
                break  # the tool is done, the sink still short: lost (or very late) mail
            time.sleep(0.005)
        return delivered_at, rusage

    def settle(self, sink: Sink) -> int:
        """The sink's final count, after a second with nothing new (a late duplicate would show)."""
        count = sink.count()
        time.sleep(1.0)
        while sink.count() != count:
            count = sink.count()
            time.sleep(1.0)
        return count

    def result(
        self,
        tool: str,
        protocol: str,
        users: list[str],
        started: float,
        delivered_at: float | None,
        delivered: int,
        before: Snapshot,
        after: Snapshot,
        tool_cpu: float,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        count = self.args.messages
        end = delivered_at if delivered_at is not None else time.monotonic()
        seconds = end - started
        usage = compare(before, after, {os.getpid(), self.dovecot_pid, *extra.pop("roots", ())})
        left = left_on_server(self.dovecot, users)
        return {
            "tool": tool,
            "protocol": protocol,
            "accounts": len(users),
            "messages": count,
            "size": self.args.size,
            "seconds": round(seconds, 3),
            "per_s": round(min(delivered, count) / max(seconds, 1e-9), 1),
            "delivered": delivered,
            "complete": delivered_at is not None,
            "left_on_server": left,
            "tool_cpu_s": round(tool_cpu, 2),
            "dovecot_cpu_s": round(tree_cpu(after, self.dovecot_pid) - tree_cpu(before, self.dovecot_pid), 2),
            **usage,
            **extra,
        }

    # -- the gateway ------------------------------------------------------------------------

    def gateway(self, protocol: str, users: list[str], cell: str) -> dict[str, Any]:
        directory = os.path.join(self.work, "cells", cell + "-gateway")
        os.makedirs(directory, exist_ok=True)
        accounts = []
        for user in users:
            password_file = os.path.join(directory, f"{user}.pass")
            with open(password_file, "w") as handle:
                handle.write(self.dovecot.password(user) + "\n")
            os.chmod(password_file, 0o600)
            accounts.append(
                GATEWAY_ACCOUNT.format(
                    user=user,
                    protocol=protocol,
                    port=self.port(protocol),
                    ca_file=self.dovecot.ca_file,
                    password_file=password_file,
                    recipient=RECIPIENT,
                    # no IDLE watcher fetching while the mailboxes are loaded: only `fetch now`
                    protocol_options="idle = false\n" if protocol == "imap" else "",
                )
            )
        fetch_options = ""
        if self.args.per_server_sessions:
            fetch_options = f"per_server_sessions = {self.args.per_server_sessions}\n"
        config = gateway_config(extra=FETCH_CONFIG.format(fetch_options=fetch_options)) + "".join(accounts)
        sink = Sink(self.procs, directory)
        gw = Gateway(self.procs, directory, self.args.python, config=config)
        profiler = None
        try:
            # the first timed polls (spread over the first seconds) on empty mailboxes: out of the way
            warm = self.ctl(gw, "fetch", "now")
            if warm.returncode != 0 or "error" in warm.stdout:
                raise BenchError(f"warm-up poll failed: {warm.stdout}{warm.stderr}\n{gw.log_tail()}")
            fill(self.dovecot, users, self.args.messages, self.args.size)
            os.sync()
            time.sleep(1.0)
            if self.args.profile:
                profiler = self.procs.start(
                    [
                        py_spy(),
                        "record",
                        "--nonblocking",
                        "--pid",
                        str(gw.pid),
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "-o",
                        os.path.join(self.args.profile, f"{cell}-gateway.txt"),
                        *(["--gil"] if self.args.profile_gil else []),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            if sink.count() or left_on_server(self.dovecot, users) != self.args.messages:
                raise BenchError("the gateway fetched before `fetch now`: the timing would be wrong")
            before = Snapshot.take()
            started = time.monotonic()
            ctl = self.procs.start(
                [self.args.python, "-m", "gateway.cli", "--config", gw.config, "fetch", "now"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=directory,
                env=self.env(),
            )
            delivered_at, _ = self.wait_for_sink(sink, started, ctl)
            after = Snapshot.take()
            if profiler is not None:
                self.procs.stop(profiler, sig=signal.SIGINT)
            answer = ctl.communicate(timeout=60)[0]
            self.procs.stop(ctl)
            delivered = self.settle(sink)
            drain_deadline = time.monotonic() + 30
            while gw.queue_count() and time.monotonic() < drain_deadline:
                time.sleep(0.2)
            gw_cpu = tree_cpu(after, gw.pid) - tree_cpu(before, gw.pid)
            return self.result(
                "gateway",
                protocol,
                users,
                started,
                delivered_at,
                delivered,
                before,
                after,
                gw_cpu,
                {
                    "roots": (gw.pid, sink.proc.pid, ctl.pid),
                    "spool_left": gw.queue_count(),
                    "ctl": answer.strip().splitlines()[-3:],
                    "per_server_sessions": self.args.per_server_sessions or "default",
                },
            )
        finally:
            if profiler is not None:
                self.procs.stop(profiler, sig=signal.SIGINT)
            if not gw.alive():
                print(f"# the gateway died:\n{gw.log_tail()}", file=sys.stderr)
            gw.stop()
            sink.stop()

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def ctl(self, gw: Gateway, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.args.python, "-m", "gateway.cli", "--config", gw.config, *command],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=gw.directory,
            env=self.env(),
            check=False,
        )

    # -- fetchmail -----------------------------------------------------------------------------

    def fetchmail(self, protocol: str, users: list[str], cell: str) -> dict[str, Any]:
        directory = os.path.join(self.work, "cells", cell + "-fetchmail")
        os.makedirs(directory, exist_ok=True)
        rc = os.path.join(directory, "fetchmailrc")
        text = FETCHMAIL_HEAD.format(
            idfile=os.path.join(directory, "fetchids"),
            port=self.port(protocol),
            protocol=protocol.upper(),
        ) + "".join(
            FETCHMAIL_USER.format(
                user=user,
                password=self.dovecot.password(user),
                ca_file=self.dovecot.ca_file,
                sink_port=SINK_PORT,
                recipient=RECIPIENT,
            )
            for user in users
        )
        with open(rc, "w") as handle:
            handle.write(text)
        os.chmod(rc, 0o600)  # fetchmail refuses a readable rc file
        sink = Sink(self.procs, directory)
        try:
            fill(self.dovecot, users, self.args.messages, self.args.size)
            os.sync()
            time.sleep(1.0)
            env = dict(os.environ, HOME=directory, FETCHMAILHOME=directory)
            log_path = os.path.join(directory, "fetchmail.log")
            with open(log_path, "wb") as log:
                before = Snapshot.take()
                started = time.monotonic()
                proc = self.procs.start(
                    ["fetchmail", "-f", rc, "-N", "--nosyslog"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=directory,
                )
                delivered_at, rusage = self.wait_for_sink(sink, started, proc, wait4=True)
                after = Snapshot.take()
            if proc.returncode is None:  # timed out
                self.procs.stop(proc)
            elif proc in self.procs.running:
                self.procs.running.remove(proc)
            delivered = self.settle(sink)
            cpu = (rusage.ru_utime + rusage.ru_stime) if rusage is not None else float("nan")
            with open(log_path, errors="replace") as handle:
                log_lines = [
                    line for line in handle.read().splitlines() if "WARNING: Running as root" not in line
                ]
            return self.result(
                "fetchmail",
                protocol,
                users,
                started,
                delivered_at,
                delivered,
                before,
                after,
                cpu,
                {
                    "roots": (sink.proc.pid, proc.pid),
                    "exit": proc.returncode,
                    "log": log_lines[-3:],
                },
            )
        finally:
            sink.stop()


# --- output -------------------------------------------------------------------------------


def report(result: dict[str, Any], ratio: float | None, out: IO[str] | None) -> None:
    if out is not None:
        out.write(json.dumps(result) + "\n")
        out.flush()
    checks = []
    if result["delivered"] != result["messages"]:
        checks.append(f"SINK GOT {result['delivered']} OF {result['messages']}")
    if result["left_on_server"]:
        checks.append(f"{result['left_on_server']} LEFT ON THE SERVER")
    if result.get("spool_left"):
        checks.append(f"{result['spool_left']} files left in the spool")
    if not result["complete"]:
        checks.append("TIMED OUT")
    print(
        f"# {result['tool']:9} {result['protocol']:4} x{result['accounts']:>2} accounts "
        f"N={result['messages']}: {result['seconds']:7.2f} s {result['per_s']:7.1f} msg/s"
        + (f" ratio {ratio:.1f}x" if ratio is not None else "")
        + f"  {result['tool']} CPU {result['tool_cpu_s']:.2f} s, dovecot CPU {result['dovecot_cpu_s']:.2f} s,"
        f" busy {result['cpu_busy_pct']}% foreign {result['foreign_cpu_pct']}% "
        f"iowait {result['iowait_pct']}%  " + ("; ".join(checks) if checks else "exactly N, mailboxes empty"),
        flush=True,
    )
    if checks and result.get("log"):
        print(f"#   fetchmail: {' | '.join(result['log'])}", flush=True)
    if checks and result.get("ctl"):
        print(f"#   fetch now: {' | '.join(result['ctl'])}", flush=True)


def table(results: list[dict[str, Any]]) -> str:
    cells: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        cells.setdefault((r["protocol"], r["accounts"]), {}).setdefault(r["tool"], []).append(r)

    def med(rows: list[dict[str, Any]] | None, key: str) -> float | None:
        return statistics.median(r[key] for r in rows) if rows else None

    def fmt(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    head = (
        "protocol",
        "accounts",
        "N",
        "fetchmail s",
        "fetchmail msg/s",
        "gateway s",
        "gateway msg/s",
        "ratio",
        "CPU s fm/gw",
        "dovecot CPU s fm/gw",
        "all exact",
    )
    rows = [head]
    for (protocol, accounts), by in sorted(cells.items()):
        fm, gw = by.get("fetchmail"), by.get("gateway")
        fm_rate, gw_rate = med(fm, "per_s"), med(gw, "per_s")
        ratio = gw_rate / fm_rate if fm_rate and gw_rate is not None else None
        exact = all(
            r["delivered"] == r["messages"] and not r["left_on_server"] and not r.get("spool_left")
            for r in (fm or []) + (gw or [])
        )
        count = (fm or gw or [{"messages": 0}])[0]["messages"]
        rows.append(
            (
                protocol.upper() + "S",
                str(accounts),
                str(count),
                fmt(med(fm, "seconds"), 1),
                fmt(fm_rate, 1),
                fmt(med(gw, "seconds"), 1),
                fmt(gw_rate, 1),
                fmt(ratio, 1) + ("x" if ratio is not None else ""),
                f"{fmt(med(fm, 'tool_cpu_s'), 1)}/{fmt(med(gw, 'tool_cpu_s'), 1)}",
                f"{fmt(med(fm, 'dovecot_cpu_s'), 1)}/{fmt(med(gw, 'dovecot_cpu_s'), 1)}",
                "yes" if exact else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=False)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def protocol_list(text: str) -> list[str]:
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in ("pop3", "imap"):
            raise argparse.ArgumentTypeError(f"unknown protocol {name!r} (pop3, imap)")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="messages per cell, over all accounts")
    p.add_argument("--size", type=int, default=2048, help="octets per message")
    p.add_argument("--accounts", type=int_list, default=[1, 10], help="account counts (one cell each)")
    p.add_argument("--protocols", type=protocol_list, default=["pop3", "imap"], help="pop3, imap")
    p.add_argument("--reps", type=int, default=1, help="repetitions of the whole matrix; medians")
    p.add_argument("--only", choices=("gateway", "fetchmail"), help="run one tool only")
    p.add_argument(
        "--per-server-sessions",
        type=int,
        default=0,
        help="the gateway's [fetch] per_server_sessions (0: the config default)",
    )
    p.add_argument("--python", default=sys.executable, help="the Python that runs the gateway")
    p.add_argument("--base", default=tempfile.gettempdir(), help="where the run's work directory goes")
    p.add_argument("--out", help="append one JSON line per measurement to this file")
    p.add_argument("--profile", help="directory: a py-spy raw profile of the gateway per cell")
    p.add_argument(
        "--profile-gil",
        action="store_true",
        help="profile only the thread holding the GIL (Python CPU), not every non-idle thread",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.messages < 1 or not args.accounts or min(args.accounts) < 1:
        p.error("--messages and --accounts must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("fetch_bench: needs root (Dovecot, smtp-sink -u nobody)", file=sys.stderr)
        return 2
    for tool in ("smtp-sink", "dovecot", "fetchmail"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(
                f"fetch_bench: {tool} not found"
                " (apt-get install postfix dovecot-pop3d dovecot-imapd fetchmail)",
                file=sys.stderr,
            )
            return 2
    busy = [port for port in (SINK_PORT, GATEWAY_PORT) if port_in_use(port)]
    if busy:
        print(f"fetch_bench: something already listens on {HOST} port(s) {busy}", file=sys.stderr)
        return 2
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = tempfile.mkdtemp(prefix="fetchbench-", dir=args.base)
    procs = Processes()
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 (closed in finally)
    results: list[dict[str, Any]] = []
    users = account_names(max(args.accounts))
    dovecot = DovecotMail(users={user: f"{user}-{secrets.token_hex(8)}" for user in users})
    try:
        dovecot.start(timeout=60)
        print(
            f"# work directory {work}; {os.cpu_count()} CPUs; {args.messages} messages of {args.size} B; "
            f"accounts {args.accounts}; protocols {args.protocols} over implicit TLS "
            f"(POP3S {dovecot.pop3s_port}, IMAPS {dovecot.imaps_port}); gateway per_server_sessions "
            f"{args.per_server_sessions or 'default'}; no filters (filters.fetched = [])",
            flush=True,
        )
        run = Run(args, procs, work, dovecot)
        for rep in range(args.reps):
            for protocol in args.protocols:
                for count in args.accounts:
                    cell = f"r{rep}-{protocol}-{count}"
                    cell_users = users[:count]
                    fm_rate = None
                    for tool in ("fetchmail", "gateway"):
                        if args.only not in (None, tool):
                            continue
                        try:
                            result = getattr(run, tool)(protocol, cell_users, cell)
                        finally:
                            if left_on_server(dovecot, cell_users):
                                empty_mailboxes(dovecot, cell_users)
                        result["rep"] = rep
                        ratio = None
                        if tool == "fetchmail":
                            fm_rate = result["per_s"]
                        elif fm_rate:
                            ratio = result["per_s"] / fm_rate
                        report(result, ratio, out)
                        results.append(result)
        print(table(results), flush=True)
        return 0
    except KeyboardInterrupt:
        print("# interrupted", file=sys.stderr)
        if results:
            print(table(results))
        return 130
    finally:
        procs.stop_all()
        with contextlib.suppress(Exception):
            dovecot.stop()
        if out is not None:
            out.close()
        if args.keep:
            print(f"# kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
