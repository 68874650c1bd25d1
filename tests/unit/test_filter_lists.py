"""The "lists" filter: every kind of entry, list files, and reloading them."""

from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gateway import config as configuration
from gateway.filters import FilterServices, Request
from gateway.filters._listfile import Kind, domain_key, parse_client, parse_pattern, read_list_file
from gateway.filters.lists import Listing, Lists, NetworkTable, listener_port
from gateway.model import Action, Direction, Envelope, Recipient, Session, Stage, Verdict

CONFIG_HEAD = """\
[gateway]
state_dir = "state"
[filters]
inbound = ["lists"]
[filters.lists]
"""


def lists_from(options: str, directory: Path | None = None) -> Lists:
    """A Lists filter from a `[filters.lists]` body, as the registry builds it."""
    text = CONFIG_HEAD + textwrap.dedent(options)
    source = str(directory / "mailgate.toml") if directory else "<config>"
    cfg = configuration.parse(text, source, base_dir=str(directory) if directory else "/")
    section = cfg.filters.section(cfg.source, "lists")
    lists = Lists.from_config(section, FilterServices(cfg, Clock()))
    section.done()
    return lists


def connect(lists: Lists, peer: str, listener: str = "tcp:25:interface=0.0.0.0") -> Verdict:
    return _check(lists, Request(Stage.CONNECT, Direction.INBOUND, Session(peer, listener=listener)))


def mail(lists: Lists, sender: str) -> Verdict:
    envelope = Envelope(sender, ())
    return _check(lists, Request(Stage.MAIL, Direction.INBOUND, Session("198.51.100.7"), envelope))


def rcpt(lists: Lists, recipient: str) -> Verdict:
    envelope = Envelope("someone@sender.test", ())
    request = Request(Stage.RCPT, Direction.INBOUND, Session("198.51.100.7"), envelope, Recipient(recipient))
    return _check(lists, request)


def _check(lists: Lists, request: Request) -> Verdict:
    verdict = lists.check(request)
    assert isinstance(verdict, Verdict)  # a list lookup never waits
    return verdict


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# -- clients -------------------------------------------------------------------------------------


def test_blocked_client_ip_gets_554_naming_the_client() -> None:
    lists = lists_from('block_clients = ["192.0.2.1"]')
    verdict = connect(lists, "192.0.2.1")
    assert verdict.action is Action.REJECT
    assert (verdict.code, verdict.enhanced) == (554, "5.7.1")
    assert verdict.reason == "Access denied: client 192.0.2.1 is blocked"
    assert connect(lists, "192.0.2.2").action is Action.CONTINUE


def test_cidr_blocks_every_address_inside_it_and_none_outside() -> None:
    lists = lists_from('block_clients = ["203.0.113.0/25", "2001:db8:1::/48"]')
    assert connect(lists, "203.0.113.0").action is Action.REJECT
    assert connect(lists, "203.0.113.127").action is Action.REJECT
    assert connect(lists, "203.0.113.128").action is Action.CONTINUE
    assert connect(lists, "2001:db8:1:ffff::1").action is Action.REJECT
    assert connect(lists, "2001:db8:2::1").action is Action.CONTINUE


def test_ipv4_mapped_ipv6_client_matches_its_ipv4_entry() -> None:
    # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    lists = lists_from('block_clients = ["192.0.2.0/24"]')
    verdict = connect(lists, "::ffff:192.0.2.9")
    assert verdict.action is Action.REJECT
    assert "client ::ffff:192.0.2.9 is blocked" in verdict.reason


def test_ipv4_mapped_entry_matches_the_plain_ipv4_client() -> None:
    lists = lists_from('block_clients = ["::ffff:192.0.2.0/120"]')
    assert connect(lists, "192.0.2.200").action is Action.REJECT
    assert connect(lists, "192.0.3.1").action is Action.CONTINUE


