"""parse_message on generated input: it never raises, stays within its limits, and reads back
what a well-formed message says."""

from __future__ import annotations

import base64
import html
import itertools
import quopri
import urllib.parse
from datetime import timedelta

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.content import ContentLimits, ParsedMessage
from gateway.content.parse import parse_message

# Generous: a failure here is a blow-up (quadratic or worse), not a slow machine.
bounded = settings(deadline=timedelta(seconds=2), max_examples=200)


@attrs.frozen
class Text:
    text: str
    charset: str
    encoding: str


@attrs.frozen
class File:
    filename: str
    payload: bytes


@attrs.frozen
class Mixed:
    parts: tuple[Text | File | Mixed | Forwarded, ...]


@attrs.frozen
class Forwarded:
    message: Text | File | Mixed | Forwarded


Node = Text | File | Mixed | Forwarded

# Words as a reader would type them: no controls, no surrogates, nothing stripped away.
words = st.text(
    st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp", "Zs", "Co", "Cn")), min_size=1, max_size=40
)
texts = st.builds(
    Text,
    st.lists(words, min_size=1, max_size=8).map(" ".join),
    st.sampled_from(["utf-8", "gb18030"]),
    st.sampled_from(["base64", "quoted-printable", "8bit"]),
)
files = st.builds(File, words.filter(lambda name: name.strip() == name), st.binary(max_size=300))
trees: st.SearchStrategy[Node] = st.recursive(
    texts | files,
    lambda children: (
        st.builds(Mixed, st.lists(children, min_size=1, max_size=4).map(tuple))
        | st.builds(Forwarded, children)
    ),
    max_leaves=12,
)


def render(node: Node, boundaries: itertools.count[int]) -> bytes:
    """The entity (header and body) for `node`, each multipart with a boundary of its own."""
    if isinstance(node, Text):
        content = node.text.encode(node.charset)
        if node.encoding == "base64":
            content = base64.encodebytes(content)
        elif node.encoding == "quoted-printable":
            content = quopri.encodestring(content)
        head = (
            f"Content-Type: text/plain; charset={node.charset}\r\n"
            f"Content-Transfer-Encoding: {node.encoding}\r\n"
        )
        return head.encode() + b"\r\n" + content
    if isinstance(node, File):
        name = urllib.parse.quote(node.filename.encode())
        head = (
            "Content-Type: application/octet-stream\r\n"
            f"Content-Disposition: attachment; filename*=utf-8''{name}\r\n"
            "Content-Transfer-Encoding: base64\r\n"
        )
        return head.encode() + b"\r\n" + base64.encodebytes(node.payload)
    if isinstance(node, Forwarded):
        return b"Content-Type: message/rfc822\r\n\r\n" + render(node.message, boundaries)
    boundary = b"==part%d==" % next(boundaries)
    body = b"".join(b"--" + boundary + b"\r\n" + render(part, boundaries) + b"\r\n" for part in node.parts)
    return (
        b'Content-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\n'
        + body
        + b"--"
        + boundary
        + b"--\r\n"
    )


def leaves(node: Node) -> list[Text | File]:
    if isinstance(node, Mixed):
        return [leaf for part in node.parts for leaf in leaves(part)]
    if isinstance(node, Forwarded):
        return leaves(node.message)
    return [node]


def within_limits(parsed: ParsedMessage, raw: bytes, limits: ContentLimits) -> None:
    assert parsed.size == len(raw)
    assert len(parsed.text) <= limits.max_text
    assert parsed.parts <= limits.max_parts
    assert len(parsed.defects) <= 100
    assert all(attachment.depth <= limits.max_depth for attachment in parsed.attachments)


@bounded
@given(st.binary(max_size=4000))
def test_any_bytes_parse(raw: bytes) -> None:
    within_limits(parse_message(raw), raw, ContentLimits())


@bounded
@given(trees)
def test_well_formed_messages_read_back(tree: Node) -> None:
    raw = b"From: alice@example.com\r\nSubject: generated\r\n" + render(tree, itertools.count())
    parsed = parse_message(raw)
    expected = leaves(tree)
    assert parsed.subject == "generated"
    assert parsed.text == "\n\n".join(leaf.text for leaf in expected if isinstance(leaf, Text))
    assert [(a.filename, a.payload) for a in parsed.attachments] == [
        (leaf.filename, leaf.payload) for leaf in expected if isinstance(leaf, File)
    ]
    assert parsed.defects == ()
    assert not parsed.truncated


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A generated message cut, spliced or sprinkled with bytes that matter to MIME."""
    raw = render(draw(trees), itertools.count())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        damage = draw(
            st.sampled_from(["cut", "drop", "insert", "duplicate"]),
        )
        if damage == "cut":
            raw = raw[:at]
        elif damage == "drop":
            raw = raw[:at] + raw[at + draw(st.integers(1, 50)) :]
        elif damage == "insert":
            noise = draw(
                st.sampled_from(
                    [b"\r\n", b"\n--", b"=?", b"?=", b"\xff\xfe", b"\x00", b'"', b";", b"*=", b"=\r\n", b"<"]
                )
                | st.binary(max_size=20)
            )
            raw = raw[:at] + noise + raw[at:]
        else:
            raw = raw[:at] + raw[at : at + 200] + raw[at:]
    return raw


@bounded
@given(damaged(), st.integers(1, 6), st.integers(1, 30), st.integers(1, 500))
def test_damaged_messages_parse_within_limits(raw: bytes, depth: int, parts: int, text: int) -> None:
    limits = ContentLimits(max_depth=depth, max_parts=parts, max_text=text)
    within_limits(parse_message(raw, limits), raw, limits)


markup_tokens = st.lists(
    words.map(lambda word: ("word", word))
    | st.sampled_from(
        [
            "<b>",
            "</b>",
            "<p>",
            "</P>",
            "<br/>",
            "<span title='a>b' class=\"x\">",
            "<!-- hidden -->",
            "<SCRIPT>hidden()</script>",
            "<style>.hidden{}</style>",
            "<!DOCTYPE html>",
        ]
    ).map(lambda tag: ("tag", tag)),
    max_size=30,
)


@bounded
@given(markup_tokens)
def test_html_text_is_its_words(tokens: list[tuple[str, str]]) -> None:
    markup = "".join(html.escape(value) if kind == "word" else value for kind, value in tokens)
    raw = b"Content-Type: text/html; charset=utf-8\r\n\r\n" + markup.encode()
    parsed = parse_message(raw)
    assert "".join(parsed.text.split()) == "".join(value for kind, value in tokens if kind == "word")
