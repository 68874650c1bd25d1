"""The "rules" filter: each operator and action, as the administrator's mail would meet them."""

from __future__ import annotations

import email
import email.policy
import os
import textwrap
from email.message import EmailMessage
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway.config import ConfigError
from gateway.content import MessageContent
from gateway.filters import FilterServices, Request
from gateway.filters.chain import ChainRunner, Link
from gateway.filters.reload import reload_filters
from gateway.filters.rules import Rules
from gateway.filters.testing import RecordingOutbox
from gateway.interfaces import IFilter, IReloadable
from gateway.model import Action, Direction, Envelope, Recipient, Session, Stage, Verdict
from gateway.state.memory import MemoryStore
from tests.unit.reception_driver import config, fired

CLIENT = Session("192.0.2.10")


def mime(
    subject: str = "hello",
    body: str = "plain words",
    headers: tuple[tuple[str, str], ...] = (),
    files: tuple[tuple[str, bytes], ...] = (),
) -> bytes:
    message = EmailMessage()
    message["From"] = "alice@partner.test"
    message["To"] = "bob@example.com"
    message["Subject"] = subject
    message["Message-ID"] = "<m1@partner.test>"
    for name, value in headers:
        message[name] = value
    message.set_content(body)
    for name, payload in files:
        message.add_attachment(payload, maintype="application", subtype="octet-stream", filename=name)
    return message.as_bytes(policy=email.policy.SMTP)


class Setup:
    """A rule file, the filter over it, a recording outbox and a memory store."""

    def __init__(self, tmp_path: Path, rules: str) -> None:
        self.path = tmp_path / "rules.toml"
        self.path.write_text(textwrap.dedent(rules))
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore(self.clock)
        self.outbox = RecordingOutbox()
        self.filter = Rules(
            str(self.path), outbox=lambda: self.outbox, store=lambda: self.store, hostname="gw.test"
        )

    def check(
        self,
        raw: bytes | None = None,
        sender: str = "alice@partner.test",
        recipients: tuple[str, ...] = ("bob@example.com",),
        direction: Direction = Direction.INBOUND,
    ) -> Verdict:
        envelope = Envelope(sender, tuple(Recipient(address) for address in recipients))
        content = MessageContent.from_bytes(raw if raw is not None else mime())
        request = Request(Stage.DATA, direction, CLIENT, envelope, message=content)
        return fired(self.filter.check(request))


def rule(conditions: str, action: str = 'action = "reject"\nmessage = "no"', extra: str = "") -> str:
    return f'[[rule]]\nname = "r"\ndirection = "both"\n{action}\n{extra}\n{textwrap.dedent(conditions)}'


def when(field: str, test: str) -> str:
    return f'[[rule.if]]\nfield = "{field}"\n{test}\n'


NO = Verdict.reject("no")


def test_provides_filter_and_reload(tmp_path: Path) -> None:
    setup = Setup(tmp_path, rule(when("subject", 'contains = "x"')))
    assert verifyObject(IFilter, setup.filter)
    assert IReloadable.providedBy(setup.filter)
    assert setup.filter.stages == frozenset({Stage.DATA})


# --- each field and operator --------------------------------------------------------


@pytest.mark.parametrize(
    "condition,hit,miss",
    [
        (when("subject", "regex = '^win\\s+big'"), mime("WIN  big now"), mime("you win big")),
        (when("subject", 'equals = "Invoice"'), mime("invoice"), mime("invoice 42")),
        (when("subject", 'contains = "voice"'), mime("Invoice 42"), mime("receipt")),
        (when("subject", 'in = ["a", "b"]'), mime("B"), mime("c")),
        (when("body", 'contains = "wire transfer"'), mime(body="please WIRE TRANSFER now"), mime()),
        (when("header:X-Spam-Flag", 'equals = "yes"'), mime(headers=(("X-Spam-Flag", "YES"),)), mime()),
        (
            when("attachment", "regex = '\\.iso$'"),
            mime(files=(("disk.ISO", b"x"),)),
            mime(files=(("a.pdf", b"x"),)),
        ),
        (when("size", 'above = "2K"'), mime(body="x" * 3000), mime()),
        (when("size", "below = 2000"), mime(), mime(body="x" * 3000)),
    ],
)
def test_each_field_and_operator(tmp_path: Path, condition: str, hit: bytes, miss: bytes) -> None:
    setup = Setup(tmp_path, rule(condition))
    assert setup.check(hit) == NO
    assert setup.check(miss).action is Action.CONTINUE


