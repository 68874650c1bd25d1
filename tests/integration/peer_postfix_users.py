"""A Postfix that knows its users: the internal server for recipient-validation tests.

`PostfixWithUsers` is a `PostfixSink` whose virtual mailbox table lists exact
addresses instead of "any well-formed local part": mail for anyone else is
refused at RCPT by Postfix itself (``smtpd_reject_unlisted_recipient``, on by
default) with "550 5.1.1 <x@internal.test>: Recipient address rejected: User
unknown in virtual mailbox table", as an Exchange with directory lookups does.
Each user has a Maildir of its own, ``mail/<domain>/<local>/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from tests.integration.peers import PostfixSink, ReceivedMessage, _write


class PostfixWithUsers(PostfixSink):
    """A PostfixSink accepting only `users` (full addresses of its domains)."""

    kind = "postfix-users"

    def __init__(self, directory: str | None = None, *, users: Sequence[str], **kwargs: object) -> None:
        super().__init__(directory, **kwargs)  # type: ignore[arg-type]
        self.users = tuple(user.lower() for user in users)
        for user in self.users:
            local, _, domain = user.rpartition("@")
            if not re.fullmatch(r"[a-z0-9_+=-][a-z0-9._+=-]*", local) or domain not in self.domains:
                raise ValueError(f"{user!r} is not a plain address of {', '.join(self.domains)}")

    def _prepare(self) -> None:
        super()._prepare()
        lines = []
        for user in self.users:
            local, _, domain = user.rpartition("@")
            lines.append(f"/^{re.escape(user)}$/ {domain}/{local}/")
        _write(os.path.join(self.etc, "virtual_mailbox"), "\n".join(lines) + "\n")

    def mailbox(self, address: str) -> str:
        """The Maildir of a user, as `ReceivedMessage.mailbox` names it."""
        local, _, domain = address.lower().rpartition("@")
        return f"{domain}/{local}"

    def messages_for(self, address: str) -> list[ReceivedMessage]:
        return [received for received in self.messages() if received.mailbox == self.mailbox(address)]
