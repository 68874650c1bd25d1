"""parse_message: what the content filters read of a message, decoded, however it was sent."""
# ruff: noqa: RUF001  (full-width commas and dashes are the point: real CJK and Windows-1252 text)

from __future__ import annotations

import base64
import quopri
import sys
import urllib.parse

import pytest

from gateway.content import Attachment, ContentLimits, ParsedMessage
from gateway.content.parse import parse_message

CHINESE = "你好，世界。这是一封测试邮件"
TRADITIONAL = "繁體中文測試郵件，請查收"
POLISH = "Zażółć gęślą jaźń"


def message(*header: str, body: bytes | str = b"") -> bytes:
    if isinstance(body, str):
        body = body.encode("ascii")
    return "".join(f"{line}\r\n" for line in header).encode("ascii") + b"\r\n" + body


def text_part(content: bytes, charset: str | None, encoding: str = "8bit") -> ParsedMessage:
    declared = f"; charset={charset}" if charset else ""
    if encoding == "base64":
        content = base64.encodebytes(content)
    elif encoding == "quoted-printable":
        content = quopri.encodestring(content)
    raw = message(
        f"Content-Type: text/plain{declared}", f"Content-Transfer-Encoding: {encoding}", body=content
    )
    return parse_message(raw)


def multipart(subtype: str, *parts: bytes, boundary: str = "=-=b=-=") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return message(
        "From: alice@example.com",
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"',
        body=body + b"--" + boundary.encode() + b"--\r\n",
    )


# Charsets


@pytest.mark.parametrize(
    ("text", "charset", "encoding"),
    [
        (CHINESE, "gb2312", "base64"),
        (CHINESE, "GB2312", "8bit"),
        ("朱镕基总理", "gbk", "quoted-printable"),
        ("𠮷野家", "gb18030", "base64"),
        (TRADITIONAL, "big5", "base64"),
        ("Café, façade, naïve", "iso-8859-1", "quoted-printable"),
        (POLISH, "iso-8859-2", "quoted-printable"),
        ("Prix : 20 € TTC", "iso-8859-15", "8bit"),
        ("Grüße 你好 ☃", "utf-8", "base64"),
        ("Привет мир", "koi8-r", "8bit"),
    ],
)
def test_declared_charsets_decoded(text: str, charset: str, encoding: str) -> None:
    parsed = text_part(text.encode(charset), charset, encoding)
    assert parsed.text == text
    assert parsed.defects == ()


def test_gbk_text_labelled_gb2312_is_read_as_gb18030() -> None:
    # 镕 is in GBK, not in GB2312: senders label GBK as gb2312 all the time.
    parsed = text_part("朱镕基总理".encode("gbk"), "gb2312")
    assert parsed.text == "朱镕基总理"
    assert parsed.defects == ()


def test_hkscs_text_labelled_big5_is_read() -> None:
    parsed = text_part("係㗎，佢哋".encode("big5hkscs"), "big5")
    assert parsed.text == "係㗎，佢哋"


def test_windows_1252_labelled_latin_1_keeps_its_quotes() -> None:
    parsed = text_part("“Free” offer – now".encode("cp1252"), "iso-8859-1")
    assert parsed.text == "“Free” offer – now"


@pytest.mark.parametrize(
    ("text", "codec"),
    [
        (CHINESE, "gb2312"),
        ("朱镕基总理说，今天的会议很重要", "gbk"),
        (TRADITIONAL, "big5"),
        ("Café au lait, s'il vous plaît, déjà vu", "cp1252"),
        ("Grüße aus Köln ☃", "utf-8"),
    ],
)
def test_undeclared_8bit_text_is_guessed(text: str, codec: str) -> None:
    assert text_part(text.encode(codec), None).text == text


def test_utf8_labelled_gb2312_is_read_as_utf8() -> None:
    parsed = text_part(CHINESE.encode(), "gb2312")
    assert parsed.text == CHINESE
    assert parsed.defects == ("utf-8 text labelled 'gb2312'",)


def test_short_gb2312_text_that_happens_to_be_valid_utf8_stays_gb2312() -> None:
    # 全 is C8 AB in GB2312, also a valid two-byte UTF-8 sequence: too little evidence.
    assert text_part("全".encode("gb2312"), "gb2312").text == "全"


