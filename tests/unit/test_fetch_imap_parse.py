"""The IMAP response reader: what servers send, whole or in any pieces, and where it must stop.

Responses are taken from RFC 3501's examples and from Dovecot 2.3 sessions; the
property tests build responses from random values and read them back.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.fetch import ProtocolViolation
from gateway.fetch._imap_parse import (
    ContinuationRequest,
    DataResponse,
    Response,
    ResponseReader,
    StatusResponse,
    Streamed,
    Value,
    decode_folder,
    encode_folder,
    fetch_attributes,
    quoted,
    sequence_set,
)


def read_all(
    stream: bytes, reader: ResponseReader | None = None, pieces: list[int] | None = None
) -> list[Response]:
    """Every response in `stream`, fed whole or cut at the given offsets."""
    reader = reader or ResponseReader()
    responses: list[Response] = []
    cuts = sorted({0, *(pieces or []), len(stream)})
    for start, end in itertools.pairwise(cuts):
        reader.feed(stream[start:end])
        while (response := reader.next_response()) is not None:
            responses.append(response)
    assert reader.pending == 0, "bytes left over"
    return responses


def one(line: bytes) -> Response:
    responses = read_all(line)
    assert len(responses) == 1
    return responses[0]


# -- status responses ---------------------------------------------------------------------------------


def test_greeting_with_capabilities_in_its_code() -> None:
    greeting = one(
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS "
        b"AUTH=PLAIN] Dovecot (Debian) ready.\r\n"
    )
    assert greeting == StatusResponse(
        "*", "OK", "CAPABILITY",
        "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN",
        "Dovecot (Debian) ready.",
    )  # fmt: skip
    assert not greeting.tagged


def test_tagged_answers_and_their_codes() -> None:
    assert one(b"M3 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n") == StatusResponse(
        "M3", "OK", "READ-WRITE", "", "Select completed (0.001 + 0.000 secs)."
    )
    refused = one(b"M2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    assert isinstance(refused, StatusResponse)
    assert (refused.tag, refused.status, refused.code, refused.tagged) == (
        "M2",
        "NO",
        "AUTHENTICATIONFAILED",
        True,
    )
    assert one(b"M9 bad Error in IMAP command\r\n") == StatusResponse(
        "M9", "BAD", "", "", "Error in IMAP command"
    )


def test_untagged_codes_carry_uidvalidity_uidnext_and_flags() -> None:
    assert one(b"* OK [UIDVALIDITY 3857529045] UIDs valid\r\n") == StatusResponse(
        "*", "OK", "UIDVALIDITY", "3857529045", "UIDs valid"
    )
    flags = one(b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited\r\n")
    assert isinstance(flags, StatusResponse)
    assert (flags.code, flags.code_text) == ("PERMANENTFLAGS", "(\\Deleted \\Seen \\*)")


def test_bye_and_preauth() -> None:
    assert one(b"* BYE Server shutting down.\r\n") == StatusResponse(
        "*", "BYE", "", "", "Server shutting down."
    )
    assert one(b"* PREAUTH IMAP4rev1 server logged in as Smith\r\n") == StatusResponse(
        "*", "PREAUTH", "", "", "IMAP4rev1 server logged in as Smith"
    )


def test_text_ending_in_braces_is_not_a_literal() -> None:
    """A status line's text is free text: "{5}" at its end announces nothing."""
    responses = read_all(b"* OK Hello {5}\r\nM1 OK done {3}\r\n")
    assert [r.text for r in responses if isinstance(r, StatusResponse)] == ["Hello {5}", "done {3}"]


def test_continuation_requests() -> None:
    assert one(b"+ idling\r\n") == ContinuationRequest("idling")
    assert one(b"+ \r\n") == ContinuationRequest("")
    assert one(b"+\r\n") == ContinuationRequest("")


def test_line_ends_may_be_bare_lf() -> None:
    assert one(b"* 3 EXISTS\n") == DataResponse("EXISTS", 3, ())


# -- data responses -----------------------------------------------------------------------------------


def test_numbered_data_responses() -> None:
    responses = read_all(b"* 172 EXISTS\r\n* 1 RECENT\r\n* 44 EXPUNGE\r\n")
    assert responses == [
        DataResponse("EXISTS", 172, ()),
        DataResponse("RECENT", 1, ()),
        DataResponse("EXPUNGE", 44, ()),
    ]


