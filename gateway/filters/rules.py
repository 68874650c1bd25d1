"""Rules ("rules"): the administrator's own rules over envelope, headers, body, attachments, size.

The rules are in a TOML file of their own (`file`; see etc/rules.example.toml
and `gateway.filters._rulefile` for the format), each for inbound mail (and
fetched mail), outbound mail, or both. At the end of DATA the rules of the
message's direction are tried in the file's order:

- a rule whose conditions hold (all of them, or any with ``match = "any"``)
  does what its actions say;
- tag, copy-to, auto-reply and notify add up, rule after rule;
- the first matching rule with reject, quarantine, discard or redirect decides
  the message, and the rules after it are not tried.

The filter answers with one verdict: the deciding action if there is one (with
the tags' headers); else a copy-to (carrying the tags' headers and subject
prefix); else a tag. One verdict carries one copy address: a second copy-to
that matches is logged and not made.

Auto-replies (RFC 3834) and notices go out through the gateway's outbox once the
rules have decided, from the null sender. An auto-reply is never sent to the
null sender, to mail from a list or bulk sender (List-Id, List-Unsubscribe,
Precedence: bulk/list/junk), to automatic mail (Auto-Submitted other than
"no"), to a rejected or discarded message, nor more than once per sender and
rule per `reply_period` (a state store entry). A failing outbox is logged; it
does not change the verdict.

`reload()` (SIGHUP, `mailgatectl reload`) re-reads the rule file and its list
files; a bad file is logged with its file and line and the old rules are kept.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Section
from gateway.content import ParsedMessage
from gateway.filters import FilterServices, Request
from gateway.filters._rulefile import Condition, Rule, RuleSet, load_rules
from gateway.interfaces import IFilter, IReloadable
from gateway.model import CONTINUE, Action, Direction, Stage, Verdict

log = Logger(namespace="mailgate.filter.rules")

AUTOREPLY_TABLE = "rules.auto-reply"
_FINAL = {
    "reject": Action.REJECT,
    "quarantine": Action.QUARANTINE,
    "discard": Action.DISCARD,
    "redirect": Action.REDIRECT,
}
_BULK = frozenset({"bulk", "list", "junk"})


@attrs.frozen
class Decision:
    """What the matching rules said: the deciding rule, and what the others added."""

    matched: tuple[Rule, ...] = ()
    final: Rule | None = None
    headers: tuple[tuple[str, str], ...] = ()
    subject_prefix: str = ""
    copies: tuple[str, ...] = ()
    replies: tuple[Rule, ...] = ()
    notices: tuple[Rule, ...] = ()


def field_values(condition: Condition, request: Request, parsed: ParsedMessage) -> Sequence[str] | int:
    """The values of the message a condition looks at (any may match)."""
    envelope = request.envelope
    field = condition.field
    if field == "sender":
        return [envelope.mail_from] if envelope is not None else []
    if field == "recipient":
        return [recipient.address for recipient in envelope.rcpt_to] if envelope is not None else []
    if field == "subject":
        return [parsed.subject]
    if field == "header":
        return parsed.header(condition.header)
    if field == "attachment":
        return [attachment.filename for attachment in parsed.attachments if attachment.filename]
    if field == "body":
        return [parsed.text]
    assert request.message is not None
    return request.message.size


def decide(rules: Sequence[Rule], request: Request, parsed: ParsedMessage) -> Decision:
    """Try the rules in order (module docstring); pure."""
    matched: list[Rule] = []
    for rule in rules:
        tests = (condition.matches(field_values(condition, request, parsed)) for condition in rule.conditions)
        if all(tests) if rule.match_all else any(tests):
            matched.append(rule)
            if rule.final is not None:
                break
    final = matched[-1] if matched and matched[-1].final is not None else None
    tagging = [rule for rule in matched if "tag" in rule.actions]
    return Decision(
        matched=tuple(matched),
        final=final,
        headers=tuple(header for rule in tagging for header in rule.headers),
        subject_prefix=next((rule.subject_prefix for rule in tagging if rule.subject_prefix), ""),
        copies=tuple(rule.copy_to for rule in matched if "copy-to" in rule.actions),
        replies=tuple(rule for rule in matched if "auto-reply" in rule.actions),
        notices=tuple(rule for rule in matched if "notify" in rule.actions),
    )


def verdict_of(decision: Decision) -> Verdict:
    """The one verdict the chain gets (module docstring)."""
    if not decision.matched:
        return CONTINUE
    names = ", ".join(rule.name for rule in decision.matched)
    headers = decision.headers
    final = decision.final
    if final is not None:
        action = final.final
        assert action is not None
        if action == "reject":
            return Verdict.reject(final.message or "Rejected by policy")
        reason = f"rule {final.name}" + (f": {final.message}" if final.message else "")
        target = final.redirect_to if action == "redirect" else None
        return Verdict(_FINAL[action], reason, headers=headers, target=target)
    if decision.copies:
        if len(decision.copies) > 1:
            log.warn(
                "rules: one copy per message: not copied to {dropped}",
                dropped=", ".join(decision.copies[1:]),
            )
        return Verdict(
            Action.COPY_TO,
            f"rules {names}",
            headers=headers,
            target=decision.copies[0],
            subject_prefix=decision.subject_prefix,
        )
    if headers or decision.subject_prefix:
        return Verdict(Action.TAG, f"rules {names}", headers=headers, subject_prefix=decision.subject_prefix)
    return Verdict(Action.CONTINUE, f"rules {names}")  # only replies or notices


def is_automatic(parsed: ParsedMessage, sender: str) -> str | None:
    """Why a message must get no auto-reply (RFC 3834 section 2), or None."""
    if not sender:
        return "the null sender"
    local = sender.rpartition("@")[0].lower()
    if local in ("mailer-daemon", "postmaster") or local.startswith("owner-") or local.endswith("-request"):
        return "a system address"
    if parsed.header("List-Id") or parsed.header("List-Unsubscribe") or parsed.header("List-Post"):
        return "a mailing list"
    if any(value.strip().lower() in _BULK for value in parsed.header("Precedence")):
        return "bulk mail"
    if any(value.strip().lower() != "no" for value in parsed.header("Auto-Submitted")):
        return "automatic mail"
    return None


def _message(
    sender: str, to: str, subject: str, text: str, hostname: str, extra: Sequence[tuple[str, str]] = ()
) -> bytes:
    from email.message import EmailMessage
    from email.policy import SMTP

    def one_line(value: str) -> str:
        return " ".join(value.split())  # a header from a hostile subject: no CR or LF

    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = one_line(subject)
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = email.utils.make_msgid(domain=hostname)
    for name, value in extra:
        message[name] = one_line(value)
    message.set_content(text)
    return message.as_bytes()


@implementer(IFilter, IReloadable)
class Rules:
    """The administrator's rules (module docstring)."""

    name = "rules"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        path: str,
        *,
        outbox: Callable[[], Any] | None = None,
        store: Callable[[], Any] | None = None,
        hostname: str = "localhost",
    ) -> None:
        self.path = path  # "" = no rule file: the filter has no rules
        self.ruleset: RuleSet = load_rules(path) if path else RuleSet()
        self._outbox = outbox
        self._store = store
        self.hostname = hostname

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Rules:
        import os

        path = options.take("file", str, "")
        if path and not options.source.startswith("<"):
            path = os.path.join(os.path.dirname(os.path.abspath(options.source)), path)
        return cls(
            os.path.normpath(path) if path else "",
            outbox=lambda: services.outbox,
            store=lambda: services.store,
            hostname=services.hostname,
        )

    def reload(self) -> None:
        """Re-read the rule file; on a bad one raise ConfigError and keep the old rules."""
        if not self.path:
            return
        self.ruleset = load_rules(self.path)
        log.info("rules reloaded: {count} rule(s) from {path}", count=len(self.ruleset.rules), path=self.path)

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        if request.message is None:
            return CONTINUE
        direction = "outbound" if request.direction is Direction.OUTBOUND else "inbound"
        rules = self.ruleset.for_direction(direction)  # one snapshot: a reload swaps the whole set
        if not rules:
            return CONTINUE

        def judged(parsed: ParsedMessage) -> Verdict:
            decision = decide(rules, request, parsed)
            verdict = verdict_of(decision)
            self._tell(decision, verdict, request, parsed)
            return verdict

        return request.message.parsed().addCallback(judged)

    # --- auto-replies and notices ------------------------------------------------------

    def _tell(self, decision: Decision, verdict: Verdict, request: Request, parsed: ParsedMessage) -> None:
        refused = verdict.action in (Action.REJECT, Action.DISCARD)
        for rule in decision.replies:
            if not refused:
                self._auto_reply(rule, request, parsed)
        for rule in decision.notices:
            self._notify(rule, verdict, request, parsed)

    def _send(self, what: str, rule: Rule, to: str, message: bytes) -> None:
        if self._outbox is None:
            log.error("rules: rule {rule}: no outbox to send the {what} with", rule=rule.name, what=what)
            return
        sent: Deferred[str] = self._outbox().send("", (to,), message)

        def failed(failure: Any) -> None:
            log.error(
                "rules: rule {rule}: cannot send the {what} to <{to}>: {error}",
                rule=rule.name,
                what=what,
                to=to,
                error=failure.getErrorMessage(),
            )

        sent.addErrback(failed)

    def _auto_reply(self, rule: Rule, request: Request, parsed: ParsedMessage) -> None:
        reply = rule.auto_reply
        envelope = request.envelope
        assert reply is not None and envelope is not None
        sender = envelope.mail_from
        why_not = is_automatic(parsed, sender)
        if why_not is not None:
            log.info("rules: rule {rule}: no auto-reply to {why}", rule=rule.name, why=why_not)
            return
        if self._store is None:
            log.error("rules: rule {rule}: no state store to remember auto-replies", rule=rule.name)
            return
        key = f"{rule.name}\0{sender.lower()}"
        first: Deferred[bool] = self._store().add(AUTOREPLY_TABLE, key, time.time(), reply.period)

        def send(is_first: bool) -> None:
            if not is_first:
                return  # replied to this sender within the period
            message_id = (parsed.header("Message-ID") or [""])[0].strip()
            extra = [("Auto-Submitted", "auto-replied")]
            if message_id:
                extra += [("In-Reply-To", message_id), ("References", message_id)]
            from_address = reply.sender or (envelope.rcpt_to[0].address if envelope.rcpt_to else "")
            subject = reply.subject or f"Auto: {parsed.subject}".strip()
            text = _message(from_address, sender, subject, reply.text, self.hostname, extra)
            self._send("auto-reply", rule, sender, text)

        def failed(failure: Any) -> None:
            log.error(
                "rules: rule {rule}: no auto-reply, the state store failed: {error}",
                rule=rule.name,
                error=failure.getErrorMessage(),
            )

        first.addCallbacks(send, failed)

    def _notify(self, rule: Rule, verdict: Verdict, request: Request, parsed: ParsedMessage) -> None:
        envelope = request.envelope
        assert envelope is not None
        target = rule.notify
        if target == "postmaster":
            if self._outbox is None:
                log.error("rules: rule {rule}: no outbox to notify with", rule=rule.name)
                return
            target = self._outbox().postmaster
        action = verdict.action.value
        lines = [
            f"The rule {rule.name!r} matched a message; the rules' verdict: {action}.",
            "",
            f"Client:     {request.session.peer_host}",
            f"Sender:     <{envelope.mail_from}>",
            f"Recipients: {', '.join(f'<{r.address}>' for r in envelope.rcpt_to)}",
            f"Subject:    {parsed.subject}",
            f"Size:       {request.message.size if request.message is not None else 0} bytes",
        ]
        subject = f"[mailgate] rule {rule.name}: {action}"
        message = _message(
            f"postmaster@{self.hostname}",
            target,
            subject,
            "\n".join(lines) + "\n",
            self.hostname,
            [("Auto-Submitted", "auto-generated")],
        )
        self._send("notice", rule, target, message)
