"""`mailgatectl`: the operator's command line.

    mailgatectl [--config FILE] queue list | show ID | hold ID | release ID | delete ID | flush [ID]
    mailgatectl [--config FILE] status
    mailgatectl [--config FILE] config check
    mailgatectl [--config FILE] filters [--available]
    mailgatectl [--config FILE] reload
    mailgatectl passwd USER          (prints a credentials-file line for USER)

The queue, status and reload commands talk to the running gateway over its
control socket; when the gateway is not running they say so, in one line, and
exit with status 1. `config check` and `filters` read the configuration only; a
bad one is reported in one line with its file and line, and status 2.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import socket
import sys
from typing import Any

from gateway import config as configuration
from gateway.bayes import cli as bayes_cli
from gateway.fetch import cli as fetch_cli
from gateway.quarantine import cli as quarantine_cli

DEFAULT_CONFIG = "/etc/mailgate/mailgate.toml"


class CommandError(Exception):
    """Something the operator can fix; printed as one line."""


def find_config(path: str | None) -> configuration.Config:
    if path is None:
        path = os.environ.get("MAILGATE_CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return configuration.load(path)


def call(socket_path: str, request: dict[str, Any], timeout: float = 30.0) -> Any:
    """Send one request to the gateway and return its result."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(socket_path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise CommandError(
            f"the gateway is not running (no control socket at {socket_path}); start it with: twistd mailgate"
        ) from None
    except PermissionError:
        raise CommandError(f"permission denied on {socket_path}: run as root or the gateway's user") from None
    except OSError as error:
        raise CommandError(f"cannot talk to the gateway at {socket_path}: {error}") from None
    if not reply:
        raise CommandError("the gateway closed the control connection without answering")
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise CommandError(str(answer.get("error")))
    return answer["result"]


def _when(stamp: object) -> str:
    if not isinstance(stamp, (int, float)) or not stamp:
        return "-"
    return datetime.datetime.fromtimestamp(stamp).strftime("%a %b %d %H:%M:%S")


def print_queue(rows: list[dict[str, Any]]) -> None:
    """A listing in the spirit of `postqueue -p`."""
    if not rows:
        print("Mail queue is empty")
        return
    print(
        f"{'-Queue ID-':<24} {'-State-':<9} {'--Size--':>9} {'----Arrival Time----':<20} "
        "-Sender/Recipient-------"
    )
    total = 0
    for row in rows:
        if row["state"] == "corrupt":
            print(f"{row['queue_id']:<24} {'corrupt':<9}")
            continue
        total += int(row["size"])
        sender = row["sender"] or "MAILER-DAEMON"
        print(
            f"{row['queue_id']:<24} {row['state']:<9} {row['size']:>9} {_when(row['arrived']):<20} {sender}"
        )
        for recipient in row["recipients"]:
            if recipient["status"] != "pending":
                continue
            if recipient["last_reply"]:
                print(f"{'':<45}({recipient['last_reply']})")
            print(f"{'':<66}{recipient['address']}")
        if row["state"] == "deferred":
            print(f"{'':<45}next attempt {_when(row['next_attempt'])}, after {row['attempts']} attempts")
    print(f"-- {total // 1024} Kbytes in {len(rows)} Requests.")


def print_show(shown: dict[str, Any]) -> None:
    print(f"queue id:  {shown['queue_id']}")
    print(f"state:     {shown['state']}")
    print(f"arrived:   {_when(shown['arrived'])}")
    print(f"size:      {shown['size']}")
    print(f"sender:    <{shown['sender']}>")
    print(f"attempts:  {shown['attempts']}; next attempt {_when(shown['next_attempt'])}")
    for recipient in shown["recipients"]:
        line = f"recipient: <{recipient['address']}> {recipient['status']}"
        if recipient["relay"]:
            line += f" via {recipient['relay']}"
        if recipient["last_reply"]:
            line += f" ({recipient['last_reply']})"
        print(line)
    print()
    print(shown["headers"], end="")


def config_check(cfg: configuration.Config) -> None:
    build_chains(cfg)  # the filters' options too: a bad one is found before a restart
    print(f"{cfg.source}: configuration is valid")
    for key, value in configuration.non_defaults(cfg):
        print(f"{key} = {json.dumps(value) if not isinstance(value, str) else value}")


class _NotConnected:
    """Stands in for DNS, the state store and the connection counter in `filters`.

    Building the chains to print them must not open, create or connect to
    anything: whatever a filter asks of this at build time answers None.
    """

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def build_chains(cfg: configuration.Config) -> Any:
    """The chains built as the gateway builds them, but connected to nothing."""
    from twisted.internet.testing import MemoryReactorClock

    from gateway.filters import FilterServices
    from gateway.filters.registry import build_runner

    unused = _NotConnected()
    reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]  # records; never connects
    services = FilterServices(cfg, reactor, anvil=unused, store=unused, dns=unused)
    return build_runner(cfg, services)


def print_filters(cfg: configuration.Config) -> None:
    """The effective chains, in order."""
    from gateway.filters.registry import describe

    for line in describe(build_chains(cfg)):
        print(line)