def test_the_body_is_matched_decoded_from_base64_and_its_charset(tmp_path: Path) -> None:
    setup = Setup(tmp_path, rule(when("body", 'contains = "发票"')))
    message = EmailMessage()
    message["Subject"] = "x"
    message.set_content("请查收发票", charset="gb2312", cte="base64")
    assert b"base64" in message.as_bytes()
    assert setup.check(message.as_bytes(policy=email.policy.SMTP)) == NO


def test_the_subject_is_matched_decoded(tmp_path: Path) -> None:
    setup = Setup(tmp_path, rule(when("subject", 'contains = "rechnung"')))
    assert setup.check(mime("=?iso-8859-1?q?Ihre_Rechnung_f=FCr_M=E4rz?=")) == NO


def test_sender_and_recipient_fields(tmp_path: Path) -> None:
    setup = Setup(
        tmp_path,
        rule(when("sender", "regex = '@partner\\.test$'") + when("recipient", 'equals = "ceo@example.com"')),
    )
    assert setup.check(recipients=("bob@example.com", "ceo@example.com")) == NO  # any recipient
    assert setup.check(recipients=("bob@example.com",)).action is Action.CONTINUE
    assert setup.check(sender="x@elsewhere.test", recipients=("ceo@example.com",)).action is Action.CONTINUE


def test_in_file_lists(tmp_path: Path) -> None:
    (tmp_path / "blocked.txt").write_text("# senders\nspam@bad.test\n")
    setup = Setup(tmp_path, rule(when("sender", 'in_file = "blocked.txt"')))
    assert setup.check(sender="SPAM@bad.test") == NO
    assert setup.check().action is Action.CONTINUE


def test_match_any_all_and_negation(tmp_path: Path) -> None:
    conditions = when("subject", 'contains = "a"') + when("subject", 'contains = "b"')
    every = Setup(tmp_path, rule(conditions))
    assert every.check(mime("a b")) == NO
    assert every.check(mime("a")).action is Action.CONTINUE
    anyone = Setup(tmp_path, rule(conditions, extra='match = "any"'))
    assert anyone.check(mime("a")) == NO
    negated = Setup(tmp_path, rule(when("header:List-Id", "regex = '.'\nnot = true")))
    assert negated.check(mime()) == NO  # no List-Id at all
    assert negated.check(mime(headers=(("List-Id", "<l.example>"),))).action is Action.CONTINUE


def test_case_sensitive_comparisons(tmp_path: Path) -> None:
    setup = Setup(tmp_path, rule(when("subject", 'equals = "URGENT"\ncase_sensitive = true')))
    assert setup.check(mime("URGENT")) == NO
    assert setup.check(mime("urgent")).action is Action.CONTINUE


def test_rules_apply_to_their_direction_only(tmp_path: Path) -> None:
    text = rule(when("subject", 'contains = "x"')).replace('direction = "both"', 'direction = "outbound"')
    setup = Setup(tmp_path, text)
    assert setup.check(mime("x"), direction=Direction.OUTBOUND) == NO
    assert setup.check(mime("x"), direction=Direction.INBOUND).action is Action.CONTINUE
    assert setup.check(mime("x"), direction=Direction.FETCHED).action is Action.CONTINUE


# --- each action ----------------------------------------------------------------------


HIT = when("subject", 'contains = "hit"')


def test_reject_quarantine_discard_redirect(tmp_path: Path) -> None:
    assert Setup(tmp_path, rule(HIT, 'action = "reject"')).check(mime("hit")) == Verdict.reject(
        "Rejected by policy"
    )
    held = Setup(tmp_path, rule(HIT, 'action = "quarantine"\nmessage = "review"')).check(mime("hit"))
    assert held == Verdict(Action.QUARANTINE, "rule r: review")
    assert Setup(tmp_path, rule(HIT, 'action = "discard"')).check(mime("hit")) == Verdict(
        Action.DISCARD, "rule r"
    )
    moved = Setup(tmp_path, rule(HIT, 'action = "redirect"\nredirect_to = "abuse@example.com"')).check(
        mime("hit")
    )
    assert moved == Verdict(Action.REDIRECT, "rule r", target="abuse@example.com")


def test_tag_and_copy_to(tmp_path: Path) -> None:
    tag = Setup(tmp_path, rule(HIT, 'action = "tag"\nheader = "X-Rule: hit"\nsubject_prefix = "[R] "'))
    assert tag.check(mime("hit")) == Verdict(
        Action.TAG, "rules r", headers=(("X-Rule", "hit"),), subject_prefix="[R] "
    )
    copy = Setup(tmp_path, rule(HIT, 'action = "copy-to"\ncopy_to = "archive@example.com"'))
    assert copy.check(mime("hit")) == Verdict(Action.COPY_TO, "rules r", target="archive@example.com")


