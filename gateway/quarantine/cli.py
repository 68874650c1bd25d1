"""`mailgatectl quarantine ...`: list, show, release, delete and train quarantined mail."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from typing import Any

Call = Callable[[dict[str, Any]], Any]


def add_commands(commands: Any) -> None:
    """Register the ``quarantine`` command on mailgatectl's sub-parsers."""
    quarantine = commands.add_parser("quarantine", help="list and decide on quarantined mail")
    actions = quarantine.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list quarantined messages, oldest first")
    listing.add_argument("--since", type=_date, help="quarantined on or after (YYYY-MM-DD[ HH:MM])")
    listing.add_argument("--until", type=_date, help="quarantined before (YYYY-MM-DD[ HH:MM])")
    listing.add_argument("--recipient", default="", help="a recipient address contains this")
    listing.add_argument("--reason", default="", help="the reason or a filter's name contains this")
    listing.add_argument(
        "--kind", choices=["quarantine", "rejected"], default="", help="held or rejected copies"
    )
    for name, text in (
        ("show", "show a message: why it was held, its envelope and its beginning"),
        ("release", "deliver it (a false positive), without running the filters again"),
        ("delete", "delete it"),
        ("train-spam", "teach Bayes it is spam, then delete it"),
        ("train-ham", "teach Bayes it is not spam, then deliver it"),
    ):
        actions.add_parser(name, help=text).add_argument("id")


def _date(text: str) -> float:
    for layout in ("%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return datetime.datetime.strptime(text, layout).timestamp()
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"{text!r} is not a date (write 2026-11-23 or '2026-11-23 08:00')")


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def run(args: argparse.Namespace, call: Call) -> None:
    """Carry out a ``quarantine`` command through the control socket (`call`)."""
    if args.action == "list":
        request = {
            "command": "quarantine.list",
            "since": args.since,
            "until": args.until,
            "recipient": args.recipient,
            "reason": args.reason,
            "kind": args.kind,
        }
        print_list(call(request))
    elif args.action == "show":
        print_show(call({"command": "quarantine.show", "id": args.id}))
    elif args.action in ("train-spam", "train-ham"):
        spam = args.action == "train-spam"
        done = call({"command": "quarantine.train", "id": args.id, "spam": spam})
        print(f"{done}: learned as {'spam and deleted' if spam else 'ham and released'}")
    else:
        done = call({"command": f"quarantine.{args.action}", "id": args.id})
        print(f"{done}: {'released' if args.action == 'release' else 'deleted'}")


def print_list(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("The quarantine is empty")
        return
    print(
        f"{'-Queue ID-':<24} {'-Held at-':<16} {'-Kind-':<10} {'-Score-':>7}  -Sender / Recipients / Reason-"
    )
    for row in rows:
        print(
            f"{row['queue_id']:<24} {_when(row['arrived']):<16} {row['kind']:<10} {row['score']:>7g}  "
            f"<{row['sender']}>"
        )
        print(f"{'':<62}{', '.join(f'<{r}>' for r in row['recipients'])}")
        if row.get("subject"):
            print(f"{'':<62}subject: {row['subject']}")
        print(f"{'':<62}{row['reason']}")
    print(f"-- {len(rows)} message(s).")


def print_show(row: dict[str, Any]) -> None:
    print(f"queue id:   {row['queue_id']}")
    print(f"held at:    {_when(row['arrived'])} ({row['kind']}, {row['direction']})")
    print(f"reason:     {row['reason']}")
    print(f"score:      {row['score']:g}")
    for hit in row["hits"]:
        score = f" score={hit['score']:g}" if hit["score"] else ""
        print(f"filter:     {hit['filter']}={hit['action']}{score}: {hit['reason']}")
    print(f"sender:     <{row['sender']}>")
    for recipient in row["recipients"]:
        print(f"recipient:  <{recipient}>")
    print(f"size:       {row['size']}")
    print()
    print(row["text"], end="" if row["text"].endswith("\n") else "\n")