def print_available(cfg: configuration.Config) -> None:
    """Every filter name a chain may use, and where it comes from."""
    from gateway.filters.registry import BUILTIN, ENTRY_POINT_GROUP, available

    known = available(cfg.source)
    width = max(len(name) for name in known)
    spec_width = max(len(spec) for spec in known.values())
    for name, spec in known.items():
        origin = "built in" if name in BUILTIN else f"entry point ({ENTRY_POINT_GROUP})"
        print(f"{name:<{width}}  {spec:<{spec_width}}  {origin}")


def print_filter_counters(counters: dict[str, Any]) -> None:
    """One line per filter: calls, what it said, failures, average time (workers report every 5 s)."""
    for name, numbers in sorted(counters.items()):
        calls = numbers["calls"]
        said = ", ".join(f"{action} {count}" for action, count in sorted(numbers["actions"].items()))
        average = 1000 * numbers["seconds"] / calls if calls else 0.0
        print(
            f"filter {name}: {calls} checks{'; ' + said if said else ''};"
            f" {numbers['failures']} failed ({numbers['timeouts']} timed out); {average:.2f} ms on average"
        )
        for key, count in sorted(numbers.get("details", {}).items(), key=lambda item: (-item[1], item[0])):
            print(f"    {key}: {count}")


def print_dns(numbers: dict[str, int]) -> None:
    """The filters' DNS, for all SMTP processes (the main process asks for the workers)."""
    asked = numbers["questions"] + numbers["cache_hits"]
    share = 100 * numbers["cache_hits"] / asked if asked else 0.0
    print(
        f"dns: {numbers['questions']} questions to the name servers, {numbers['cache_hits']}"
        f" answered from the cache ({share:.0f} %); {numbers['cached']} answers cached,"
        f" {numbers['in_flight']} questions in flight"
    )


def passwd(user: str) -> None:
    from gateway.smtp.auth import hash_password

    if ":" in user or not user:
        raise CommandError("a user name may not be empty or contain ':'")
    first = getpass.getpass(f"password for {user}: ")
    if sys.stdin.isatty() and getpass.getpass("again: ") != first:
        raise CommandError("the passwords differ")
    print(f"{user}:{hash_password(first)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgatectl", description="Operate a running MailGate gateway.")
    parser.add_argument(
        "-c", "--config", help=f"the configuration file (default {DEFAULT_CONFIG} if present)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    queue = commands.add_parser("queue", help="list and manage the mail queue")
    actions = queue.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list the queue (like postqueue -p)")
    for name, text in (
        ("show", "show one message's envelope, recipients and headers"),
        ("hold", "put a message on hold: no delivery until released"),
        ("release", "release a held message"),
        ("delete", "delete a message from the queue"),
    ):
        actions.add_parser(name, help=text).add_argument("id")
    actions.add_parser("flush", help="deliver deferred mail now").add_argument("id", nargs="?")
    commands.add_parser("status", help="is the gateway running; queue counts")
    check = commands.add_parser("config", help="check the configuration")
    check.add_argument("action", choices=["check"])
    filters = commands.add_parser("filters", help="print the filter chains in order")
    filters.add_argument("--available", action="store_true", help="list the filters a chain may use")
    commands.add_parser("reload", help="make the running gateway re-read its list files")
    commands.add_parser("passwd", help="print a credentials-file line for a user").add_argument("user")
    quarantine_cli.add_commands(commands)
    bayes_cli.add_commands(commands)
    fetch_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "passwd":
            passwd(args.user)
            return 0
        cfg = find_config(args.config)
        if args.command == "config":
            config_check(cfg)
            return 0
        if args.command == "bayes":
            return bayes_cli.run(args, cfg)  # on the token database itself, like sa-learn
        if args.command == "filters":
            (print_available if args.available else print_filters)(cfg)
            return 0
        sock = cfg.control_socket
        if args.command == "status":
            status = call(sock, {"command": "status"})
            queue = ", ".join(f"{k} {v}" for k, v in status["queue"].items())
            print(f"mailgate is running (pid {status['pid']}, up {status['uptime']:.0f} s); queue: {queue}")
            print_filter_counters(status.get("filters", {}))
            if "dns" in status:
                print_dns(status["dns"])
        elif args.command == "reload":
            print(call(sock, {"command": "reload"}))
        elif args.command == "quarantine":
            quarantine_cli.run(args, lambda request: call(sock, request))
        elif args.command == "fetch":
            fetch_cli.run(args, lambda request, **options: call(sock, request, **options))
        elif args.action == "list":
            print_queue(call(sock, {"command": "queue.list"}))
        elif args.action == "show":
            print_show(call(sock, {"command": "queue.show", "id": args.id}))
        elif args.action == "flush":
            count = call(sock, {"command": "queue.flush", "id": args.id})
            print(f"flushed {count} message(s)")
        else:
            done = call(sock, {"command": f"queue.{args.action}", "id": args.id})
            print(f"{done}: {args.action} done")
    except configuration.ConfigError as error:
        print(f"mailgatectl: {error}", file=sys.stderr)
        return 2
    except CommandError as error:
        print(f"mailgatectl: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