def test_allowed_client_is_accepted_and_the_most_specific_network_wins() -> None:
    lists = lists_from(
        """
        block_clients = ["10.0.0.0/8", "10.1.2.3"]
        allow_clients = ["10.1.0.0/16"]
        """
    )
    assert connect(lists, "10.9.9.9").action is Action.REJECT  # only the /8
    allowed = connect(lists, "10.1.9.9")  # the /16 is more specific than the /8
    assert allowed.action is Action.ACCEPT
    assert allowed.reason == "client 10.1.9.9 is allowed"
    assert connect(lists, "10.1.2.3").action is Action.REJECT  # the /32 beats the /16


def test_an_entry_both_allowed_and_blocked_is_allowed() -> None:
    lists = lists_from('block_clients = ["192.0.2.0/24"]\nallow_clients = ["192.0.2.0/24"]')
    assert connect(lists, "192.0.2.5").action is Action.ACCEPT


def test_a_client_that_is_no_ip_address_is_not_listed() -> None:
    lists = lists_from('block_clients = ["0.0.0.0/0", "::/0"]')
    assert connect(lists, "").action is Action.CONTINUE
    assert connect(lists, "fe80::1%eth0").action is Action.REJECT  # a scoped address is still one


@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.booleans()), min_size=1, max_size=30
    ),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=30),
)
def test_network_table_agrees_with_a_linear_longest_prefix_scan(
    entries: list[tuple[int, int, bool]], probes: list[int]
) -> None:
    table = NetworkTable()
    networks = []
    for value, length, allowed in entries:
        network = ipaddress.IPv4Network((value, length), strict=False)
        table.add(network, Listing(allowed))
        networks.append((network, allowed))
    for network, _ in networks:
        probes.append(int(network.network_address))
    for probe in probes:
        address = ipaddress.IPv4Address(probe)
        matching = [(n.prefixlen, allowed) for n, allowed in networks if address in n]
        found = table.lookup(address)
        if not matching:
            assert found is None
            continue
        longest = max(length for length, _ in matching)
        assert found is not None
        # the longest prefix decides; allowed if any entry of that network allows it
        assert found.allowed is any(allowed for length, allowed in matching if length == longest)


# -- ports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "port"),
    [
        ("tcp:25:interface=127.0.0.1", 25),
        ("tcp:port=587", 587),
        ("tcp6:2525:interface=\\:\\:1", 2525),
        ("ssl:465:privateKey=key.pem", 465),
        ("unix:/run/mailgate.sock", None),
        ("", None),
    ],
)
def test_listener_port_is_read_from_the_endpoint_string(endpoint: str, port: int | None) -> None:
    assert listener_port(endpoint) == port


def test_blocked_port_refuses_clients_that_are_not_allowed() -> None:
    # a port only some networks may use
    lists = lists_from('block_ports = [2525]\nallow_clients = ["192.0.2.0/24"]')
    refused = connect(lists, "198.51.100.1", "tcp:2525:interface=127.0.0.1")
    assert refused.action is Action.REJECT
    assert refused.reason == "Access denied: client 198.51.100.1 may not use port 2525"
    assert connect(lists, "198.51.100.1", "tcp:25:interface=127.0.0.1").action is Action.CONTINUE
    assert connect(lists, "192.0.2.1", "tcp:2525:interface=127.0.0.1").action is Action.ACCEPT


def test_allowed_port_is_accepted() -> None:
    lists = lists_from("allow_ports = [587]")
    assert connect(lists, "198.51.100.1", "tcp:587").action is Action.ACCEPT


def test_ports_must_be_port_numbers() -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        lists_from('block_ports = ["25"]')
    assert "line 6: filters.lists.block_ports: must be a list of port numbers" in str(raised.value)
    with pytest.raises(configuration.ConfigError, match="70000"):
        lists_from("block_ports = [70000]")


# -- senders and recipients ----------------------------------------------------------------------


