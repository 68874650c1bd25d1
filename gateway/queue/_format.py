"""The envelope: a QueuedMessage as a small, readable JSON document (never pickle).

See docs/queue-format.rst for the field list. A message's first envelope
(version 1) is a header in front of its message file, written with it in one
file (one create, one fsync per commit); every later version is a file of its
own in a state directory, and there the state is *not* stored: it is the
directory the file sits in. ``version`` grows by one with every rewrite, so
that after a crash in the middle of a move the newest copy wins.
"""

from __future__ import annotations

import errno
import json
from typing import IO, Any

from gateway.model import (
    Body,
    Envelope,
    Notify,
    Quarantine,
    QueuedMessage,
    Recipient,
    RecipientState,
    RecipientStatus,
    Ret,
    Session,
)

FORMAT = 1

# The header of a message file: this line (the offset of the message's first
# byte in 10 digits), then the version-1 envelope document, then padding.
HEADER_MAGIC = b"MAILGATE-QUEUE 1 "
HEADER_LINE = len(HEADER_MAGIC) + 11
EMBEDDED_STATES = ("incoming", "hold")  # what a commit can make


class EnvelopeFormatError(ValueError):
    """An envelope file that cannot be read back into a QueuedMessage."""


def _recipient(recipient: Recipient) -> dict[str, Any]:
    fields: dict[str, Any] = {"address": recipient.address}
    if recipient.notify:
        fields["notify"] = sorted(n.value for n in recipient.notify)
    if recipient.orcpt is not None:
        fields["orcpt"] = recipient.orcpt
    return fields


def _recipient_from(fields: dict[str, Any]) -> Recipient:
    return Recipient(
        address=str(fields["address"]),
        notify=frozenset(Notify(n) for n in fields.get("notify", ())),
        orcpt=fields.get("orcpt"),
    )


def session_fields(session: Session) -> dict[str, Any]:
    """What the envelope file records about the connection (for logs and audits)."""
    return {
        "peer_host": session.peer_host,
        "peer_port": session.peer_port,
        "listener": session.listener,
        "role": session.role.value,
        "helo": session.helo,
        "tls": session.tls,
        "tls_cipher": session.tls_cipher,
        "authenticated_user": session.authenticated_user,
        **({"fetched_from": session.fetched_from} if session.fetched_from is not None else {}),
    }


def dumps(
    message: QueuedMessage, version: int, session: dict[str, Any] | None = None, *, state: bool = False
) -> bytes:
    """The envelope file's bytes for a message (UTF-8 JSON on one line).

    `state`: record the message's state in the document (the header of a
    message file is in no state directory).
    """
    envelope = message.envelope
    document: dict[str, Any] = {
        "format": FORMAT,
        "queue_id": message.queue_id,
        "version": version,
        **({"state": message.state} if state else {}),
        "arrived": message.arrived,
        "size": message.size,
        "client": message.client,
        "attempts": message.attempts,
        "next_attempt": message.next_attempt,
        "envelope": {
            "mail_from": envelope.mail_from,
            "rcpt_to": [_recipient(r) for r in envelope.rcpt_to],
            "body": envelope.body.value,
            "smtputf8": envelope.smtputf8,
            "ret": envelope.ret.value if envelope.ret is not None else None,
            "envid": envelope.envid,
            "size": envelope.size,
            "auth": envelope.auth,
        },
        "recipients": [
            {
                **_recipient(state.recipient),
                "status": state.status.value,
                "attempts": state.attempts,
                "last_reply": state.last_reply,
                "code": state.code,
                "dsn": state.dsn,
                "relay": state.relay,
            }
            for state in message.recipients
        ],
    }
    if session is not None:
        document["session"] = session
    if message.quarantine is not None:
        quarantine = message.quarantine
        document["quarantine"] = {
            "reason": quarantine.reason,
            "direction": quarantine.direction,
            "kind": quarantine.kind,
            "hits": [
                {"filter": name, "action": action, "reason": reason, "score": score}
                for name, action, reason, score in quarantine.hits
            ],
        }
    # one line: indent= would switch json to its pure-Python encoder (5x slower)
    return json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n"