def test_the_first_deciding_rule_wins_and_earlier_tags_add_up(tmp_path: Path) -> None:
    text = (
        '[[rule]]\nname = "tag"\ndirection = "both"\naction = "tag"\nheader = "X-A: 1"\n'
        + HIT
        + '[[rule]]\nname = "hold"\ndirection = "both"\naction = "quarantine"\n'
        + HIT
        + '[[rule]]\nname = "never"\ndirection = "both"\naction = "reject"\n'
        + HIT
    )
    verdict = Setup(tmp_path, text).check(mime("hit"))
    assert verdict == Verdict(Action.QUARANTINE, "rule hold", headers=(("X-A", "1"),))


def test_a_second_copy_is_not_made_and_tags_ride_on_the_copy(tmp_path: Path) -> None:
    text = (
        '[[rule]]\nname = "c1"\ndirection = "both"\naction = ["copy-to", "tag"]\ncopy_to = "a@example.com"\n'
        'subject_prefix = "[C] "\n'
        + HIT
        + '[[rule]]\nname = "c2"\ndirection = "both"\naction = "copy-to"\ncopy_to = "b@example.com"\n'
        + HIT
    )
    verdict = Setup(tmp_path, text).check(mime("hit"))
    assert (verdict.action, verdict.target, verdict.subject_prefix) == (
        Action.COPY_TO,
        "a@example.com",
        "[C] ",
    )


AUTO = rule(HIT, 'action = "auto-reply"\nreply_text = "We got it."\nreply_period = "1h"')


def replies(setup: Setup) -> list[tuple[str, tuple[str, ...], email.message.Message]]:
    return [(sender, to, email.message_from_bytes(raw)) for sender, to, raw in setup.outbox.sent]


def test_auto_reply_goes_from_the_null_sender_once_per_sender_and_period(tmp_path: Path) -> None:
    setup = Setup(tmp_path, AUTO)
    assert setup.check(mime("hit")).action is Action.CONTINUE
    [(sender, to, reply)] = replies(setup)
    assert (sender, to) == ("", ("alice@partner.test",))
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["In-Reply-To"] == "<m1@partner.test>"
    assert reply["From"] == "bob@example.com"
    assert reply["Subject"] == "Auto: hit"
    assert "We got it." in reply.get_payload()
    setup.check(mime("hit"))
    assert len(setup.outbox.sent) == 1  # once per period
    setup.check(mime("hit"), sender="carol@partner.test")
    assert len(setup.outbox.sent) == 2  # another sender
    setup.clock.advance(3601)
    setup.check(mime("hit"))
    assert len(setup.outbox.sent) == 3  # the period is over


@pytest.mark.parametrize(
    "sender,headers",
    [
        ("", ()),
        ("MAILER-DAEMON@partner.test", ()),
        ("list-request@partner.test", ()),
        ("alice@partner.test", (("List-Id", "<news.partner.test>"),)),
        ("alice@partner.test", (("List-Unsubscribe", "<mailto:u@partner.test>"),)),
        ("alice@partner.test", (("Precedence", "bulk"),)),
        ("alice@partner.test", (("Precedence", "junk"),)),
        ("alice@partner.test", (("Auto-Submitted", "auto-replied"),)),
    ],
)
def test_no_auto_reply_to_bounces_lists_bulk_or_automatic_mail(
    tmp_path: Path, sender: str, headers: tuple[tuple[str, str], ...]
) -> None:
    setup = Setup(tmp_path, AUTO)
    setup.check(mime("hit", headers=headers), sender=sender)
    assert setup.outbox.sent == []


def test_an_auto_reply_still_goes_when_auto_submitted_is_no(tmp_path: Path) -> None:
    setup = Setup(tmp_path, AUTO)
    setup.check(mime("hit", headers=(("Auto-Submitted", "no"),)))
    assert len(setup.outbox.sent) == 1


def test_no_auto_reply_to_a_rejected_message(tmp_path: Path) -> None:
    text = AUTO + rule(HIT, 'action = "reject"').replace('name = "r"', 'name = "r2"')
    setup = Setup(tmp_path, text)
    assert setup.check(mime("hit")).action is Action.REJECT
    assert setup.outbox.sent == []


def test_notify_tells_the_postmaster_or_an_address(tmp_path: Path) -> None:
    setup = Setup(tmp_path, rule(HIT, 'action = ["reject", "notify"]\nmessage = "no"'))
    assert setup.check(mime("=?utf-8?q?hit=0D=0ABcc:_injected?=")) == NO
    [(sender, to, raw)] = setup.outbox.sent
    assert (sender, to) == ("", ("postmaster@example.com",))
    notice = email.message_from_bytes(raw)
    assert notice["Subject"] == "[mailgate] rule r: reject"
    assert notice["Bcc"] is None
    assert "Sender:     <alice@partner.test>" in notice.get_payload()
    other = Setup(tmp_path, rule(HIT, 'action = "notify"\nnotify = "sec@example.com"'))
    other.check(mime("hit"))
    assert other.outbox.sent[0][1] == ("sec@example.com",)


