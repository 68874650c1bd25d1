"""Multidrop routing: envelope headers first, To/Cc as fallback, unknown users to the postmaster."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.fetch.accounts import MultidropConfig
from gateway.fetch.intake import envelope_sender
from gateway.fetch.multidrop import duplicate_key, header_fields, route

CONFIG = MultidropConfig(
    local_domains=("example.com",),
    local_parts=(("alice", "alice@corp.example"), ("bob.smith", "bob@corp.example")),
    domain_map=(("example.org", "corp.example"),),
)
POSTMASTER = "postmaster@corp.example"


def routed(head: bytes, config: MultidropConfig = CONFIG) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    routing = route(config, header_fields(head), POSTMASTER)
    return routing.recipients, routing.source, routing.unknown


def test_the_first_envelope_header_naming_one_of_ours_wins_over_to_and_cc() -> None:
    head = (
        b"Delivered-To: publicbox@provider.example\r\n"  # the mailbox itself: not of our domains
        b"X-Original-To: Bob.Smith@Example.COM\r\n"
        b"To: alice@example.com\r\n\r\nbody To: nobody@example.com\r\n"
    )
    assert routed(head) == (("bob@corp.example",), "X-Original-To", ())


def test_several_addresses_and_a_domain_map() -> None:
    head = b"Envelope-To: alice@example.com, carol@example.org,\r\n alice@example.com\r\n\r\n"
    assert routed(head) == (("alice@corp.example", "carol@corp.example"), "Envelope-To", ())


def test_to_and_cc_are_the_fallback_with_display_names_and_folding() -> None:
    head = (
        b'From: x@y.example\r\nTo: "Smith, Bob" <bob.smith@example.com>,\r\n\tother@elsewhere.example\r\n'
        b"Cc: Alice <ALICE@example.com>\r\n\r\n"
    )
    assert routed(head) == (("bob@corp.example", "alice@corp.example"), "To/Cc", ())


def test_an_unknown_user_of_ours_goes_to_the_postmaster_besides_the_known_ones() -> None:
    head = b"Delivered-To: alice@example.com\r\nDelivered-To: mallory@example.com\r\n\r\n"
    assert routed(head) == (("alice@corp.example", POSTMASTER), "Delivered-To", ("mallory@example.com",))


def test_a_message_naming_nobody_of_ours_goes_to_the_postmaster_never_dropped() -> None:
    assert routed(b"To: someone@elsewhere.example\r\n\r\n") == ((POSTMASTER,), "", ())
    assert routed(b"") == ((POSTMASTER,), "", ())
    no_fallback = MultidropConfig(local_domains=("example.com",), fallback=False)
    assert routed(b"To: alice@example.com\r\n\r\n", no_fallback) == ((POSTMASTER,), "", ())


def test_only_the_header_block_is_read() -> None:
    head = b"Subject: hi\r\n\r\nDelivered-To: alice@example.com\r\n"
    assert routed(head)[1] == ""


def test_return_path_gives_the_envelope_sender_or_the_null_sender() -> None:
    def sender(head: bytes) -> str:
        return envelope_sender(header_fields(head))

    assert sender(b"Return-Path: <alice@partner.example>\r\nReturn-Path: <other@x.example>\r\n\r\n") == (
        "alice@partner.example"
    )
    assert sender(b"Return-Path: <>\r\n\r\n") == ""
    assert sender(b"From: a@b.example\r\n\r\n") == ""
    assert sender(b"Return-Path: <a b@c.example>\r\n\r\n") == ""
    assert sender(b"Return-Path: bare@partner.example\r\n\r\n") == "bare@partner.example"


def test_duplicate_keys_are_per_message_id_and_recipient() -> None:
    key = duplicate_key("<1@x.example>", "alice@corp.example")
    assert key == duplicate_key(" <1@x.example>", "Alice@Corp.Example")
    assert key != duplicate_key("<1@x.example>", "bob@corp.example")
    assert key != duplicate_key("<2@x.example>", "alice@corp.example")


LOCALS = st.sampled_from(["alice", "bob.smith", "carol", "mallory", "ALICE"])
DOMAINS = st.sampled_from(["example.com", "example.org", "elsewhere.example", "EXAMPLE.COM"])
HEADERS = st.sampled_from(["Delivered-To", "X-Original-To", "Envelope-To", "To", "Cc", "From", "Subject"])
FIELDS = st.lists(
    st.tuples(HEADERS, st.lists(st.tuples(LOCALS, DOMAINS), min_size=1, max_size=3)), max_size=6
)


@given(FIELDS)
def test_routing_never_drops_a_message_and_only_names_mapped_or_postmaster(
    fields: list[tuple[str, list[tuple[str, str]]]],
) -> None:
    head = b"".join(
        f"{name}: {', '.join(f'{local}@{domain}' for local, domain in addresses)}\r\n".encode()
        for name, addresses in fields
    )
    routing = route(CONFIG, header_fields(head + b"\r\n"), POSTMASTER)
    allowed = {"alice@corp.example", "bob@corp.example", POSTMASTER}
    allowed |= {f"{local}@corp.example" for local in ("alice", "bob.smith", "carol", "mallory", "ALICE")}
    assert routing.recipients, "a message always has a recipient"
    assert set(routing.recipients) <= allowed
    assert len({r.lower() for r in routing.recipients}) == len(routing.recipients)
    assert (POSTMASTER in routing.recipients) == (bool(routing.unknown) or routing.source == "")


@given(st.binary(max_size=300))
def test_any_bytes_are_read_without_error(head: bytes) -> None:
    fields = header_fields(head)
    assert all(name and ":" not in name for name, _value in fields)
    assert route(CONFIG, fields, POSTMASTER).recipients
