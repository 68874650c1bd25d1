"""The [fetch] configuration: defaults, accounts, and errors that name the file, key and line."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from gateway.config import ConfigError, Section
from gateway.fetch.accounts import DEFAULT_ENVELOPE_HEADERS, FetchConfig, parse_fetch, read_passwords


def parse(text: str, base: Path) -> FetchConfig:
    root = Section("mailgate.toml", text, tomllib.loads(text), "")
    fetch = parse_fetch(root.sub("fetch"), str(base))
    root.done()
    return fetch


def secret(base: Path, name: str = "sales.pass", password: str = "s3cret", mode: int = 0o600) -> str:
    path = base / name
    path.write_text(password + "\n")
    os.chmod(path, mode)
    return name


def account(base: Path, extra: str = "", target: str = 'deliver_to = ["sales@corp.example"]') -> str:
    return f"""
[fetch]

[[fetch.accounts]]
name = "sales"
protocol = "pop3"
server = "pop.example.net"
username = "sales"
password_file = "{secret(base)}"
{target}
{extra}
"""


def test_no_fetch_table_means_no_accounts_and_the_documented_defaults(tmp_path: Path) -> None:
    fetch = parse("", tmp_path)
    assert fetch == FetchConfig()
    assert (fetch.interval, fetch.per_server_sessions, fetch.on_refusal) == (60.0, 2, "quarantine")
    assert (fetch.max_messages_per_poll, fetch.postmaster) == (0, "")


def test_a_pop3_account_gets_its_defaults_and_a_mailbox_for_the_client(tmp_path: Path) -> None:
    fetch = parse(account(tmp_path), tmp_path)
    [sales] = fetch.accounts
    assert (sales.port, sales.tls, sales.verify, sales.keep, sales.interval) == (
        995,
        "implicit",
        True,
        False,
        60.0,
    )
    assert sales.password_file == str(tmp_path / "sales.pass")
    assert sales.password == ""  # read at start, not when the config is read
    with_password = read_passwords(fetch, "mailgate.toml").accounts[0]
    mailbox = with_password.mailbox()
    assert (mailbox.host, mailbox.port, mailbox.username, mailbox.password) == (
        "pop.example.net",
        995,
        "sales",
        "s3cret",
    )
    assert "s3cret" not in repr(with_password) and "s3cret" not in repr(mailbox)
    assert with_password.source == "pop3 sales@pop.example.net"


@pytest.mark.parametrize(
    ("protocol", "tls", "port"),
    [
        ("pop3", "implicit", 995),
        ("pop3", "starttls", 110),
        ("imap", "implicit", 993),
        ("imap", "starttls", 143),
    ],
)
def test_the_port_follows_protocol_and_tls(tmp_path: Path, protocol: str, tls: str, port: int) -> None:
    text = account(tmp_path, f'tls = "{tls}"').replace('"pop3"', f'"{protocol}"')
    assert parse(text, tmp_path).accounts[0].port == port


def test_every_key_of_an_imap_multidrop_account(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    text = account(
        tmp_path,
        """