def test_a_failing_outbox_or_store_does_not_change_the_verdict(tmp_path: Path) -> None:
    setup = Setup(tmp_path, rule(HIT, 'action = ["quarantine", "notify"]'))
    setup.outbox.failure = RuntimeError("queue full")
    assert setup.check(mime("hit")).action is Action.QUARANTINE


# --- reload and configuration ---------------------------------------------------------


def test_reload_reads_the_new_rules_and_keeps_the_old_on_a_bad_file(tmp_path: Path) -> None:
    setup = Setup(tmp_path, rule(HIT))
    setup.path.write_text(rule(when("subject", 'contains = "other"')))
    setup.filter.reload()
    assert setup.check(mime("hit")).action is Action.CONTINUE
    assert setup.check(mime("other")) == NO
    setup.path.write_text(rule(when("subject", "regex = '[broken'")))
    with pytest.raises(ConfigError, match=r"rules.toml, line 9: rule\[0\].if\[0\].regex"):
        setup.filter.reload()
    assert setup.check(mime("other")) == NO  # the old rules


def built(text: str, clock: Clock | None = None, outbox: RecordingOutbox | None = None) -> Rules:
    """The filter as the registry builds it from its [filters.rules] table."""
    cfg = config(f"[filters]\ninbound = []\n[filters.rules]\n{text}")
    clock = clock or Clock()
    services = FilterServices(cfg, clock, store=MemoryStore(clock), outbox=outbox or RecordingOutbox())
    section = cfg.filters.section(cfg.source, "rules")
    made = Rules.from_config(section, services)
    section.done()
    return made


def test_the_reload_command_reports_a_bad_rule_file_with_its_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(rule(HIT))
    runner = ChainRunner({Direction.INBOUND: (Link(built(f'file = "{rules}"')),)}, Clock())
    rules.write_text("[[rule]]\nname = 1\n")
    result = reload_filters(runner)
    assert result.failed and "rules.toml, line 2: rule[0].name: must be a string" in result.failed[0][1]


def test_no_file_means_no_rules_and_a_bad_rule_file_stops_the_start(tmp_path: Path) -> None:
    assert built("").ruleset.rules == ()
    bad = tmp_path / "rules.toml"
    bad.write_text('[[rule]]\nname = "r"\ndirection = "in"\n')
    with pytest.raises(ConfigError, match=r"rules.toml, line 3: rule\[0\].direction"):
        built(f'file = "{bad}"')


def test_a_relative_file_is_beside_the_configuration() -> None:
    beside = os.path.join(os.path.dirname(os.path.abspath("mailgate.toml")), "rules.toml")
    with pytest.raises(ConfigError) as raised:
        built('file = "rules.toml"')  # the test configuration's source is "mailgate.toml"
    assert str(raised.value).startswith(f"{beside}: cannot read the rule file")


def test_the_services_give_the_outbox_and_store(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(rule(HIT, 'action = "notify"'))
    cfg = config(f'[filters]\ninbound = ["rules"]\n[filters.rules]\nfile = "{rules}"\n')
    outbox = RecordingOutbox("admin@example.com")
    clock = Clock()
    services = FilterServices(cfg, clock, store=MemoryStore(clock), outbox=outbox)
    built = Rules.from_config(cfg.filters.section(cfg.source, "rules"), services)
    envelope = Envelope("a@partner.test", (Recipient("b@example.com"),))
    request = Request(
        Stage.DATA, Direction.INBOUND, CLIENT, envelope, message=MessageContent.from_bytes(mime("hit"))
    )
    fired(built.check(request))
    assert outbox.sent[0][1] == ("admin@example.com",)


@pytest.mark.parametrize(
    "charset,encoded",
    [
        ("x-no-such-charset", "Überweisung sofort".encode("latin-1")),  # an unknown charset
        ("us-ascii", "Überweisung sofort".encode()),  # a wrong one: 8-bit bytes labelled ASCII
        ("utf-8", b"\xdcberweisung sofort"),  # latin-1 bytes labelled UTF-8
    ],
)
def test_a_body_in_a_wrong_or_unknown_charset_is_still_matched(
    tmp_path: Path, charset: str, encoded: bytes
) -> None:
    setup = Setup(tmp_path, rule(when("body", 'contains = "berweisung sofort"')))
    raw = (
        b"From: a@partner.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + encoded + b"\r\n"
    )
    assert setup.check(raw) == NO
