"""The envelope file: a QueuedMessage as a small, readable JSON document (never pickle).

See docs/queue-format.rst for the field list. The state is *not* stored: it is
the directory the file sits in. ``version`` grows by one with every rewrite, so
that after a crash in the middle of a move the newest copy wins.
"""

from __future__ import annotations

import json
from typing import Any

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


def dumps(message: QueuedMessage, version: int, session: dict[str, Any] | None = None) -> bytes:
    """The envelope file's bytes for a message (UTF-8 JSON on one line)."""
    envelope = message.envelope
    document: dict[str, Any] = {
        "format": FORMAT,
        "queue_id": message.queue_id,
        "version": version,
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


def loads(data: bytes, state: str) -> tuple[QueuedMessage, int, dict[str, Any] | None]:
    """(message, version, session) from an envelope file; EnvelopeFormatError if unusable."""
    try:
        document = json.loads(data.decode("utf-8"))
        if document.get("format") != FORMAT:
            raise EnvelopeFormatError(f"unknown envelope format {document.get('format')!r}")
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