def test_at_domain_blocks_the_domain_and_every_sub_domain() -> None:
    lists = lists_from('block_senders = ["@usa.com"]')
    verdict = mail(lists, "anyone@usa.com")
    assert verdict.action is Action.REJECT
    assert verdict.reason == "Access denied: sender domain usa.com is blocked"
    assert mail(lists, "x@mail.usa.com").action is Action.REJECT
    assert mail(lists, "x@a.b.c.usa.com").action is Action.REJECT
    assert mail(lists, "x@notusa.com").action is Action.CONTINUE  # a label boundary, not a suffix
    assert mail(lists, "x@usa.com.evil.test").action is Action.CONTINUE


def test_bare_domain_means_the_same_as_at_domain() -> None:
    lists = lists_from('block_senders = ["usa.com"]')
    assert mail(lists, "x@usa.com").action is Action.REJECT
    assert mail(lists, "x@sub.usa.com").action is Action.REJECT


def test_domains_and_addresses_compare_case_insensitively() -> None:
    lists = lists_from('block_senders = ["@USA.com", "Spammer@Example.ORG"]')
    assert mail(lists, "x@Mail.usa.COM").action is Action.REJECT
    assert mail(lists, "x@usa.com.").action is Action.REJECT  # a final dot is the same domain
    verdict = mail(lists, "SPAMMER@example.org")
    assert verdict.action is Action.REJECT
    assert verdict.reason == "Access denied: sender <spammer@example.org> is blocked"
    assert mail(lists, "friend@example.org").action is Action.CONTINUE


def test_an_allowed_address_is_the_exception_to_its_blocked_domain() -> None:
    lists = lists_from(
        """
        block_senders = ["@usa.com", "@partner.test"]
        allow_senders = ["boss@usa.com", "@good.partner.test"]
        """
    )
    allowed = mail(lists, "boss@usa.com")
    assert allowed.action is Action.ACCEPT
    assert allowed.reason == "sender <boss@usa.com> is allowed"
    assert mail(lists, "other@usa.com").action is Action.REJECT
    assert mail(lists, "x@mx.good.partner.test").action is Action.ACCEPT
    assert mail(lists, "x@bad.partner.test").action is Action.REJECT


def test_null_sender_matches_no_entry() -> None:
    lists = lists_from('block_senders = ["@usa.com"]')
    assert mail(lists, "").action is Action.CONTINUE


def test_internationalised_domain_matches_in_either_form() -> None:
    lists = lists_from('block_senders = ["@bücher.example"]')
    assert mail(lists, "x@xn--bcher-kva.example").action is Action.REJECT
    assert mail(lists, "x@mail.BÜCHER.example").action is Action.REJECT


def test_recipient_address_and_domain() -> None:
    lists = lists_from(
        """
        block_recipients = ["noreply@example.com", "@old.example.com"]
        allow_recipients = ["postmaster@old.example.com"]
        """
    )
    verdict = rcpt(lists, "NoReply@example.com")
    assert verdict.action is Action.REJECT
    assert verdict.reason == "Access denied: recipient <noreply@example.com> is blocked"
    assert (
        rcpt(lists, "x@old.example.com").reason
        == "Access denied: recipient domain old.example.com is blocked"
    )
    assert rcpt(lists, "postmaster@old.example.com").action is Action.ACCEPT
    assert rcpt(lists, "bob@example.com").action is Action.CONTINUE
    assert rcpt(lists, "postmaster").action is Action.CONTINUE  # RCPT TO:<postmaster>


def test_the_filter_acts_only_at_the_stages_of_its_lists() -> None:
    # the chain never calls it where it has nothing to look up
    assert lists_from('block_clients = ["192.0.2.1"]').stages == frozenset({Stage.CONNECT})
    assert lists_from('allow_senders = ["@a.test"]').stages == frozenset({Stage.MAIL})
    assert lists_from("block_recipients_files = []\nblock_ports = [25]").stages == frozenset({Stage.CONNECT})
    assert lists_from("").stages == frozenset()


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("block_clients", "192.0.2.300", "'192.0.2.300' is not an IP address or network"),
        ("block_clients", "example.com", "'example.com' is not an IP address or network"),
        ("block_senders", "user@", "'user@' is not an address or a domain"),
        ("allow_recipients", "@bad_domain..test", "is not an address or a domain"),
        ("block_senders", "@-x.test", "is not an address or a domain"),
    ],
)
def test_a_bad_inline_entry_names_the_key_and_line(key: str, value: str, problem: str) -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        lists_from(f'\n{key} = ["{value}"]')
    message = str(raised.value)
    assert f"line 7: filters.lists.{key}: " in message
    assert problem in message


