"""MAIL FROM / RCPT TO parsing: examples and hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.model import Body, Notify, Recipient, Ret
from gateway.smtp.address import (
    CommandError,
    MailFrom,
    parse_mail_from,
    parse_mailbox,
    parse_rcpt_to,
    xtext_decode,
    xtext_encode,
)


def code_of(call: object) -> str:
    assert callable(call)
    with pytest.raises(CommandError) as caught:
        call()
    reply = caught.value.reply
    return f"{reply.code} {reply.enhanced}"


@pytest.mark.parametrize(
    ("argument", "sender"),
    [
        ("<a@example.org>", "a@example.org"),
        (" <a@example.org>", "a@example.org"),
        ("<>", ""),
        ('<"john doe"@example.org>', '"john doe"@example.org'),
        ('<"a>b@c"@example.org>', '"a>b@c"@example.org'),
        ('<"quoted \\" pair"@example.org>', '"quoted \\" pair"@example.org'),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
        ("<@relay.example,@other.example:user@example.org>", "user@example.org"),
        ("<first.last+tag@sub-domain.example.org>", "first.last+tag@sub-domain.example.org"),
    ],
)
def test_good_senders(argument: str, sender: str) -> None:
    assert parse_mail_from(argument) == MailFrom(sender)


@pytest.mark.parametrize(
    ("argument", "code"),
    [
        ("a@example.org", "501 5.5.2"),
        ("<a@example.org", "501 5.5.2"),
        ("<a@example.org>junk", "501 5.5.2"),
        ("<a@@example.org>", "501 5.1.7"),
        ("<.a@example.org>", "501 5.1.7"),
        ("<a..b@example.org>", "501 5.1.7"),
        ("<a@-example.org>", "501 5.1.7"),
        ("<a@example..org>", "501 5.1.7"),
        ("<a@[300.1.1.1]>", "501 5.1.7"),
        ("<a@[IPv6:zz::1]>", "501 5.1.7"),
        ("<a@[tag:stuff]>", "501 5.1.7"),
        ("<postmaster>", "501 5.1.7"),
        ("<@-bad:a@example.org>", "501 5.1.7"),
        ("<a.example,@b:a@example.org>", "501 5.1.7"),
        ("<a b@example.org>", "501 5.1.7"),
        ("<jörg@example.org>", "553 5.6.7"),
        ("<a@example.org> SIZE", "501 5.5.4"),
        ("<a@example.org> SIZE=1 SIZE=2", "501 5.5.4"),
        ("<a@example.org> RET=ALL", "501 5.5.4"),
        ("<a@example.org> ENVID=bad+zz", "501 5.5.4"),
        ("<a@example.org> SMTPUTF8=yes", "501 5.5.4"),
        ("<a@example.org> X-FOO=1", "555 5.5.4"),
        ("<a@example.org> =1", "501 5.5.4"),
    ],
)
def test_bad_senders(argument: str, code: str) -> None:
    assert code_of(lambda: parse_mail_from(argument)) == code


def test_mail_parameters() -> None:
    parsed = parse_mail_from(
        "<a@example.org> size=123 body=binarymime smtputf8 RET=full ENVID=x+2By AUTH=a+40b"
    )
    assert parsed == MailFrom("a@example.org", 123, Body.BINARY, True, Ret.FULL, "x+y", "a@b")


def test_utf8_is_allowed_with_smtputf8() -> None:
    assert parse_mail_from("<jörg@exämple.org> SMTPUTF8").sender == "jörg@exämple.org"
    assert parse_rcpt_to("<用户@例子.广告>", utf8=True).address == "用户@例子.广告"
    assert code_of(lambda: parse_rcpt_to("<用户@例子.广告>")) == "553 5.6.7"


def test_rcpt_parameters_and_postmaster() -> None:
    assert parse_rcpt_to("<Postmaster>") == Recipient("Postmaster")
    assert parse_rcpt_to("<b@example.com> NOTIFY=delay,failure ORCPT=rfc822;b+40example.com") == Recipient(
        "b@example.com", frozenset({Notify.DELAY, Notify.FAILURE}), "rfc822;b@example.com"
    )
    assert code_of(lambda: parse_rcpt_to("<b@example.com> NOTIFY=SOMETIMES")) == "501 5.5.4"
    assert code_of(lambda: parse_rcpt_to("<b@example.com> ORCPT=b@example.com")) == "501 5.5.4"
    assert code_of(lambda: parse_rcpt_to("<b@example.com> SIZE=1")) == "555 5.5.4"
    assert code_of(lambda: parse_rcpt_to("<b@example.com> NOTIFY=NEVER", esmtp=False)) == "555 5.5.4"
    assert code_of(lambda: parse_rcpt_to("<>")) == "501 5.1.3"


# --- properties ---------------------------------------------------------------------------

ATEXT = st.sampled_from("abcXYZ019!#$%&'*+-/=?^_`{|}~")
atoms = st.text(ATEXT, min_size=1, max_size=10)
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(".".join)
quoted_chars = st.characters(min_codepoint=32, max_codepoint=126)
quoted = st.text(quoted_chars, max_size=15).map(
    lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
ipv4 = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]")
ipv6 = st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]")
mailboxes = st.builds(lambda local, domain: f"{local}@{domain}", dot_strings | quoted, domains | ipv4 | ipv6)
utf8_letters = st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF, categories=["L"])
utf8_mailboxes = st.builds(
    lambda local, domain: f"{local}@{domain}.example",
    st.text(utf8_letters, min_size=1, max_size=8),
    st.text(utf8_letters, min_size=1, max_size=8),
)
xtext_values = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)


@given(mailboxes)
def test_any_valid_mailbox_round_trips(mailbox: str) -> None:
    assert parse_mail_from(f"<{mailbox}>").sender == mailbox
    assert parse_rcpt_to(f"<{mailbox}>").address == mailbox


@given(utf8_mailboxes)
def test_utf8_mailboxes_need_smtputf8(mailbox: str) -> None:
    assert parse_mail_from(f"<{mailbox}> SMTPUTF8").sender == mailbox
    assert code_of(lambda: parse_mail_from(f"<{mailbox}>")) == "553 5.6.7"


@given(mailboxes, st.integers(0, 10**15), st.sampled_from(Body), st.sampled_from(Ret), xtext_values)
def test_parameters_round_trip(mailbox: str, size: int, body: Body, ret: Ret, envid: str) -> None:
    assume(envid.isprintable())
    argument = f"<{mailbox}> SIZE={size} BODY={body.value} RET={ret.value} ENVID={xtext_encode(envid)}"
    assert parse_mail_from(argument) == MailFrom(mailbox, size, body, False, ret, envid)


@given(st.text(max_size=60))
def test_xtext_round_trips(text: str) -> None:
    assert xtext_decode(xtext_encode(text)).encode("latin-1") == text.encode("utf-8")


@given(st.text(max_size=80))
def test_parsers_never_crash(argument: str) -> None:
    for parse in (parse_mail_from, parse_rcpt_to):
        try:
            parse(argument)
        except CommandError as error:
            assert 500 <= error.reply.code < 600


@given(mailboxes)
def test_parse_mailbox_accepts_what_it_returns(mailbox: str) -> None:
    assert parse_mailbox(parse_mailbox(mailbox)) == mailbox
