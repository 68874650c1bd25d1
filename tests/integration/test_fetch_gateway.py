"""Poll mode in the real gateway (twistd) against a real Dovecot: a POP3 account, an IMAP
account and a multidrop mailbox from the documented config; `mailgatectl fetch now`, ETRN,
nothing fetched twice across a restart, and the fetched chain holding a virus-like rule hit."""

from __future__ import annotations

import os
import smtplib
from collections.abc import Iterator

import pytest

from tests.integration.gateway import GatewayProcess, gateway_config, maildir_messages, wait_until
from tests.integration.peer_dovecot_mail import DovecotMail
from tests.integration.peers import free_port, require_program

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotMail]:
    require_program("dovecot")
    peer = DovecotMail(
        users={"sales": "sales-secret-1", "info": "info-secret-2", "public": "public-secret-3"}
    )
    peer.start(timeout=60)
    yield peer
    peer.stop()


def message(to: str, subject: str, extra: str = "") -> bytes:
    return (
        f"Return-Path: <alice@outside.test>\r\nFrom: alice@outside.test\r\nTo: {to}\r\n{extra}"
        f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@outside.test>\r\n\r\nhello\r\n"
    ).encode()


def accounts(dovecot: DovecotMail, directory: str) -> str:
    tables = []
    for user, protocol, port, tls, target in (
        ("sales", "pop3", dovecot.pop3s_port, "implicit", 'deliver_to = ["sales@corp.example"]'),
        ("info", "imap", dovecot.imap_port, "starttls", 'deliver_to = ["info@corp.example"]\nkeep = true'),
        (
            "public",
            "pop3",
            dovecot.pop3_port,
            "starttls",
            '[fetch.accounts.multidrop]\nlocal_domains = ["outside.test"]\n'
            'local_parts = { bob = "bob@corp.example", carol = "carol@corp.example" }',
        ),
    ):
        secret = os.path.join(directory, f"{user}.pass")
        with open(secret, "w") as handle:
            handle.write(dovecot.password(user) + "\n")
        os.chmod(secret, 0o600)
        tables.append(
            f"""
[[fetch.accounts]]
name = "{user}"
protocol = "{protocol}"
server = "127.0.0.1"
port = {port}
tls = "{tls}"
ca_file = "{dovecot.ca_file}"
tls_name = "localhost"
username = "{user}"
password_file = "{secret}"
interval = "1h"
{target}
"""
        )
    return f"""
[gateway]
postmaster = "postmaster@corp.example"
[filters]
fetched = ["rules"]
[filters.rules]
file = "{directory}/rules.toml"
[fetch]
on_refusal = "quarantine"
{"".join(tables)}
"""


def test_accounts_are_fetched_on_demand_filtered_and_never_twice(
    dovecot: DovecotMail, tmp_path: os.PathLike[str]
) -> None:
    directory = str(tmp_path)
    with open(f"{directory}/rules.toml", "w") as rules:
        rules.write(
            '[[rule]]\nname = "no-invoices"\ndirection = "inbound"\naction = "reject"\n'
            '[[rule.if]]\nfield = "subject"\ncontains = "invoice"\n'
        )
    text = gateway_config(
        directory, free_port(), domains=("corp.example",), extra=accounts(dovecot, directory)
    )
    # the test config has its own [gateway]: merge the postmaster line into it
    text = text.replace('[gateway]\npostmaster = "postmaster@corp.example"\n', "")
    text = text.replace(
        'hostname = "gw.test"', 'hostname = "gw.test"\npostmaster = "postmaster@corp.example"'
    )
    gateway = GatewayProcess(directory, text, int(text.split("tcp:")[1].split(":")[0]))
    dovecot.deliver("sales", message("sales@outside.test", "order 1"))
    dovecot.deliver("sales", message("sales@outside.test", "your invoice"))
    dovecot.deliver("info", message("info@outside.test", "question"))
    dovecot.deliver("public", message("bob@outside.test", "for bob", "Delivered-To: bob@outside.test\r\n"))
    dovecot.deliver("public", message("dave@outside.test", "for dave", "Delivered-To: dave@outside.test\r\n"))
    mail = os.path.join(directory, "mail", "corp.example")
    try:
        gateway.start()
        done = gateway.ctl("fetch", "now").stdout  # (the first timed polls may have begun already)
        assert all(f"{name}: " in done for name in ("sales", "info", "public")), done
        wait_until(lambda: len(maildir_messages(os.path.join(mail, "sales"))) == 1)
        wait_until(lambda: len(maildir_messages(os.path.join(mail, "info"))) == 1)
        wait_until(lambda: len(maildir_messages(os.path.join(mail, "bob"))) == 1)
        wait_until(lambda: len(maildir_messages(os.path.join(mail, "postmaster"))) == 1)  # dave: unknown
        [sales] = maildir_messages(os.path.join(mail, "sales"))
        assert b"Received: from 127.0.0.1" in sales and b"Subject: order 1" in sales
        held = gateway.ctl("quarantine", "list").stdout
        assert "refused: " in held and "your invoice" in held  # the fetched chain's rule held it
        assert dovecot.messages("sales") == [] and len(dovecot.messages("info")) == 1  # info keeps
        status = gateway.ctl("fetch", "status").stdout
        assert f"sales (pop3 sales@127.0.0.1:{dovecot.pop3s_port}): polls " in status, status
        assert "messages 2, bytes" in status.splitlines()[0], status

        gateway.stop()
        gateway.start()  # a restart: the kept IMAP message is not fetched again
        again = gateway.ctl("fetch", "now", "info").stdout
        assert "info: 0 message(s)" in again, again

        # ETRN from an internal server polls the accounts delivering into the domain
        dovecot.deliver("sales", message("sales@outside.test", "order 2"))
        with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as client:
            client.ehlo("exchange.corp.example")
            code, reply = client.docmd("ETRN", "corp.example")
            assert code == 250, reply
        wait_until(lambda: len(maildir_messages(os.path.join(mail, "sales"))) == 2)
        assert len(maildir_messages(os.path.join(mail, "info"))) == 1  # still not twice
    finally:
        gateway.stop()