@given(st.from_regex(r"([a-z0-9]{1,10}\.){0,4}[a-z][a-z0-9]{0,9}", fullmatch=True))
def test_a_domain_entry_matches_itself_and_its_sub_domains(domain: str) -> None:
    assert parse_pattern(f"@{domain}") == parse_pattern(domain)
    lists = Lists({(Kind.SENDERS, False): (f"@{domain}",)})
    assert mail(lists, f"u@{domain}").action is Action.REJECT
    assert mail(lists, f"u@sub.{domain.upper()}").action is Action.REJECT
    assert mail(lists, f"u@x{domain}").action is Action.CONTINUE


# -- list files ----------------------------------------------------------------------------------


def test_list_files_relative_to_the_config_with_comments_and_blank_lines(tmp_path: Path) -> None:
    os.mkdir(tmp_path / "lists")
    write(
        tmp_path / "lists" / "senders.txt",
        """\
        # spammers we know
        @usa.com

        a#b@example.org   # a '#' inside an address is not a comment
        """,
    )
    write(tmp_path / "clients.txt", "192.0.2.0/24\n2001:db8::/32\n")
    lists = lists_from(
        """
        block_senders_files = ["lists/senders.txt"]
        block_clients_files = ["clients.txt"]
        """,
        tmp_path,
    )
    assert mail(lists, "x@mail.usa.com").action is Action.REJECT
    assert mail(lists, "a#b@example.org").action is Action.REJECT
    assert mail(lists, "a@example.org").action is Action.CONTINUE
    assert connect(lists, "2001:db8::25").action is Action.REJECT


def test_inline_entries_and_files_add_up(tmp_path: Path) -> None:
    path = write(tmp_path / "allow.txt", "@friend.test\n")
    lists = lists_from(f'allow_senders = ["@ally.test"]\nallow_senders_files = ["{path}"]', tmp_path)
    assert mail(lists, "x@friend.test").action is Action.ACCEPT  # an absolute path
    assert mail(lists, "x@ally.test").action is Action.ACCEPT


def test_bad_line_in_a_list_file_names_the_file_and_the_line(tmp_path: Path) -> None:
    write(tmp_path / "clients.txt", "# header\n192.0.2.1\n\n192.0.2.0/33\n")
    with pytest.raises(configuration.ConfigError) as raised:
        lists_from('block_clients_files = ["clients.txt"]', tmp_path)
    assert str(raised.value) == (
        f"{tmp_path}/clients.txt, line 4: '192.0.2.0/33' is not an IP address or network "
        "(like 192.0.2.1 or 2001:db8::/32)"
    )


def test_two_entries_on_one_line_are_an_error(tmp_path: Path) -> None:
    write(tmp_path / "senders.txt", "@a.test @b.test\n")
    with pytest.raises(configuration.ConfigError, match=r"senders.txt, line 1: one entry per line"):
        lists_from('block_senders_files = ["senders.txt"]', tmp_path)


def test_missing_or_binary_list_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        configuration.ConfigError, match=r"nowhere.txt: cannot read the list file: No such file"
    ):
        lists_from('block_senders_files = ["nowhere.txt"]', tmp_path)
    (tmp_path / "binary.txt").write_bytes(b"@a.test\n\xff\xfe\n")
    with pytest.raises(configuration.ConfigError, match=r"binary.txt: the list file is not UTF-8 text"):
        lists_from('block_senders_files = ["binary.txt"]', tmp_path)