def test_unknown_charset_is_guessed_and_counted() -> None:
    parsed = text_part(CHINESE.encode("gb2312"), "x-no-such-charset")
    assert parsed.text == CHINESE
    assert parsed.defects == ("unknown charset 'x-no-such-charset'",)


def test_codec_names_that_are_not_charsets_are_not_obeyed() -> None:
    parsed = text_part(b"caf\xc3\xa9 \\u0041", "unicode_escape")
    assert parsed.text == "café \\u0041"
    assert parsed.defects == ("unknown charset 'unicode_escape'",)


def test_text_not_in_its_declared_charset_is_kept_with_a_defect() -> None:
    parsed = text_part(b"\x81\x82 abc \xff", "iso-2022-jp")
    assert "abc" in parsed.text
    assert parsed.defects == ("undecodable text in charset 'iso-2022-jp'",)


def test_utf8_labelled_latin_1_is_not_garbled() -> None:
    # Mislabelled the other way round: the declared charset must not win if it fails.
    parsed = text_part("Grüße".encode(), "us-ascii")
    assert parsed.text == "Grüße"


# Headers


def test_encoded_word_subjects_are_decoded() -> None:
    gb = base64.b64encode(CHINESE.encode("gb2312")).decode()
    big5 = "".join(f"={byte:02X}" for byte in TRADITIONAL.encode("big5"))
    parsed = parse_message(
        message(
            f"Subject: =?gb2312?B?{gb}?= =?gb2312?B?{gb}?= (twice)",
            f"X-Big5: =?big5?Q?{big5}?=",
            "From: =?utf-8?q?Ren=C3=A9?= <rene@example.com>",
            body="hello",
        )
    )
    # Whitespace between adjacent encoded words is not text (RFC 2047, 6.2).
    assert parsed.subject == CHINESE + CHINESE + " (twice)"
    assert parsed.header("x-big5") == [TRADITIONAL]
    assert parsed.header("FROM") == ["René <rene@example.com>"]


def test_raw_8bit_header_is_guessed() -> None:
    raw = b"Subject: " + CHINESE.encode("gbk") + b"\r\n\r\nbody"
    assert parse_message(raw).subject == CHINESE


def test_folded_header_is_unfolded() -> None:
    parsed = parse_message(message("Subject: one", " two", "\tthree", body="x"))
    assert parsed.subject == "one two\tthree"


def test_headers_keep_their_order_and_repeats() -> None:
    parsed = parse_message(message("Received: a", "Received: b", "Subject: s", body="x"))
    assert parsed.headers[:2] == (("Received", "a"), ("Received", "b"))
    assert parsed.header("received") == ["a", "b"]


# Attachments and their names


