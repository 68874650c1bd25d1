"""Delivery status notifications (RFC 3464): the bounce the sender gets.

`compose_bounce` writes a multipart/report with three parts, like Postfix:
a human-readable notice, the machine-readable message/delivery-status (per
recipient Final-Recipient, Original-Recipient, Action, Status, Remote-MTA,
Diagnostic-Code) and the returned message, whole (message/rfc822) or only its
headers (text/rfc822-headers, for RET=HDRS and for big messages). The same
function writes the "delayed" notice (Action: delayed) for NOTIFY=DELAY.

`needs_bounce` holds the rules: never to the null sender (no bounce loops),
never for NOTIFY=NEVER, and only if FAILURE was asked for when NOTIFY was given.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence

from gateway.model import Envelope, Notify, QueuedMessage, Recipient, RecipientResult, RecipientState, Ret
from gateway.queue import open_message

FULL_RETURN_LIMIT = 50_000  # like Postfix's bounce_size_limit: bigger messages return headers only
EXPLICIT_FULL_LIMIT = 10 * 1024 * 1024  # RET=FULL asked for: return it whole up to this size
HEADER_LIMIT = 256 * 1024  # most header bytes returned

_REPLY = re.compile(
    r"^(?P<code>[245]\d\d)(?: (?P<enhanced>[245]\.\d{1,3}\.\d{1,3}))?(?: |$)(?P<text>.*)$", re.S
)
_RELAY_HOST = re.compile(r"^(?P<host>[^\[\s]+)\[[^\]]*\](?::\d+)?$")

Failed = RecipientState | tuple[Recipient, RecipientResult | str]


def needs_bounce(envelope: Envelope, recipient: Recipient) -> bool:
    """Whether a permanent failure of `recipient` is reported to the sender."""
    if envelope.mail_from == "":
        return False  # never bounce a bounce (RFC 5321 6.1)
    if Notify.NEVER in recipient.notify:
        return False
    return not recipient.notify or Notify.FAILURE in recipient.notify


def needs_delay_notice(envelope: Envelope, recipient: Recipient, *, by_default: bool = False) -> bool:
    """Whether a "still trying" notice is due: NOTIFY=DELAY asked, or `by_default` without NOTIFY."""
    if envelope.mail_from == "" or Notify.NEVER in recipient.notify:
        return False
    return Notify.DELAY in recipient.notify or (by_default and not recipient.notify)


def _one_line(text: str) -> str:
    return re.sub(r"[\r\n]+", " ", text).strip()


def _normalise(entry: Failed) -> tuple[Recipient, str, str]:
    """(recipient, reply text "550 5.1.1 ...", relay) from either shape of input."""
    if isinstance(entry, RecipientState):
        text = entry.last_reply or "delivery failed"
        if not _REPLY.match(text):  # our own reason, or "host X said: ...": put the code in front
            text = " ".join(p for p in (str(entry.code or 550), entry.dsn, text) if p)
        return entry.recipient, _one_line(text), entry.relay or "none"
    recipient, outcome = entry
    if isinstance(outcome, RecipientResult):
        reply = " ".join(p for p in (str(outcome.code), outcome.enhanced, outcome.text) if p)
        return recipient, _one_line(reply), outcome.relay
    return recipient, _one_line(outcome), "none"


def _status(reply: str, delayed: bool) -> str:
    match = _REPLY.match(reply)
    if match and match.group("enhanced"):
        return match.group("enhanced")
    if match:
        return f"{match.group('code')[0]}.0.0"
    return "4.0.0" if delayed else "5.0.0"


def _diagnostic(reply: str, relay: str) -> str | None:
    """The remote server's own reply, for Diagnostic-Code; None for our own reasons."""
    if relay == "none" or relay.startswith("maildir:"):
        return None
    match = _REPLY.match(reply)
    if not match:
        return None
    text = match.group("text")
    said = text.find(" said: ")
    if said >= 0:
        remote = re.sub(r" \(in reply to [^)]*\)$", "", text[said + 7 :])
        return f"smtp; {remote}"
    return f"smtp; {reply}"


def _remote_mta(relay: str) -> str | None:
    match = _RELAY_HOST.match(relay)
    return f"dns; {match.group('host')}" if match else None


def _read_original(path: str, headers_only: bool) -> bytes:
    with open_message(path) as original:
        if not headers_only:
            return original.read()
        head = original.read(HEADER_LIMIT)
    end = head.find(b"\r\n\r\n")
    return head[: end + 2] if end >= 0 else head


def compose_bounce(
    *,
    hostname: str,
    message: QueuedMessage,
    failed: Sequence[Failed],
    original_path: str,
    now: float,
    delayed: bool = False,
) -> bytes:
    """The bounce (or, with `delayed`, the delay notice) for some recipients, as bytes.

    Its envelope sender is the null sender <>; its recipient is the message's sender.
    """
    envelope = message.envelope
    entries = [_normalise(entry) for entry in failed]
    boundary = f"{message.queue_id}.{secrets.token_hex(8)}/{hostname}"
    ret = envelope.ret
    limit = EXPLICIT_FULL_LIMIT if ret is Ret.FULL else FULL_RETURN_LIMIT
    headers_only = ret is Ret.HDRS or message.size > limit
    subject = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    out: list[str] = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: <{envelope.mail_from}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: <{int(now)}.{message.queue_id}.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {hostname}.",
        "",
    ]
    if delayed:
        out += [
            "Your message could not be delivered yet to one or more recipients.",
            "It will be retried until it is too old; you need not send it again.",
        ]
    else:
        out += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "The mail system",
        ]
    out.append("")
    for recipient, reply, _relay in entries:
        out.append(f"<{recipient.address}>: {reply}")
    out += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Mailgate-Queue-ID: {message.queue_id}",
    ]
    if envelope.envid:
        out.append(f"Original-Envelope-Id: {_one_line(envelope.envid)}")
    out.append(f"Arrival-Date: {email.utils.formatdate(message.arrived, localtime=False)}")
    for recipient, reply, relay in entries:
        out += ["", f"Final-Recipient: rfc822; {recipient.address}"]
        if recipient.orcpt and ";" in recipient.orcpt:
            kind, _, address = recipient.orcpt.partition(";")
            out.append(f"Original-Recipient: {kind.strip()}; {_one_line(address)}")
        out.append(f"Action: {'delayed' if delayed else 'failed'}")
        out.append(f"Status: {_status(reply, delayed)}")
        remote = _remote_mta(relay)
        if remote:
            out.append(f"Remote-MTA: {remote}")
        diagnostic = _diagnostic(reply, relay)
        if diagnostic:
            out.append(f"Diagnostic-Code: {diagnostic}")
        else:
            out.append(f"X-Mailgate-Reason: {reply}")
    content_type = "text/rfc822-headers" if headers_only else "message/rfc822"
    description = "Undelivered Message Headers" if headers_only else "Undelivered Message"
    out += [
        "",
        f"--{boundary}",
        f"Content-Description: {description}",
        f"Content-Type: {content_type}",
        "Content-Transfer-Encoding: 8bit",
        "",
        "",
    ]
    head = "\r\n".join(out).encode("utf-8")
    try:
        original = _read_original(original_path, headers_only)
    except OSError as error:
        original = f"(the message could not be read: {error.strerror})\r\n".encode()
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    return head + original + f"\r\n--{boundary}--\r\n".encode()