def test_read_list_file_gives_each_entry_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "l.txt", "# x\n\n  a.test  \nb.test # c\n")
    assert [(e.text, e.line) for e in read_list_file(path)] == [("a.test", 3), ("b.test", 4)]


def test_parse_client_keeps_ipv6_that_is_not_mapped() -> None:
    assert parse_client("::ffff:0:0/95") == ipaddress.IPv6Network("::fffe:0:0/95")
    assert parse_client("::ffff:192.0.2.1") == ipaddress.IPv4Network("192.0.2.1/32")


# -- reload --------------------------------------------------------------------------------------


def test_reload_reads_the_files_again(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    write(path, "@old.test\n")
    lists = lists_from('block_senders_files = ["block.txt"]', tmp_path)
    assert mail(lists, "x@new.test").action is Action.CONTINUE
    write(path, "@new.test\n")
    assert mail(lists, "x@new.test").action is Action.CONTINUE  # not before a reload
    lists.reload()
    assert mail(lists, "x@new.test").action is Action.REJECT
    assert mail(lists, "x@old.test").action is Action.CONTINUE


def test_reload_of_a_bad_file_raises_naming_file_and_line_and_keeps_the_old_lists(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    write(path, "@old.test\n")
    lists = lists_from('block_senders_files = ["block.txt"]', tmp_path)
    write(path, "@new.test\nnot an entry\n")
    with pytest.raises(configuration.ConfigError, match=r"block.txt, line 2: one entry per line"):
        lists.reload()
    assert mail(lists, "x@old.test").action is Action.REJECT
    assert mail(lists, "x@new.test").action is Action.CONTINUE
    os.remove(path)
    with pytest.raises(configuration.ConfigError, match="cannot read the list file"):
        lists.reload()
    assert mail(lists, "x@old.test").action is Action.REJECT


def test_reload_keeps_the_inline_entries(tmp_path: Path) -> None:
    write(tmp_path / "block.txt", "")
    lists = lists_from('block_clients = ["192.0.2.1"]\nblock_clients_files = ["block.txt"]', tmp_path)
    write(tmp_path / "block.txt", "192.0.2.2\n")
    lists.reload()
    assert connect(lists, "192.0.2.1").action is Action.REJECT
    assert connect(lists, "192.0.2.2").action is Action.REJECT


def test_reasons_never_name_the_list_file(tmp_path: Path) -> None:
    write(tmp_path / "clients.txt", "192.0.2.1\n")
    write(tmp_path / "senders.txt", "@usa.com\n")
    lists = lists_from(
        'block_clients_files = ["clients.txt"]\nblock_senders_files = ["senders.txt"]', tmp_path
    )
    reasons = [connect(lists, "192.0.2.1").reason, mail(lists, "a@usa.com").reason]
    assert reasons == [
        "Access denied: client 192.0.2.1 is blocked",
        "Access denied: sender domain usa.com is blocked",
    ]


def test_an_ip_address_is_not_a_sender_domain() -> None:
    # an IP address written in a senders' list is a mistake, not a domain "192.0.2.1"
    with pytest.raises(configuration.ConfigError, match=r"'192\.0\.2\.1' is not an address or a domain"):
        lists_from('block_senders = ["192.0.2.1"]')


@given(
    st.text(alphabet="aZ09_-.ü\n", max_size=300)
    | st.from_regex(r"([a-z0-9-]{1,70}\.){1,5}[a-z0-9-]{1,70}\.?")
)
def test_domain_key_takes_exactly_the_names_of_good_labels(text: str) -> None:
    # the one regular expression against the rule it stands for, label by label
    domain = text.lower().rstrip(".")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            domain = ""
    good = (
        0 < len(domain) <= 253
        and len(text.lower().rstrip(".")) <= 253
        and all(
            0 < len(label) <= 63
            and not label.startswith("-")
            and not label.endswith("-")
            and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_-" for c in label)
            for label in domain.split(".")
        )
    )
    assert (domain_key(text) == domain) if good else (domain_key(text) is None)