def attachment_part(disposition: str, payload: bytes = b"PK\x03\x04zip") -> bytes:
    return (
        "Content-Type: application/octet-stream\r\n"
        f"Content-Disposition: {disposition}\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + base64.encodebytes(payload)


def names(raw: bytes) -> list[str | None]:
    return [attachment.filename for attachment in parse_message(raw).attachments]


def test_rfc2231_filename_decoded() -> None:
    quoted = urllib.parse.quote("发票.zip".encode("gb18030"))
    raw = multipart(
        "mixed",
        b"Content-Type: text/plain\r\n\r\nsee file",
        attachment_part(f"attachment; filename*=gb18030''{quoted}"),
    )
    parsed = parse_message(raw)
    assert parsed.text == "see file"
    assert parsed.attachments == (
        Attachment(
            "发票.zip",
            "application/octet-stream",
            b"PK\x03\x04zip",
            depth=1,
            disposition="attachment",
            detected_type="application/zip",
        ),
    )


def test_rfc2231_continued_filename_decoded() -> None:
    first = urllib.parse.quote("Überweisung ".encode())
    disposition = f"attachment;\r\n filename*0*=utf-8''{first};\r\n filename*1*=%E2%82%AC.pdf"
    assert names(multipart("mixed", attachment_part(disposition))) == ["Überweisung €.pdf"]


def test_encoded_word_and_raw_8bit_filenames_decoded() -> None:
    word = base64.b64encode("报价单.xls".encode("gb2312")).decode()
    raw = multipart(
        "mixed",
        attachment_part(f'attachment; filename="=?gb2312?B?{word}?="'),
        b'Content-Type: application/pdf; name="' + "說明.pdf".encode("big5") + b'"\r\n\r\n%PDF-1.4',
    )
    assert names(raw) == ["报价单.xls", "說明.pdf"]


def test_every_leaf_that_is_not_body_text_is_an_attachment() -> None:
    png = b"\x89PNG\r\n\x1a\n...."
    raw = multipart(
        "related",
        b"Content-Type: text/html\r\n\r\n<p>Look <img src=cid:logo></p>",
        b"Content-Type: image/png\r\nContent-ID: <logo>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(png),
        b'Content-Type: text/plain; name="notes.txt"\r\n\r\nattached notes',
        b"Content-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\nunnamed attached text",
    )
    parsed = parse_message(raw)
    assert parsed.text == "Look"
    assert [(a.filename, a.content_type, a.payload) for a in parsed.attachments] == [
        (None, "image/png", png),
        ("notes.txt", "text/plain", b"attached notes"),
        (None, "text/plain", b"unnamed attached text"),
    ]
    assert parsed.attachments[0].detected_type == "image/png"


def test_forwarded_message_is_read_one_level_deeper() -> None:
    inner = multipart(
        "mixed",
        b"Content-Type: text/plain\r\n\r\ninner text",
        attachment_part('attachment; filename="a.exe"', b"MZ\x90\x00"),
        boundary="inner",
    )
    raw = multipart(
        "mixed",
        b"Content-Type: text/plain\r\n\r\nouter text",
        b"Content-Type: message/rfc822\r\n\r\n" + inner,
    )
    parsed = parse_message(raw)
    assert parsed.text == "outer text\n\ninner text"
    [exe] = parsed.attachments
    assert (exe.filename, exe.depth, exe.detected_type) == ("a.exe", 3, "application/x-msdownload")
    assert parsed.subject == ""  # the inner message's header is not the message's


def test_digest_parts_default_to_messages() -> None:
    raw = multipart("digest", b"\r\nSubject: one\r\n\r\nfirst", b"\r\nSubject: two\r\n\r\nsecond")
    assert parse_message(raw).text == "first\n\nsecond"


# HTML and alternatives


def test_text_taken_from_html() -> None:
    html = (
        "<html><head><title>Offer</title><style>p {color: red}</style>"
        "<script>document.write('hidden')</script></head>"
        "<body><p>Buy&nbsp;now &amp; save&#33;</p><div>Only<br>today</div>"
        "<!-- a comment --><p>你好</p></body></html>"
    )
    parsed = parse_message(message("Content-Type: text/html; charset=utf-8", body=html.encode()))
    assert parsed.text == "Offer\nBuy now & save!\nOnly\ntoday\n你好"
    assert parsed.html


def test_plain_and_html_saying_the_same_give_the_text_once() -> None:
    raw = multipart(
        "alternative",
        b"Content-Type: text/plain\r\n\r\nHello Bob,\r\nthe meeting is at 10.",
        b"Content-Type: text/html\r\n\r\n<p>Hello Bob,</p><p>the meeting is at <b>10</b>.</p>",
    )
    assert parse_message(raw).text == "Hello Bob,\nthe meeting is at 10."


def test_alternatives_saying_different_things_are_both_read() -> None:
    raw = multipart(
        "alternative",
        b"Content-Type: text/plain\r\n\r\nPlease view this message in HTML.",
        b"Content-Type: text/html\r\n\r\n<p>Cheap pills here</p>",
    )
    assert parse_message(raw).text == "Please view this message in HTML.\n\nCheap pills here"


def test_empty_plain_alternative_gives_the_html() -> None:
    raw = multipart(
        "alternative",
        b"Content-Type: text/plain\r\n\r\n  \r\n",
        b"Content-Type: text/html\r\n\r\n<p>Only in HTML</p>",
    )
    assert parse_message(raw).text == "Only in HTML"


# Malformed MIME: read as far as it goes, counted


def test_base64_padding_smuggling_does_not_hide_the_rest() -> None:
    # Decoders that stop at the first "=" would show a scanner only the harmless start.
    encoded = base64.b64encode(b"Hi") + b"\r\n" + base64.b64encode(b" buy cheap pills now")
    raw = message("Content-Type: text/plain", "Content-Transfer-Encoding: base64", body=encoded)
    parsed = parse_message(raw)
    assert parsed.text == "Hi buy cheap pills now"
    assert parsed.defects == ("broken base64",)


def test_broken_base64_is_decoded_as_far_as_it_goes() -> None:
    raw = message(
        "Content-Type: text/plain", "Content-Transfer-Encoding: base64", body=b"SGVsbG8g!!d29y\r\nbGQ"
    )
    parsed = parse_message(raw)
    assert parsed.text == "Hello world"
    assert parsed.defects == ("broken base64",)


def test_missing_closing_boundary_keeps_the_last_part() -> None:
    raw = multipart("mixed", b"Content-Type: text/plain\r\n\r\nfirst", b"\r\nsecond")
    raw = raw[: raw.rindex(b"--=-=b=-=--")]
    parsed = parse_message(raw)
    assert parsed.text == "first\n\nsecond"
    assert "multipart without its closing boundary" in parsed.defects


def test_multipart_without_boundary_is_read_as_text() -> None:
    raw = message("Content-Type: multipart/mixed", body="--x\r\n\r\nhidden words\r\n--x--\r\n")
    parsed = parse_message(raw)
    assert "hidden words" in parsed.text
    assert parsed.defects == ("multipart without a boundary parameter",)


def test_boundary_not_at_line_start_does_not_split() -> None:
    raw = multipart("mixed", b"Content-Type: text/plain\r\n\r\nsee x--=-=b=-= here")
    assert parse_message(raw).text == "see x--=-=b=-= here"


def test_bare_newlines_are_read_like_crlf() -> None:
    raw = multipart("mixed", b"Content-Type: text/plain\r\n\r\nfirst", b"\r\nsecond").replace(b"\r\n", b"\n")
    parsed = parse_message(raw)
    assert parsed.text == "first\n\nsecond"
    assert parsed.header("from") == ["alice@example.com"]


def test_message_without_header() -> None:
    parsed = parse_message(b"just text, no header at all\r\n")
    assert (parsed.headers, parsed.text) == ((), "just text, no header at all")


# Limits


def nested(levels: int) -> bytes:
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (n, n) for n in range(levels)
    )
    closing = b"".join(b"\n--b%d--" % n for n in reversed(range(levels)))
    return opening + b"Content-Type: text/plain\n\ndeep text" + closing