def test_capability_and_flags_and_search() -> None:
    assert one(b"* CAPABILITY IMAP4rev1 UIDPLUS MOVE IDLE\r\n") == DataResponse(
        "CAPABILITY", None, ("IMAP4rev1", "UIDPLUS", "MOVE", "IDLE")
    )
    assert one(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n") == DataResponse(
        "FLAGS", None, (("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"),)
    )
    assert one(b"* SEARCH 2 3 6\r\n") == DataResponse("SEARCH", None, ("2", "3", "6"))


def test_fetch_with_uid_and_size() -> None:
    response = one(b"* 12 FETCH (UID 4827313 RFC822.SIZE 44827)\r\n")
    assert isinstance(response, DataResponse)
    assert (response.kind, response.number) == ("FETCH", 12)
    assert fetch_attributes(response) == {"UID": "4827313", "RFC822.SIZE": "44827"}


def test_fetch_with_nil_quoted_escapes_nested_lists_and_a_section() -> None:
    response = one(
        b'* 1 FETCH (FLAGS (\\Seen) ENVELOPE ("Mon, 7 Feb 1994" "a \\"quoted\\" \\\\ subject" NIL '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu"))) BODY[HEADER.FIELDS (TO CC)] "To: x" UID 9)\r\n'
    )
    assert isinstance(response, DataResponse)
    attributes = fetch_attributes(response)
    assert attributes["FLAGS"] == ("\\Seen",)
    assert attributes["ENVELOPE"] == (
        b"Mon, 7 Feb 1994",
        b'a "quoted" \\ subject',
        None,
        ((b"Terry Gray", None, b"gray", b"cac.washington.edu"),),
    )
    assert attributes["BODY[HEADER.FIELDS (TO CC)]"] == b"To: x"
    assert attributes["UID"] == "9"


def test_a_literal_in_the_middle_of_a_fetch_response() -> None:
    """Servers send a subject with a quote or 8-bit text as a literal (Gmail, Exchange do)."""
    response = one(b'* 3 FETCH (UID 5 ENVELOPE (NIL {11}\r\nHello "you" NIL) RFC822.SIZE 10)\r\n')
    assert isinstance(response, DataResponse)
    assert fetch_attributes(response) == {
        "UID": "5",
        "ENVELOPE": (None, b'Hello "you"', None),
        "RFC822.SIZE": "10",
    }


def test_an_empty_literal_and_a_literal_as_the_last_value() -> None:
    responses = read_all(b'* 3 FETCH (BODY[] {0}\r\n)\r\n* LIST () "/" {5}\r\nINBOX\r\n')
    assert isinstance(responses[0], DataResponse) and fetch_attributes(responses[0]) == {"BODY[]": b""}
    assert responses[1] == DataResponse("LIST", None, ((), b"/", b"INBOX"))


# -- the body literal, streamed -----------------------------------------------------------------------


MESSAGE = b"From: a@example.net\r\nSubject: hi\r\n\r\n" + b"line of text\r\n" * 200
FETCH_BODY = b"* 2 FETCH (UID 7 BODY[] {%d}\r\n%s)\r\nM4 OK Fetch completed.\r\n" % (len(MESSAGE), MESSAGE)


def test_the_body_goes_to_the_sink_not_into_the_response() -> None:
    pieces: list[bytes] = []
    reader = ResponseReader()
    reader.body_sink = pieces.append
    responses = read_all(FETCH_BODY, reader, pieces=list(range(0, len(FETCH_BODY), 97)))
    assert b"".join(pieces) == MESSAGE
    assert len(pieces) > 10, "handed over as it arrived"
    fetch = responses[0]
    assert isinstance(fetch, DataResponse)
    assert fetch_attributes(fetch) == {"UID": "7", "BODY[]": Streamed(len(MESSAGE))}
    assert reader.body_sink is None, "one body per sink"