port = 10993
ca_file = "ca.pem"
tls_name = "imap.example.net"
auth = "plain"
interval = "5m"
keep = true
delete_after = "30d"
folders = ["INBOX", "Ventes/Été"]
max_size = "20M"
max_messages = 50
timeout = "2m"
postmaster = "admin@corp.example"
[fetch.accounts.multidrop]
headers = ["X-Original-To"]
local_domains = ["Example.COM"]
local_parts = { info = "sales@corp.example", "Bob.Smith" = "bob@corp.example" }
domain_map = { "example.org" = "corp.example" }
fallback = false
unknown = "lost@corp.example"
""",
        target="",
    ).replace('"pop3"', '"imap"')
    [sales] = parse(text, tmp_path).accounts
    assert (sales.port, sales.ca_file, sales.tls_name, sales.auth) == (
        10993,
        str(tmp_path / "ca.pem"),
        "imap.example.net",
        "plain",
    )
    assert (sales.interval, sales.keep, sales.delete_after, sales.timeout) == (
        300.0,
        True,
        30 * 86400.0,
        120.0,
    )
    assert sales.folders == ("INBOX", "Ventes/Été")
    assert (sales.max_size, sales.max_messages, sales.postmaster) == (20 * 1024**2, 50, "admin@corp.example")
    multidrop = sales.multidrop
    assert multidrop is not None and sales.deliver_to == ()
    assert multidrop.headers == ("X-Original-To",) and multidrop.local_domains == ("example.com",)
    assert multidrop.parts == {"info": "sales@corp.example", "bob.smith": "bob@corp.example"}
    assert multidrop.domains == {"example.org": "corp.example"}
    assert (multidrop.fallback, multidrop.unknown) == (False, "lost@corp.example")
    assert sales.mailbox("Ventes/Été").folder == "Ventes/Été"


def test_multidrop_defaults_to_the_three_envelope_headers(tmp_path: Path) -> None:
    text = account(tmp_path, '[fetch.accounts.multidrop]\nlocal_domains = ["example.com"]', target="")
    multidrop = parse(text, tmp_path).accounts[0].multidrop
    assert multidrop is not None
    assert multidrop.headers == DEFAULT_ENVELOPE_HEADERS == ("Delivered-To", "X-Original-To", "Envelope-To")
    assert multidrop.fallback and multidrop.unknown == ""


def test_account_defaults_come_from_the_fetch_table(tmp_path: Path) -> None:
    text = account(tmp_path).replace(
        "[fetch]\n", '[fetch]\ninterval = "2m"\nmax_messages_per_poll = 7\npostmaster = "pm@corp.example"\n'
    )
    [sales] = parse(text, tmp_path).accounts
    assert (sales.interval, sales.max_messages, sales.postmaster) == (120.0, 7, "pm@corp.example")


def error(text: str, base: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, base)
    return str(caught.value)


def line_of(text: str, start: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(start))


def test_plain_text_is_refused_without_the_insecure_flag_naming_key_and_line(tmp_path: Path) -> None:
    text = account(tmp_path, 'tls = "none"')
    message = error(text, tmp_path)
    assert message.startswith(f"mailgate.toml, line {line_of(text, 'tls =')}: fetch.accounts[0].tls: ")
    assert "insecure = true" in message
    [sales] = parse(text + "insecure = true\n", tmp_path).accounts
    assert (sales.tls, sales.port) == ("none", 110)


def test_a_password_file_others_may_read_is_refused(tmp_path: Path) -> None:
    text = account(tmp_path)
    os.chmod(tmp_path / "sales.pass", 0o640)
    message = error(text, tmp_path)
    assert f"line {line_of(text, 'password_file')}: fetch.accounts[0].password_file" in message
    assert "chmod 600" in message and "s3cret" not in message


def test_the_password_file_is_checked_again_at_start(tmp_path: Path) -> None:
    fetch = parse(account(tmp_path), tmp_path)
    os.chmod(tmp_path / "sales.pass", 0o604)  # loosened after the config was read
    with pytest.raises(ConfigError, match=r"fetch.accounts\[0\].password_file: .* may be read by others"):
        read_passwords(fetch, "mailgate.toml")
    os.chmod(tmp_path / "sales.pass", 0o600)
    (tmp_path / "sales.pass").write_text("\n")
    with pytest.raises(ConfigError, match="holds no password"):
        read_passwords(fetch, "mailgate.toml")


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ('password_file = "missing"', "password_file", "does not exist"),
        ('protocol = "kpop"', "protocol", "must be one of pop3, imap, pop2"),
        ('folders = ["INBOX", "Sent"]', "folders", "IMAP accounts only"),
        ('delete_after = "30d"', "delete_after", "keep = true"),
        ('auth = "plain"', "auth", "must be one of auto, user, apop"),
        ('on_refusal = "bounce"', "on_refusal", "quarantine, tag, delete"),
        ("max_messages = -1", "max_messages", "0 (no limit) or more"),
        ('interval = "soon"', "interval", "must be a duration"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, change: str, key: str, words: str) -> None:
    text = account(tmp_path)
    if change.startswith("password_file"):
        text = text.replace(f'password_file = "{secret(tmp_path)}"', change)
    elif key == "protocol":
        text = text.replace('protocol = "pop3"', change)
    elif key == "on_refusal":
        text = text.replace("[fetch]\n", f"[fetch]\n{change}\n")
    else:
        text += change + "\n"
    message = error(text, tmp_path)
    prefix = "fetch" if key == "on_refusal" else "fetch.accounts[0]"
    assert f"{prefix}.{key}: " in message and words in message


def test_exactly_one_target_and_unique_names(tmp_path: Path) -> None:
    assert "exactly one of deliver_to" in error(account(tmp_path, target=""), tmp_path)
    both = account(tmp_path, '[fetch.accounts.multidrop]\nlocal_domains = ["example.com"]')
    assert "exactly one of deliver_to" in error(both, tmp_path)
    twice = account(tmp_path) + account(tmp_path).replace("[fetch]\n", "")
    message = error(twice, tmp_path)
    assert "fetch.accounts[1].name: 'sales' is the name of another account" in message
    assert f"line {len(account(tmp_path).splitlines()) + line_of(account(tmp_path), 'name =') - 1}" in message


def test_unknown_keys_and_missing_required_ones(tmp_path: Path) -> None:
    assert "fetch.accounts[0].pasword: unknown key" in error(account(tmp_path, 'pasword = "x"'), tmp_path)
    without = account(tmp_path).replace('server = "pop.example.net"\n', "")
    assert "fetch.accounts[0].server: is required" in error(without, tmp_path)
    assert "not a mail address" in error(account(tmp_path, target='deliver_to = ["sales"]'), tmp_path)
    nowhere = account(tmp_path, "[fetch.accounts.multidrop]\nfallback = true", target="")
    assert "local_domains: is required" in error(nowhere, tmp_path)


def test_imap_idle_and_move_to_are_off_by_default_and_read_when_given(tmp_path: Path) -> None:
    imap = account(tmp_path).replace('"pop3"', '"imap"')
    [plain] = parse(imap, tmp_path).accounts
    assert (plain.idle, plain.move_to) == (False, "")
    text = imap + 'idle = true\nmove_to = "Fetched"\nfolders = ["INBOX", "Ventes"]\n'
    [watched] = parse(text, tmp_path).accounts
    assert (watched.idle, watched.move_to, watched.folders) == (True, "Fetched", ("INBOX", "Ventes"))


@pytest.mark.parametrize(
    ("imap", "change", "key", "words"),
    [
        (False, "idle = true", "idle", "IMAP accounts only"),
        (False, 'move_to = "Archive"', "move_to", "IMAP accounts only"),
        (True, 'move_to = "INBOX"', "move_to", "is one of the folders fetched"),
        (True, 'keep = true\nmove_to = "Archive"', "move_to", "nothing is ever deleted"),
        (
            True,
            "idle = true\nfolders = [" + ", ".join(f'"F{n}"' for n in range(9)) + "]",
            "idle",
            "at most 8",
        ),
    ],
)
def test_bad_idle_and_move_to_name_their_key_and_line(
    tmp_path: Path, imap: bool, change: str, key: str, words: str
) -> None:
    text = account(tmp_path, change)
    if imap:
        text = text.replace('"pop3"', '"imap"')
    message = error(text, tmp_path)
    assert f"line {line_of(text, key + ' =')}: fetch.accounts[0].{key}: " in message
    assert words in message


def test_move_to_with_keep_applies_to_what_delete_after_would_delete(tmp_path: Path) -> None:
    text = account(tmp_path, 'keep = true\ndelete_after = "30d"\nmove_to = "Archive"').replace(
        '"pop3"', '"imap"'
    )
    [sales] = parse(text, tmp_path).accounts
    assert (sales.keep, sales.delete_after, sales.move_to) == (True, 30 * 86400.0, "Archive")