def test_ten_thousand_levels_stop_at_max_depth() -> None:
    parsed = parse_message(nested(10_000))
    assert parsed.truncated
    assert parsed.parts == 21  # the message and 20 levels below it
    assert parsed.defects == ("MIME nested deeper than 20: not read",)
    assert parsed.text == ""


def test_deep_nesting_within_limits_does_not_recurse() -> None:
    levels = sys.getrecursionlimit() + 500
    parsed = parse_message(nested(levels), ContentLimits(max_depth=levels, max_parts=levels + 1))
    assert parsed.text == "deep text"
    assert not parsed.truncated


def test_max_parts() -> None:
    raw = multipart("mixed", *[b"\r\npart %d" % n for n in range(10)])
    parsed = parse_message(raw, ContentLimits(max_parts=4))
    assert parsed.text == "part 0\n\npart 1\n\npart 2"
    assert parsed.truncated
    assert parsed.defects == ("more than 4 MIME parts: the rest not read",)


def test_max_text() -> None:
    parsed = parse_message(message(body="x" * 5000), ContentLimits(max_text=1000))
    assert parsed.text == "x" * 1000
    assert parsed.truncated


def test_max_bytes_when_called_directly() -> None:
    raw = message("Subject: big", body="y" * 5000)
    parsed = parse_message(raw, ContentLimits(max_bytes=2000))
    assert parsed.size == len(raw)
    assert parsed.truncated
    assert len(parsed.text) < 2000
    assert parsed.subject == "big"


def test_huge_content_type_is_cut_not_parsed_for_minutes() -> None:
    raw = message("Content-Type: text/plain; " + "a=b; " * 100_000, body="words")
    parsed = parse_message(raw)
    assert parsed.text == "words"
    assert parsed.truncated
    assert parsed.defects == ("content-type longer than 8192 characters: the rest not read",)


def test_hostile_html_is_read_in_linear_time() -> None:
    # html.parser takes minutes on this (quadratic); the parse must not.
    raw = message("Content-Type: text/html", body="<a x='" * 100_000 + "<p>end")
    assert parse_message(raw).text.endswith("end")