def test_a_body_larger_than_what_a_response_may_keep_is_still_read_when_streamed() -> None:
    reader = ResponseReader(max_buffered=1000, max_literal=len(MESSAGE))
    pieces: list[bytes] = []
    reader.body_sink = pieces.append
    read_all(FETCH_BODY, reader)
    assert b"".join(pieces) == MESSAGE
    with pytest.raises(ProtocolViolation, match="larger than 1000"):
        read_all(FETCH_BODY, ResponseReader(max_buffered=1000))  # no sink: it would have to be kept


def test_a_second_body_does_not_reach_the_sink() -> None:
    pieces: list[bytes] = []
    reader = ResponseReader()
    reader.body_sink = pieces.append
    responses = read_all(
        FETCH_BODY.replace(b"M4 OK", b"* 3 FETCH (UID 8 BODY[] {3}\r\nxyz)\r\nM4 OK"), reader
    )
    assert b"".join(pieces) == MESSAGE
    assert isinstance(responses[1], DataResponse) and fetch_attributes(responses[1])["BODY[]"] == b"xyz"


def test_only_a_fetch_body_is_streamed() -> None:
    pieces: list[bytes] = []
    reader = ResponseReader()
    reader.body_sink = pieces.append
    responses = read_all(b'* 1 FETCH (BODY[HEADER] {3}\r\nabc)\r\n* LIST () "/" {3}\r\nBOX\r\n', reader)
    assert pieces == []
    assert isinstance(responses[0], DataResponse) and fetch_attributes(responses[0]) == {
        "BODY[HEADER]": b"abc"
    }


def test_a_failing_sink_is_reported_and_the_reader_stays_in_step() -> None:
    def broken(_piece: bytes) -> None:
        raise OSError("disk full")

    reader = ResponseReader()
    reader.body_sink = broken
    responses = read_all(FETCH_BODY, reader, pieces=[100, 400])
    assert isinstance(reader.sink_error, OSError)
    assert responses[-1] == StatusResponse("M4", "OK", "", "", "Fetch completed.")


# -- bounds and nonsense ------------------------------------------------------------------------------


def test_an_over_long_line_is_refused_before_its_end() -> None:
    reader = ResponseReader(max_line=1000)
    reader.feed(b"* OK " + b"x" * 1200)
    with pytest.raises(ProtocolViolation, match="longer than 1000"):
        reader.next_response()


def test_an_over_long_line_with_its_end_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="longer than 1000"):
        read_all(b"* SEARCH" + b" 1" * 600 + b"\r\n", ResponseReader(max_line=1000))


def test_a_literal_larger_than_the_limit_is_refused_when_announced() -> None:
    reader = ResponseReader(max_literal=1000)
    reader.body_sink = lambda piece: None
    reader.feed(b"* 1 FETCH (BODY[] {1001}\r\n")
    with pytest.raises(ProtocolViolation, match="1001"):
        reader.next_response()


def test_many_literals_in_one_response_are_bounded_together() -> None:
    stream = b"* 1 FETCH (X (" + b"{400}\r\n" + b"a" * 400 + b" " + b"{400}\r\n" + b"b" * 400 + b"))\r\n"
    with pytest.raises(ProtocolViolation, match="larger than 700"):
        read_all(stream, ResponseReader(max_buffered=700))


@pytest.mark.parametrize(
    "line",
    [
        b"* 1 FETCH (UID 1\r\n",  # unclosed list
        b"* 1 FETCH UID 1)\r\n",  # unopened
        b'* 1 FETCH (X "abc)\r\n',  # unterminated quoted string
        b"* 1 FETCH (X {3} Y)\r\n",  # a literal in the middle of a line
        b"M1 BYE no\r\n",  # tagged BYE
        b"M1 EXISTS\r\n",  # tagged data
        b"hello world\r\n",  # not IMAP
        b"*\r\n",
        b"* \r\n",
        b"* 12\r\n",  # a number without a name
        b"* OK [UIDVALIDITY 3\r\n",  # unclosed code
        b"* 1 FETCH (BODY[HEADER x)\r\n",  # unclosed section
        b"* 1 FETCH (X a\x01b)\r\n",  # a control character
    ],
)
def test_nonsense_is_a_protocol_violation(line: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        read_all(line)


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="nested"):
        read_all(b"* 1 FETCH " + b"(" * 100 + b")" * 100 + b"\r\n")