def loads(data: bytes, state: str | None) -> tuple[QueuedMessage, int, dict[str, Any] | None]:
    """(message, version, session) from an envelope file; EnvelopeFormatError if unusable.

    `state` is the directory the file is in; None for a message file's header,
    which records its own.
    """
    try:
        document = json.loads(data.decode("utf-8"))
        if document.get("format") != FORMAT:
            raise EnvelopeFormatError(f"unknown envelope format {document.get('format')!r}")
        if state is None:
            state = document.get("state")
            if state not in EMBEDDED_STATES:
                raise EnvelopeFormatError(f"bad state {state!r} in a message file's header")
        fields = document["envelope"]
        ret = fields.get("ret")
        envelope = Envelope(
            mail_from=str(fields["mail_from"]),
            rcpt_to=tuple(_recipient_from(r) for r in fields["rcpt_to"]),
            body=Body(fields.get("body", Body.SEVEN_BIT.value)),
            smtputf8=bool(fields.get("smtputf8", False)),
            ret=Ret(ret) if ret is not None else None,
            envid=fields.get("envid"),
            size=fields.get("size"),
            auth=fields.get("auth"),
        )
        recipients = tuple(
            RecipientState(
                recipient=_recipient_from(r),
                status=RecipientStatus(r["status"]),
                attempts=int(r.get("attempts", 0)),
                last_reply=r.get("last_reply"),
                code=r.get("code"),
                dsn=r.get("dsn"),
                relay=r.get("relay"),
            )
            for r in document["recipients"]
        )
        message = QueuedMessage(
            queue_id=str(document["queue_id"]),
            envelope=envelope,
            recipients=recipients,
            arrived=float(document["arrived"]),
            size=int(document["size"]),
            client=str(document.get("client", "")),
            attempts=int(document.get("attempts", 0)),
            next_attempt=float(document.get("next_attempt", 0.0)),
            state=state,
            quarantine=_quarantine_from(document.get("quarantine")),
        )
        session = document.get("session")
        return message, int(document["version"]), session if isinstance(session, dict) else None
    except EnvelopeFormatError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise EnvelopeFormatError(f"bad envelope file: {error!r}") from None


def _quarantine_from(fields: Any) -> Quarantine | None:
    if fields is None:
        return None
    return Quarantine(
        reason=str(fields["reason"]),
        direction=str(fields.get("direction", "inbound")),
        kind=str(fields.get("kind", "quarantine")),
        hits=tuple(
            (str(hit["filter"]), str(hit["action"]), str(hit.get("reason", "")), float(hit.get("score", 0.0)))
            for hit in fields.get("hits", ())
        ),
    )


def header(message: QueuedMessage, session: dict[str, Any] | None, reserve: int = 0) -> bytes | None:
    """The header in front of a message file: the version-1 envelope, and where the message starts.

    With `reserve`, exactly that many bytes (padded with spaces), or None if
    the envelope does not fit in them.
    """
    document = dumps(message, 1, session, state=True)
    length = HEADER_LINE + len(document)
    if reserve:
        if length > reserve:
            return None
        document += b" " * (reserve - length)
        length = reserve
    return HEADER_MAGIC + b"%010d\n" % length + document


def placeholder(reserve: int) -> bytes:
    """`reserve` bytes written first where the header is only known at the end."""
    return HEADER_MAGIC + b"0000000000\n" + b" " * (reserve - HEADER_LINE)


def read_header(handle: IO[bytes]) -> bytes | None:
    """The envelope document in front of a message file, leaving `handle` at the message.

    None for a message file without a header (written before the header
    existed), with `handle` at its start. EnvelopeFormatError if the header is
    damaged.
    """
    line = handle.read(HEADER_LINE)
    if not (line.startswith(HEADER_MAGIC) and line.endswith(b"\n") and len(line) == HEADER_LINE):
        handle.seek(0)
        return None
    digits = line[len(HEADER_MAGIC) : -1]
    if not digits.isdigit() or int(digits) <= HEADER_LINE:
        raise EnvelopeFormatError(f"bad message file header {line!r}")
    document = handle.read(int(digits) - HEADER_LINE)
    if len(document) != int(digits) - HEADER_LINE:
        raise EnvelopeFormatError("the message file ends inside its header")
    return document


def open_message(path: str) -> IO[bytes]:
    """A stored message file opened for reading at the message's first byte (past its header).

    Raises OSError, also for a damaged header (errno EBADMSG), like `open`.
    """
    handle = open(path, "rb")  # noqa: SIM115 - the caller closes it
    try:
        read_header(handle)
    except EnvelopeFormatError as error:
        handle.close()
        raise OSError(errno.EBADMSG, str(error), path) from None
    except BaseException:
        handle.close()
        raise
    return handle
