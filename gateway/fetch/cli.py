"""`mailgatectl fetch now [ACCOUNT]` and `mailgatectl fetch status`."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from typing import Any

Call = Callable[..., Any]


def add_commands(commands: Any) -> None:
    """Register the ``fetch`` command on mailgatectl's sub-parsers."""
    fetch = commands.add_parser("fetch", help="poll external mailboxes now; their counters")
    actions = fetch.add_subparsers(dest="action", required=True)
    actions.add_parser("now", help="poll one account (or all) at once").add_argument("account", nargs="?")
    actions.add_parser("status", help="each fetch account's polls, messages and errors")


def _when(stamp: object) -> str:
    if not isinstance(stamp, (int, float)) or not stamp:
        return "never"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


def run(args: argparse.Namespace, call: Call) -> None:
    """Carry out a ``fetch`` command through the control socket (`call(request, timeout=...)`)."""
    if args.action == "now":
        # answered when the polls are over: a big mailbox takes a while
        for result in call({"command": "fetch.now", "account": args.account}, timeout=3600):
            line = f"{result['account']}: {result['messages']} message(s)"
            line += f", {result['deleted']} deleted on the server"
            if result.get("moved"):
                line += f", {result['moved']} moved"
            if result.get("left"):
                line += f", {result['left']} left for the next poll"
            if result.get("oversized"):
                line += f", {result['oversized']} over max_size (left on the server)"
            if result.get("error"):
                line += f"; error: {result['error']}"
            print(line)
        return
    report = call({"command": "fetch.status"})
    if not report:
        print("no fetch accounts are configured")
    for name, state in report.items():
        print(
            f"{name} ({state['protocol']} {state['username']}@{state['server']}): polls {state['polls']},"
            f" messages {state['messages']}, bytes {state['bytes']}, errors {state['errors']};"
            f" last success {_when(state['last_success'])}"
            + (f"; in IDLE: {', '.join(state['idle'])}" if state.get("idle") else "")
            + (f"; last error: {state['last_error']}" if state.get("last_error") else "")
        )