def test_fetch_attributes_need_pairs() -> None:
    with pytest.raises(ProtocolViolation):
        fetch_attributes(DataResponse("FETCH", 1, (("UID",),)))
    with pytest.raises(ProtocolViolation):
        fetch_attributes(DataResponse("FETCH", 1, ("UID", "1")))


# -- any split, random values -------------------------------------------------------------------------

SESSION = (
    b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n"
    b"* 3 EXISTS\r\n* OK [UIDVALIDITY 17] ok\r\n"
    b'* 1 FETCH (UID 5 ENVELOPE (NIL {5}\r\nab"cd NIL))\r\n'
    + FETCH_BODY
    + b"+ idling\r\n* 4 EXISTS\r\nM5 OK done\r\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=30))
def test_any_split_reads_the_same(cuts: list[int]) -> None:
    whole_pieces: list[bytes] = []
    whole = ResponseReader()
    whole.body_sink = whole_pieces.append
    expected = read_all(SESSION, whole)
    split_pieces: list[bytes] = []
    split = ResponseReader()
    split.body_sink = split_pieces.append
    assert read_all(SESSION, split, cuts) == expected
    assert b"".join(split_pieces) == b"".join(whole_pieces) == MESSAGE


@given(st.binary(max_size=200))
def test_quoted_strings_read_back(raw: bytes) -> None:
    text = quoted(raw)
    if text is None:
        assert any(char >= 0x80 or char in (0, 10, 13) for char in raw)
        return
    response = one(b"* X " + text + b"\r\n")
    assert response == DataResponse("X", None, (raw,))


@given(st.binary(max_size=300))
def test_literals_read_back_byte_for_byte(raw: bytes) -> None:
    response = one(b"* 1 FETCH (BODY[TEXT] {%d}\r\n%s UID 3)\r\n" % (len(raw), raw))
    assert isinstance(response, DataResponse)
    assert fetch_attributes(response) == {"BODY[TEXT]": raw, "UID": "3"}


atoms = st.from_regex(r"\A[A-Za-z\\][A-Za-z0-9.\\-]{0,8}\Z").filter(lambda atom: atom.upper() != "NIL")
values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(atoms, st.binary(max_size=20), st.none()),
    lambda children: st.lists(children, max_size=5).map(tuple),
    max_leaves=30,
)


def serialise(value: Value) -> bytes:
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        return value.encode("ascii")
    if isinstance(value, bytes):
        return quoted(value) or b"{%d}\r\n%s" % (len(value), value)
    assert isinstance(value, tuple)
    return b"(" + b" ".join(serialise(item) for item in value) + b")"


@given(st.lists(values, min_size=1, max_size=6))
def test_nested_values_read_back(items: list[Value]) -> None:
    line = b"* LIST " + b" ".join(serialise(item) for item in items) + b"\r\n"
    assert one(line) == DataResponse("LIST", None, tuple(items))


# -- modified UTF-7 and sequence sets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("INBOX", "INBOX"),
        ("Entwürfe", "Entw&APw-rfe"),  # Dovecot's Maildir++ name for it: .Entw&APw-rfe
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 5.1.3
        ("R&D", "R&-D"),
        ("Входящие", "&BBIERQQ+BDQETwRJBDgENQ-"),
        ("😀", "&2D3eAA-"),  # beyond the BMP: a surrogate pair in UTF-16
        ("a\tb", "a&AAk-b"),
    ],
)
def test_modified_utf7_known_names(text: str, encoded: str) -> None:
    assert encode_folder(text) == encoded
    assert decode_folder(encoded) == text


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40))
def test_modified_utf7_round_trip(name: str) -> None:
    encoded = encode_folder(name)
    assert all(0x20 <= ord(char) <= 0x7E for char in encoded)
    assert decode_folder(encoded) == name


@pytest.mark.parametrize("bad", ["a&b", "&APw", "&A-", "&AGE-", "Entwürfe", "&,,,,-", "&2D0-"])
def test_malformed_modified_utf7_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_folder(bad)


def test_sequence_sets_fold_runs() -> None:
    assert sequence_set([7, 1, 2, 3, 9, 10]) == b"1:3,7,9:10"
    assert sequence_set([5]) == b"5"
    with pytest.raises(ValueError):
        sequence_set([])
